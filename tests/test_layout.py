"""The package's rooms and the rules between them, checked on the source with ``ast``.

A room is a subpackage of ``retrieval_prune`` (``index``, ``kernels``, ...) or one of its
top-level modules (``cli``, ``registry``, ...). Every ``import`` counts, module-level or
inside a function. Rules:

* floors: a room imports only rooms on its own floor or below (:data:`FLOORS`);
* ``kernels`` imports nothing of ours but ``types``;
* ``index`` imports none of ``data``, ``train``, ``pipeline``, ``retrieve``,
  ``evaluation``, ``cli``;
* only ``cli`` (and ``__main__``) imports ``cli``;
* no import cycle between rooms.

A room listed here that does not exist (yet) is fine; a room that exists but is not
listed fails :func:`test_every_room_has_a_floor`.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

PACKAGE = "retrieval_prune"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

#: room -> floor; a room may import rooms of its own floor or lower ones
FLOORS: dict[str, int] = {
    # ground: imports nothing of ours but each other
    "__init__": 0,  # the package itself (``from retrieval_prune import __version__``)
    "types": 0,
    "safejson": 0,
    "atomic": 0,
    "npyio": 0,
    "registry": 0,
    "kernels": 1,
    "data": 2,
    "encode": 3,
    "preprocess": 4,
    "compress": 5,
    "index": 6,
    "train": 7,
    "pipeline": 8,
    "retrieve": 9,
    "evaluation": 10,
    "cli": 11,
    "__main__": 11,
}

#: room -> the only rooms of ours it may import besides itself
ONLY: dict[str, set[str]] = {"kernels": {"types"}}

#: room -> rooms it must not import (whatever their floor)
FORBIDDEN: dict[str, set[str]] = {
    "index": {"data", "train", "pipeline", "retrieve", "evaluation", "cli"},
}

#: the rooms allowed to import ``cli``
CLI_IMPORTERS = {"cli", "__main__"}


class Import(NamedTuple):
    module: str  # importing module, dotted
    path: str  # its file, relative to the repository
    line: int
    target: str  # imported module, dotted (ours only)
    src_room: str
    dst_room: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line} ({self.module}) imports {self.target}"


def _module_name(path: Path) -> tuple[str, bool]:
    """Dotted module name of a file under the package, and whether it is a package."""
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    is_pkg = parts[-1] == "__init__"
    if is_pkg:
        parts = parts[:-1]
    return ".".join(parts), is_pkg


def _room(module: str) -> str | None:
    """Room of a dotted module name, None when it is not ours."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def _is_module(dotted: str) -> bool:
    """Whether ``dotted`` names a module or package of ours (a file on disk)."""
    parts = dotted.split(".")
    if parts[0] != PACKAGE:
        return False
    p = ROOT.parent.joinpath(*parts)
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def imports_of(source: str, module: str, is_pkg: bool, path: str = "<string>") -> list[Import]:
    """Every import of ours in ``source`` (the module ``module``), in functions too."""
    src_room = _room(module)
    package = module if is_pkg else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(source, filename=path)):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                if node.level > 1:
                    base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            for alias in node.names:  # ``from pkg import submodule`` names the submodule
                full = f"{stem}.{alias.name}"
                targets.append(full if _is_module(full) else stem)
        for target in dict.fromkeys(targets):
            dst_room = _room(target)
            if dst_room is not None and src_room is not None:
                out.append(Import(module, path, node.lineno, target, src_room, dst_room))
    return out


def _scan() -> list[Import]:
    found = []
    for f in sorted(ROOT.rglob("*.py")):
        if "__pycache__" in f.parts:
            continue
        module, is_pkg = _module_name(f)
        rel = str(f.relative_to(ROOT.parent))
        found += imports_of(f.read_text(encoding="utf-8"), module, is_pkg, rel)
    return found


IMPORTS = _scan()
BETWEEN = [i for i in IMPORTS if i.src_room != i.dst_room]


def _rooms_present() -> set[str]:
    rooms = set()
    for f in ROOT.rglob("*.py"):
        if "__pycache__" not in f.parts:
            rooms.add(_room(_module_name(f)[0]))
    return rooms


def _report(bad: list[Import], why: str) -> str:
    return f"{why}:\n" + "\n".join(f"  {i}  [{i.src_room} -> {i.dst_room}]" for i in bad)


# -- the scanner itself --------------------------------------------------------------------
def test_scanner_sees_function_level_relative_and_submodule_imports():
    src = (
        "import numpy\n"
        "from retrieval_prune.types import MultiVectors\n"
        "from ..kernels import ops\n"
        "def f():\n"
        "    from retrieval_prune import registry, __version__\n"
        "    import retrieval_prune.cli\n"
    )
    found = imports_of(src, f"{PACKAGE}.index.base", is_pkg=False)
    got = {(i.line, i.target, i.dst_room) for i in found}
    assert got == {
        (2, f"{PACKAGE}.types", "types"),
        (3, f"{PACKAGE}.kernels.ops", "kernels"),
        (5, f"{PACKAGE}.registry", "registry"),
        (5, PACKAGE, "__init__"),
        (6, f"{PACKAGE}.cli", "cli"),
    }
    assert all(i.src_room == "index" for i in found)
    assert BETWEEN, "the scan found no import between rooms at all"


# -- the rules -----------------------------------------------------------------------------
def test_every_room_has_a_floor():
    unknown = sorted(_rooms_present() - set(FLOORS))
    assert not unknown, f"rooms without a floor in tests/test_layout.py FLOORS: {unknown}"


def test_rooms_import_only_their_floor_or_lower():
    bad = [
        i for i in BETWEEN
        if FLOORS.get(i.dst_room, 99) > FLOORS.get(i.src_room, -1)
    ]
    assert not bad, _report(bad, "imports of a higher floor (FLOORS in tests/test_layout.py)")


def test_kernels_import_only_types():
    bad = [i for i in BETWEEN if i.src_room in ONLY and i.dst_room not in ONLY[i.src_room]]
    assert not bad, _report(bad, f"rooms limited to {ONLY} import more")


def test_index_imports_no_data_train_pipeline_retrieve_evaluation_cli():
    bad = [i for i in BETWEEN if i.dst_room in FORBIDDEN.get(i.src_room, set())]
    assert not bad, _report(bad, f"forbidden imports {FORBIDDEN}")


def test_only_the_command_line_imports_cli():
    bad = [i for i in BETWEEN if i.dst_room == "cli" and i.src_room not in CLI_IMPORTERS]
    assert not bad, _report(bad, "cli is imported from outside the command line")


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one room (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(set(edges) | {w for ws in edges.values() for w in ws}):
        if v not in index:
            visit(v)
    return comps


def test_cycle_finder():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_rooms():
    edges: dict[str, set[str]] = defaultdict(set)
    for i in BETWEEN:
        edges[i.src_room].add(i.dst_room)
    comps = _cycles(edges)
    bad = [i for comp in comps for i in BETWEEN if i.src_room in comp and i.dst_room in comp]
    assert not comps, _report(bad, f"import cycles between rooms {comps}")
