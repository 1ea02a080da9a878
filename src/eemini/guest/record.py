"""Frozen record classes for the guest, declared like frozen dataclasses.

The stand-in for `dataclasses` (see the lean-import rule in eemini.guest), whose imports and
`exec`-compiled methods cost about a third of a second of every boot under TCG. A
`@record` class is declared the same way (annotated fields, defaults, `field(default_factory=)`,
`__post_init__`) and behaves the same (keyword or positional construction, `==`, `hash`, `repr`,
frozen attributes, `replace`), with shared methods instead of generated ones. Type checkers see
it as a frozen dataclass (PEP 681 `dataclass_transform`).
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, TypeVar, dataclass_transform

    T = TypeVar("T")
else:

    def dataclass_transform(**kwargs: object) -> object:
        # PEP 681: the decorator only marks the function for type checkers; at runtime the
        # marker is not needed, so this stand-in returns the function unchanged.
        return lambda function: function


_MISSING: Any = object()


class FrozenInstanceError(AttributeError):
    """An attribute of a record was assigned or deleted."""


class _Factory:
    __slots__ = ("make",)

    def __init__(self, make: Callable[[], Any]) -> None:
        self.make = make


def field(*, default_factory: Callable[[], T]) -> T:
    """A field whose default is made afresh for each instance."""
    # A placeholder that @record replaces with the factory's product in each instance.
    return _Factory(default_factory)  # type: ignore[return-value]


def _init(self: Any, *args: Any, **kwargs: Any) -> None:
    cls = type(self)
    names: tuple[str, ...] = cls.__record_fields__
    if len(args) > len(names):
        raise TypeError(
            f"{cls.__name__}() takes {len(names)} positional arguments but {len(args)} were given"
        )
    values = dict(zip(names, args, strict=False))
    for key, value in kwargs.items():
        if key not in names:
            raise TypeError(f"{cls.__name__}() got an unexpected keyword argument {key!r}")
        if key in values:
            raise TypeError(f"{cls.__name__}() got multiple values for argument {key!r}")
        values[key] = value
    defaults: dict[str, Any] = cls.__record_defaults__
    for name in names:
        value = values.get(name, _MISSING)
        if value is _MISSING:
            value = defaults.get(name, _MISSING)
            if value is _MISSING:
                raise TypeError(f"{cls.__name__}() missing required argument: {name!r}")
            if isinstance(value, _Factory):
                value = value.make()
        object.__setattr__(self, name, value)
    post_init = getattr(self, "__post_init__", None)
    if post_init is not None:
        post_init()


def _values(self: Any) -> tuple[Any, ...]:
    return tuple(getattr(self, name) for name in type(self).__record_fields__)


def _repr(self: Any) -> str:
    cls = type(self)
    shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in cls.__record_fields__)
    return f"{cls.__qualname__}({shown})"


def _eq(self: Any, other: object) -> object:
    if other.__class__ is not self.__class__:
        return NotImplemented
    return _values(self) == _values(other)


def _hash(self: Any) -> int:
    return hash(_values(self))


def _setattr(self: Any, name: str, value: object) -> None:
    raise FrozenInstanceError(f"cannot assign to field {name!r}")


def _delattr(self: Any, name: str) -> None:
    raise FrozenInstanceError(f"cannot delete field {name!r}")


@dataclass_transform(frozen_default=True, field_specifiers=(field,))
def record(cls: type[T]) -> type[T]:
    """Make `cls` a frozen record of its annotated fields, in declaration order."""
    # The class's own annotations, in declaration order (strings under `from __future__ import
    # annotations`; inspect.get_annotations would import the module this one avoids).
    names = tuple(cls.__dict__.get("__annotations__", {}))  # noqa: RUF063
    defaults = {}
    for name in names:
        if name in cls.__dict__:
            defaults[name] = cls.__dict__[name]
            if isinstance(defaults[name], _Factory):
                delattr(cls, name)
    setattr(cls, "__record_fields__", names)  # noqa: B010
    setattr(cls, "__record_defaults__", defaults)  # noqa: B010
    for attr, method in (
        ("__init__", _init),
        ("__repr__", _repr),
        ("__eq__", _eq),
        ("__hash__", _hash),
        ("__setattr__", _setattr),
        ("__delattr__", _delattr),
    ):
        # As dataclasses do: a method the class defines itself stays.
        if cls.__dict__.get(attr) is None:
            setattr(cls, attr, method)
    return cls


def replace(obj: T, **changes: Any) -> T:
    """A copy of the record `obj` with some fields changed (like `dataclasses.replace`)."""
    cls: Any = type(obj)
    values = {name: getattr(obj, name) for name in cls.__record_fields__}
    values.update(changes)
    result: T = cls(**values)
    return result
