"""JSON from untrusted bytes: bounded size, bounded nesting, strict values.

Python's :func:`json.loads` recurses once per nesting level, so 100,000 ``[`` raise
``RecursionError`` (or worse, deep inside a caller). :func:`loads_bounded` measures the
nesting depth first with a linear scan that skips string literals, refuses anything
deeper than ``max_depth``, and only then parses; ``NaN``/``Infinity`` are refused too.
Ground floor: imports nothing of ours.

Examples
--------
>>> loads_bounded(b'{"a": [1, 2]}')
{'a': [1, 2]}
>>> loads_bounded(b"[" * 100 + b"]" * 100, max_depth=64)
Traceback (most recent call last):
...
retrieval_prune.safejson.JSONLimitError: JSON nested 100 levels deep; at most 64 allowed
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["JSONLimitError", "loads_bounded", "nesting_depth", "value_depth", "DEFAULT_MAX_DEPTH"]

#: nesting allowed by default (manifests and documents need far less)
DEFAULT_MAX_DEPTH = 64
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


class JSONLimitError(ValueError):
    """The text is not JSON within the limits (size, nesting, values)."""


def nesting_depth(raw: bytes) -> int:
    """Deepest ``[``/``{`` nesting of JSON text ``raw`` (string literals skipped)."""
    stripped = _STRING.sub(b'""', raw)
    depth = deepest = 0
    for m in re.finditer(rb"[\[\]{}]", stripped):
        if m.group() in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def _no_constant(name: str) -> Any:
    raise JSONLimitError(f"JSON holds {name}, which is not a JSON number")


def loads_bounded(
    raw: bytes | str, *, max_depth: int = DEFAULT_MAX_DEPTH, max_bytes: int | None = None
) -> Any:
    """Parse JSON text, refusing nesting deeper than ``max_depth``, text longer than
    ``max_bytes`` and the non-standard constants ``NaN``/``Infinity``; raises
    :class:`JSONLimitError` (a ``ValueError``) with a one-line reason."""
    if isinstance(raw, str):
        try:
            raw = raw.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise JSONLimitError(f"text is not encodable as UTF-8 ({exc.reason})") from None
    if max_bytes is not None and len(raw) > max_bytes:
        raise JSONLimitError(f"JSON text of {len(raw)} bytes; at most {max_bytes} allowed")
    depth = nesting_depth(raw)
    if depth > max_depth:
        raise JSONLimitError(f"JSON nested {depth} levels deep; at most {max_depth} allowed")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JSONLimitError(f"JSON text is not UTF-8 (byte {exc.start})") from None
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise JSONLimitError(f"not valid JSON ({exc})") from None
    except RecursionError:  # defence in depth: the scan above should have caught it
        raise JSONLimitError("JSON nested too deeply to parse") from None


def value_depth(value: Any, limit: int | None = None) -> int:
    """Nesting depth of a parsed JSON value, measured iteratively (no recursion).

    A scalar has depth 0, ``{}`` and ``[]`` depth 1, ``{"a": [1]}`` depth 2. With
    ``limit``, the walk stops as soon as the depth exceeds it (returning ``limit + 1``).
    """
    if not isinstance(value, (dict, list)):
        return 0
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > deepest:
            deepest = depth
            if limit is not None and deepest > limit:
                return deepest
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return deepest
