"""Changes of JSON documents for property tests: one value somewhere replaced, or removed."""

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


def change(data: st.DataObject, node: Any, *, remove: bool = False) -> None:
    """Replace one value somewhere below `node` (a JSON object or list) with any JSON value, or,
    with `remove`, perhaps remove it instead."""
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            return
        k = data.draw(st.sampled_from(keys))
        if isinstance(node[k], dict | list) and data.draw(st.booleans()):
            node = node[k]
            continue
        if remove and data.draw(st.booleans()):
            del node[k]
        else:
            node[k] = data.draw(JSON)
        return
