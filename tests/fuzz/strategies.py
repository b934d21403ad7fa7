"""Input generators shared by the fuzz targets."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import strategies as st

#: Any JSON value (objects, arrays, strings with any code point a JSON string can hold).
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=20), children, max_size=5)
    ),
    max_leaves=25,
)

#: Values hostile to parsers: huge numbers, odd text, wrong types.
odd_scalars = st.sampled_from(
    [
        None,
        True,
        False,
        0,
        -1,
        2**64,
        10**400,
        1e308,
        -0.0,
        "",
        " ",
        "0",
        "1_000",
        " 5",
        "yes",
        "\u0665",
        "\ud800",
        "é" * 64,
        "i-0123456789abcdef0",
        "i-ABCDEF",
        "arn:aws:ec2:us-east-1:123456789012:instance/i-0123456789abcdef0",
        "2026-01-15T10:45:00Z",
        "not a date",
        "9999-12-31T23:59:59Z",
        "0001-01-01T00:00:00Z",
        "\x00",
        "a" * 5000,
        [],
        {},
    ]
)


def deep(depth: int, leaf: Any = 0) -> Any:
    value: Any = leaf
    for n in range(depth):
        value = [value] if n % 2 else {"a": value}
    return value


@st.composite
def mutated(draw: st.DrawFn, original: Any) -> Any:
    """``original`` with a few changes: a value replaced, a key deleted or added, a type
    swapped, deep nesting grafted in."""
    value = copy.deepcopy(original)
    for _ in range(draw(st.integers(1, 4))):
        value = _mutate_once(draw, value)
    return value


#: Mutations reach this deep into an event (grafted deep nesting is not walked into).
MAX_MUTATION_DEPTH = 8


def _paths(value: Any) -> list[tuple[Any, ...]]:
    found: list[tuple[Any, ...]] = []
    pending: list[tuple[Any, tuple[Any, ...]]] = [(value, ())]
    while pending:
        current, prefix = pending.pop()
        found.append(prefix)
        if len(prefix) >= MAX_MUTATION_DEPTH:
            continue
        if isinstance(current, dict):
            pending.extend((child, (*prefix, key)) for key, child in current.items())
        elif isinstance(current, list):
            pending.extend((child, (*prefix, index)) for index, child in enumerate(current))
    return found


def _mutate_once(draw: st.DrawFn, value: Any) -> Any:
    paths = _paths(value)
    path = draw(st.sampled_from(paths))
    replacement = draw(
        st.one_of(
            odd_scalars,
            json_values,
            st.sampled_from([2, 40, 1200]).map(deep),
        )
    )
    if not path:
        return replacement
    parent = value
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    action = draw(st.sampled_from(["replace", "delete", "add"]))
    if action == "delete" and isinstance(parent, dict):
        parent.pop(last, None)
    elif action == "add" and isinstance(parent, dict):
        parent[draw(st.text(max_size=20))] = replacement
    else:
        parent[last] = replacement
    return value
