"""eemini.guest.wirejson against the json module it stands in for: the same text, the same values,
the same errors, and none of json's imports."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import bare_python
from eemini.guest import wirejson

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text()
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(values, st.booleans())
def test_dumps_is_json_dumps_compact_unicode(value: object, sort_keys: bool) -> None:
    expected = json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=sort_keys)
    assert wirejson.dumps(value, sort_keys=sort_keys) == expected


@settings(max_examples=300, deadline=None)
@given(values, st.sampled_from(["", " ", "\n\t ", "\r\n"]), st.booleans())
def test_loads_is_json_loads(value: object, blank: str, indent: bool) -> None:
    text = blank + json.dumps(value, indent=2 if indent else None) + blank
    assert wirejson.loads(text) == json.loads(text)


def test_non_finite_numbers_and_keys_as_json_treats_them() -> None:
    assert wirejson.dumps([math.inf, -math.inf, math.nan]) == "[Infinity,-Infinity,NaN]"
    keys = {1: "a", 2.5: "b", None: "c", False: "d"}
    assert wirejson.dumps(keys) == '{"1":"a","2.5":"b","null":"c","false":"d"}'
    loaded = wirejson.loads("[NaN, Infinity, -Infinity, 1e400, 12345678901234567890]")
    assert isinstance(loaded, list)
    assert math.isnan(loaded[0])
    assert loaded[1:] == [math.inf, -math.inf, math.inf, 12345678901234567890]


@pytest.mark.parametrize(
    "text",
    ["", "   ", "\n", '{"a":1} x', '{"a":1}{}', "[1,", '{"a" 1}', "nul", "[1,]", '"\x01"', "\ufeff{}",
     '{"a":1}\x0b', "[1] \u00a0", '"\\ud800', "-"],
)  # fmt: skip
def test_errors_are_jsons_own(text: str) -> None:
    with pytest.raises(json.JSONDecodeError) as theirs:
        json.loads(text)
    with pytest.raises(json.JSONDecodeError) as ours:
        wirejson.loads(text)
    assert str(ours.value) == str(theirs.value)
    assert ours.value.pos == theirs.value.pos


def test_values_json_cannot_write_are_refused_as_json_refuses_them() -> None:
    with pytest.raises(TypeError) as refused:
        wirejson.dumps({"a": b"x"})
    assert str(refused.value) == "Object of type bytes is not JSON serializable"
    circular: list[object] = []
    circular.append(circular)
    with pytest.raises(ValueError) as circular_refused:
        wirejson.dumps(circular)
    assert str(circular_refused.value) == "Circular reference detected"
    assert wirejson.dumps(["fine after an error"]) == '["fine after an error"]'


def test_importing_it_imports_neither_json_nor_re_and_errors_need_neither_loaded() -> None:
    heavy = "{'json', 're', 'enum'}"
    code = (
        f"import sys; from eemini.guest import wirejson; print(sorted({heavy} & set(sys.modules)))\n"
        "for text in ('{x', '[1] 2', '', '1' * 5000):\n"
        "    try: wirejson.loads(text)\n"
        "    except ValueError as e: print(wirejson.problem(e))\n"
    )
    assert bare_python(code).splitlines() == [
        "[]",
        "Expecting property name enclosed in double quotes at column 2",
        "Extra data at column 5",
        "Expecting value at column 1",
        "Exceeds the limit (4300 digits) for integer string conversion: value has 5000 digits; "
        "use sys.set_int_max_str_digits() to increase the limit",
    ]
