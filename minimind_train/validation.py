"""Validation of YAML-shaped input with pydantic v2, and its errors as :class:`ConfigError` messages.

The config types (:mod:`minimind_train.config`, :mod:`tune.space`) are frozen pydantic dataclasses whose
field types say what they take: :data:`Int`, :data:`Number`, :data:`Bool`, :data:`Text` accept exactly
the YAML type, and ``Annotated[Int, Gt(0)]`` adds bounds. pydantic's ``ValidationError`` becomes a
:class:`ConfigError` with one line per problem, each naming the dotted key, the value and what is
allowed (read from the field's type), or a rule's own message; an unknown key names the known ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

from annotated_types import Ge, Gt, Le, Lt
from pydantic import BeforeValidator, ConfigDict, Field, Strict, TypeAdapter, ValidationError

__all__ = ["STRICT", "Bool", "ConfigError", "Int", "Number", "Text", "base_type", "did_you_mean", "expected",
           "raising", "validate"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration key has a value that is not allowed; the message names key, value and rule."""


def _yaml_number(value: Any) -> Any:
    # PyYAML (YAML 1.1) reads 1e-4, without a dot, as a string: accept that spelling of a number.
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return float(value)
    return value


# Field types take exactly the YAML type (no "3" for 3, no 1 for true); an int is a Number.
Int = Annotated[int, Strict()]
Number = Annotated[float, BeforeValidator(_yaml_number), Strict(), Field(allow_inf_nan=False)]
Bool = Annotated[bool, Strict()]
Text = Annotated[str, Strict()]
STRICT = ConfigDict(extra="forbid")  # unknown keys are errors
_WORDS = {bool: "a boolean (true/false)", int: "an integer", float: "a finite number", str: "a string"}
_BOUNDS = ((Gt, "gt", ">"), (Ge, "ge", ">="), (Lt, "lt", "<"), (Le, "le", "<="))


def base_type(hint: Any) -> Any:
    """The type under ``Annotated[...]`` and ``... | None``: ``int`` for ``Annotated[int, Gt(0)] | None``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_args(hint)[0] if typing.get_origin(hint) is Annotated else hint


def expected(hint: Any) -> str:
    """What a field of type ``hint`` takes, in words: ``an integer > 0 or null``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType) and {base_type(a) for a in args} == {int, float}:
        return "a number"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(expected(a) for a in args)
    if origin is Annotated:
        bounds = [f"{op} {getattr(m, name):g}" for m in hint.__metadata__ for kind, name, op in _BOUNDS
                  if isinstance(m, kind)]
        return " ".join([expected(args[0]), " and ".join(bounds)]).strip()
    if origin is Literal:
        return f"one of {list(args)}"
    if origin in (tuple, list):
        return "a list"
    if dataclasses.is_dataclass(hint):
        return "a mapping with keys " + ", ".join(f.name for f in dataclasses.fields(hint))
    return "null" if hint is type(None) else _WORDS.get(hint, str(hint))


def _explain(exc: ValidationError, root: type, prefix: str) -> str:
    """One line per problem: ``key=value is not allowed: expected ...``, or a rule's own message."""
    lines = []
    for err in exc.errors():
        loc = [str(part) for part in err["loc"]]
        key, owner, hint = ".".join(filter(None, [prefix, *loc])), root, None
        for i, part in enumerate(loc):  # the field the error is about, and the dataclass holding it
            if not dataclasses.is_dataclass(owner):  # past the field: the member of a union that failed
                key = ".".join(filter(None, [prefix, *loc[:i]]))
                break
            hints = typing.get_type_hints(owner, include_extras=True)
            if part not in hints:
                hint = None
                break
            owner, hint = base_type(hints[part]), hints[part]
        kind, value = err["type"], err["input"]
        if kind == "value_error":  # a rule in __post_init__: its message names its keys
            line = str(err["ctx"]["error"])
        elif kind in ("unexpected_keyword_argument", "extra_forbidden"):
            known = [f.name for f in dataclasses.fields(owner)] if dataclasses.is_dataclass(owner) else []
            line = (f"{key} is not a known key (value {value!r}){did_you_mean(loc[-1], known)}; "
                    f"allowed keys: {', '.join(known)}")
        elif kind == "missing":
            line = f"{key} is missing: expected {expected(hint) if hint else err['msg']}"
        else:
            line = f"{key}={value!r} is not allowed: expected {expected(hint) if hint else err['msg']}"
        lines += [line] if line not in lines else []
    return "\n".join(lines)


def did_you_mean(given: str, known: list[str]) -> str:
    """`` (did you mean X?)`` for the known key closest to ``given``, or nothing."""
    close = [k for k in known if len(given) > 2 and given in k] or difflib.get_close_matches(given, known, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


@functools.cache
def _adapter(cls: type) -> TypeAdapter[Any]:
    return TypeAdapter(cls)


def validate(cls: type[T], raw: Any, prefix: str = "", error: type[ConfigError] = ConfigError) -> T:
    """``raw`` (parsed YAML) as a ``cls``; raises ``error`` whose keys are dotted under ``prefix``."""
    try:
        return _adapter(cls).validate_python(raw)
    except ValidationError as exc:
        raise error(_explain(exc, cls, prefix)) from None


def raising(prefix: str, error: type[ConfigError] = ConfigError) -> Callable[[type[T]], type[T]]:
    """Class decorator: building a validated dataclass directly raises ``error``, not pydantic's error."""
    def wrap(cls: type[T]) -> type[T]:
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            try:
                init(self, *args, **kwargs)
            except ValidationError as exc:
                raise error(_explain(exc, cls, prefix)) from None

        cls.__init__ = __init__  # type: ignore[method-assign]
        return cls
    return wrap
