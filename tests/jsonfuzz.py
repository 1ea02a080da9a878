"""Hypothesis helpers for fuzzing JSON documents: any small JSON value, and one value of a
document replaced by it."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 300) | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


def replace_one_value(data: st.DataObject, doc: Any) -> None:
    """Replace, in place, one value somewhere inside `doc` (a list or an object) with any JSON
    value: from `doc` down, each step picks a member and goes into it (if it is a list or an
    object) or replaces it. An empty container ends the walk unchanged."""
    node = doc
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            return
        k = data.draw(st.sampled_from(keys))
        if isinstance(node[k], dict | list) and data.draw(st.booleans()):
            node = node[k]
            continue
        node[k] = data.draw(JSON)
        return
