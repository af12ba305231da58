"""One registry for every pluggable component, addressed by spec strings.

Grammar: ``name:key=value,key=value``; steps of a pipeline are joined with ``|``::

    pool:factor=2 | residual:k=4096,nbits=2

Each component class declares its ``name``, ``stage`` and ``params`` (the parameter
names with their defaults and types). ``Component.spec`` writes the canonical string
(every default filled, keys in declared order) and ``parse_spec``/``build`` read it
back, so ``build(c.spec).spec == c.spec`` for every registered component. Third-party
packages register through the ``retrieval_prune.plugins`` entry-point group.

Examples
--------
>>> parse_spec("pool:factor=2 | residual:nbits=2")
[('pool', {'factor': '2'}), ('residual', {'nbits': '2'})]
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

__all__ = [
    "Component",
    "Param",
    "register",
    "get",
    "available",
    "parse_spec",
    "build",
    "build_pipeline",
    "format_spec",
    "normalize_spec",
    "resolve_bare_words",
    "STAGES",
]

#: Stages in the order a pipeline applies them.
STAGES = ("data", "model", "table", "tokens", "codec", "index")

_REGISTRY: dict[str, type[Component]] = {}
_ENTRY_POINTS_LOADED = False


@dataclasses.dataclass(frozen=True)
class Param:
    """A declared parameter: default value, type and an optional check."""

    default: Any
    type: type = str
    help: str = ""
    choices: tuple | None = None
    low: float | None = None  # inclusive bounds for numbers
    high: float | None = None

    def convert(self, comp: str, key: str, raw: Any) -> Any:
        value = raw
        if isinstance(raw, str):
            text = raw.strip()
            try:
                if self.type is bool:
                    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError
                    value = text.lower() in ("true", "1", "yes")
                elif self.type is int:
                    value = int(text)
                elif self.type is float:
                    value = float(text)
                else:
                    value = text
            except ValueError:
                raise ValueError(
                    f"{comp}: {key}={raw!r} is not a valid {self.type.__name__}"
                ) from None
        elif self.type is float and isinstance(raw, int) and not isinstance(raw, bool):
            value = float(raw)
        if value is None:
            return None
        if self.choices is not None and value not in self.choices:
            raise ValueError(
                f"{comp}: {key}={value!r} is not one of {list(self.choices)}"
            )
        if self.low is not None and value < self.low:
            raise ValueError(f"{comp}: {key}={value} must be >= {self.low}")
        if self.high is not None and value > self.high:
            raise ValueError(f"{comp}: {key}={value} must be <= {self.high}")
        return value


class Component:
    """Base of every registered component.

    Subclasses set ``name``, ``stage`` and ``params``; ``__init__`` receives the
    converted parameters as keyword arguments and stores them as attributes
    (scikit-learn style: no work in ``__init__``).
    """

    name: ClassVar[str] = ""
    stage: ClassVar[str] = ""
    params: ClassVar[dict[str, Param]] = {}

    def __init__(self, **kwargs: Any) -> None:
        values = self._check_params(kwargs)
        for key, value in values.items():
            setattr(self, key, value)

    @classmethod
    def _check_params(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        kwargs = resolve_bare_words(cls, kwargs)
        unknown = sorted(set(kwargs) - set(cls.params))
        if unknown:
            raise ValueError(
                f"{cls.name}: unknown parameter(s) {unknown}; known: "
                + ", ".join(f"{k} (default {p.default!r})" for k, p in cls.params.items())
            )
        out = {}
        for key, p in cls.params.items():
            raw = kwargs.get(key, p.default)
            out[key] = p.convert(cls.name, key, raw) if raw is not None else None
        return out

    def get_params(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.params}

    @property
    def spec(self) -> str:
        """Canonical spec string: every parameter written, in declared order."""
        return format_spec([(self.name, self.get_params())])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.get_params() == other.get_params()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self.spec)


def register(cls: type[Component]) -> type[Component]:
    """Class decorator adding a component to the registry under ``cls.name``."""
    if not cls.name or cls.stage not in STAGES:
        raise ValueError(f"{cls.__name__} needs a name and a stage in {STAGES}")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"a component named {cls.name!r} is already registered ({existing})")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtin() -> None:
    # Importing the stage packages registers their components.
    import importlib

    for mod in (
        "retrieval_prune.index.flat",
        "retrieval_prune.index.ivf",
        "retrieval_prune.index.hnsw",
        "retrieval_prune.compress",
        "retrieval_prune.preprocess",
    ):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:  # a stage not built yet
            if exc.name is None or not exc.name.startswith("retrieval_prune"):
                raise


def _load_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    _load_builtin()
    from importlib.metadata import entry_points

    for ep in entry_points(group="retrieval_prune.plugins"):
        register(ep.load())


def get(name: str) -> type[Component]:
    """The registered class called ``name``; a clear error lists what exists."""
    _load_entry_points()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown component {name!r}; registered: {', '.join(sorted(_REGISTRY))}"
        ) from None


def available(stage: str | None = None) -> dict[str, type[Component]]:
    """All registered components, optionally only those of one stage."""
    _load_entry_points()
    return {
        n: c for n, c in sorted(_REGISTRY.items()) if stage is None or c.stage == stage
    }


def parse_spec(spec: str) -> list[tuple[str, dict[str, str]]]:
    """Split a spec string into ``[(name, {key: raw_value})]`` steps."""
    if not isinstance(spec, str):
        raise TypeError(f"spec must be a string, got {type(spec).__name__}")
    steps = []
    for raw_step in spec.split("|"):
        step = raw_step.strip()
        if not step:
            raise ValueError(f"empty step in spec {spec!r}; steps are joined with ' | '")
        name, _, rest = step.partition(":")
        name = name.strip()
        if not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"bad component name {name!r} in spec {spec!r}")
        params: dict[str, str] = {}
        if rest.strip():
            for item in rest.split(","):
                key, eq, value = item.partition("=")
                key = key.strip()
                if not eq and key.replace("_", "").isalnum():
                    # a bare word: resolved against the parameters' choices by the component
                    if key in params:
                        raise ValueError(f"{key!r} given twice in {step!r}")
                    params[key] = None  # type: ignore[assignment]
                    continue
                if not eq or not key:
                    raise ValueError(
                        f"bad parameter {item.strip()!r} in {step!r}; write key=value"
                    )
                if key in params:
                    raise ValueError(f"parameter {key!r} given twice in {step!r}")
                params[key] = value.strip()
        steps.append((name, params))
    return steps


def resolve_bare_words(cls: type[Component], params: dict[str, Any]) -> dict[str, Any]:
    """A bare word (``binary:sign``) becomes the value of the one parameter of ``cls``
    whose choices hold it; other entries are returned unchanged, in order."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if value is None and key not in cls.params:
            owners = [k for k, p in cls.params.items() if p.choices and key in p.choices]
            if len(owners) == 1 and owners[0] not in params:
                out[owners[0]] = key
                continue
        out[key] = value
    return out


def normalize_spec(spec: str) -> str:
    """``spec`` with bare words written as ``key=value`` (``binary:sign,score=hamming`` ->
    ``binary:kind=sign,score=hamming``); parameters not given stay unwritten."""
    return format_spec([(name, resolve_bare_words(get(name), params)) for name, params in parse_spec(spec)])


def _fmt_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    return str(v)


def format_spec(steps: list[tuple[str, dict[str, Any]]]) -> str:
    out = []
    for name, params in steps:
        items = [f"{k}={_fmt_value(v)}" for k, v in params.items() if v is not None]
        out.append(name + (":" + ",".join(items) if items else ""))
    return " | ".join(out)


def build(spec: str) -> Component:
    """Build a single component from a one-step spec string."""
    steps = parse_spec(spec)
    if len(steps) != 1:
        raise ValueError(f"build() takes one step, got {len(steps)} in {spec!r}; use build_pipeline")
    name, params = steps[0]
    return get(name)(**params)


def build_pipeline(spec: str) -> list[Component]:
    """Build every step of ``spec``, checking stages come in pipeline order."""
    comps = [get(name)(**params) for name, params in parse_spec(spec)]
    order = [STAGES.index(c.stage) for c in comps]
    if order != sorted(order):
        raise ValueError(
            f"steps of {spec!r} are out of order: stages {[c.stage for c in comps]} must follow "
            f"{list(STAGES)}"
        )
    return comps
