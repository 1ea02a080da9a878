"""eemini.guest.record: frozen records that behave like frozen dataclasses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from eemini.guest.record import FrozenInstanceError, field, record, replace


@record
class Point:
    x: int
    y: int = 0
    tags: list[str] = field(default_factory=list)


@record
class Checked:
    value: int

    def __post_init__(self) -> None:
        if self.value < 0:
            raise ValueError(f"negative: {self.value}")


def test_positional_keyword_and_defaults() -> None:
    p = Point(1, y=2)
    assert (p.x, p.y, p.tags) == (1, 2, [])
    assert Point(x=5).y == 0


def test_default_factory_makes_a_fresh_value_per_instance() -> None:
    a, b = Point(1), Point(2)
    assert a.tags == [] and b.tags == []
    assert a.tags is not b.tags
    assert "tags" not in Point.__dict__


def test_eq_hash_repr() -> None:
    assert Point(1, 2) == Point(1, 2)
    assert Point(1, 2) != Point(1, 3)
    other: object = (1, 2, [])
    assert Point(1, 2) != other
    assert hash(Checked(3)) == hash(Checked(3))
    assert {Checked(3), Checked(3)} == {Checked(3)}
    assert repr(Point(1, 2)) == "Point(x=1, y=2, tags=[])"


def test_frozen() -> None:
    p = Point(1)
    with pytest.raises(FrozenInstanceError, match="cannot assign to field 'x'"):
        p.x = 2  # type: ignore[misc]
    with pytest.raises(FrozenInstanceError, match="cannot delete field 'y'"):
        del p.y
    assert isinstance(FrozenInstanceError(), AttributeError)


def test_bad_arguments_are_named() -> None:
    with pytest.raises(TypeError, match=r"^Point\(\) missing required argument: 'x'$"):
        Point()  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r"^Point\(\) got an unexpected keyword argument 'z'$"):
        Point(1, z=3)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r"^Point\(\) got multiple values for argument 'x'$"):
        Point(1, x=2)  # type: ignore[misc]
    with pytest.raises(TypeError, match=r"^Point\(\) takes 3 positional arguments but 4 were given$"):
        Point(1, 2, [], 4)  # type: ignore[call-arg]


def test_post_init_runs_on_construction_and_replace() -> None:
    assert Checked(1).value == 1
    with pytest.raises(ValueError, match="negative: -1"):
        Checked(-1)
    with pytest.raises(ValueError, match="negative: -2"):
        replace(Checked(1), value=-2)


def test_replace_changes_only_the_named_fields() -> None:
    p = Point(1, 2, ["a"])
    q = replace(p, y=7)
    assert q == Point(1, 7, ["a"])
    assert p == Point(1, 2, ["a"])
    assert q.tags is p.tags


def test_the_guest_runtime_imports_neither_dataclasses_nor_inspect() -> None:
    code = (
        "import sys; import eemini.guest.pid1, eemini.guest.runtime, eemini.guest.bootconfig, "
        "eemini.guest.dhcp, eemini.guest.netlink, eemini.guest.power, eemini.guest.dev.simulated; "
        "print(sorted({'dataclasses', 'inspect', 'ast'} & set(sys.modules)))"
    )
    # -S: no site-packages (a .pth file there may import anything); the package from src/.
    src = Path(__file__).resolve().parents[1] / "src"
    out = subprocess.run(
        [sys.executable, "-S", "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(src)},
    )
    assert out.stdout == "[]\n"
