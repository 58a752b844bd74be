"""pydantic glue: strict YAML field types, and ValidationError as ConfigError (minimind_train.validation)."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal

import pytest
from annotated_types import Ge, Gt, Lt
from pydantic.dataclasses import dataclass

from minimind_train.validation import (
    STRICT,
    Bool,
    ConfigError,
    Int,
    Number,
    Text,
    base_type,
    did_you_mean,
    expected,
    raising,
    validate,
)


class PartError(ConfigError):
    """A stand-in for a caller's own error type (tune.space.SpaceError)."""


@raising("part", PartError)
@dataclass(frozen=True, config=STRICT)
class Inner:
    size: Annotated[Int, Gt(0)] = 1
    ratio: Annotated[Number, Ge(0), Lt(1)] = 0.5


@raising("part", PartError)
@dataclass(frozen=True, config=STRICT)
class Part:
    name: Text = "x"
    kind: Literal["a", "b"] = "a"
    on: Bool = False
    limit: Annotated[Int, Ge(1)] | None = None
    either: Int | Number = 1
    inner: Inner = dataclasses.field(default_factory=Inner)

    def __post_init__(self) -> None:
        if self.on and self.limit is None:
            raise PartError("part.limit is missing: part.on=True needs a limit")


@pytest.mark.parametrize(("hint", "words"), [
    (Annotated[Int, Gt(0)], "an integer > 0"),
    (Annotated[Number, Ge(0), Lt(1)], "a finite number >= 0 and < 1"),
    (Annotated[Int, Ge(1)] | None, "an integer >= 1 or null"),
    (Literal["a", "b"], "one of ['a', 'b']"),
    (Bool, "a boolean (true/false)"),
    (Int | Number, "a number"),
    (Inner, "a mapping with keys size, ratio"),
])
def test_expected_says_what_a_type_takes(hint: object, words: str) -> None:
    assert expected(hint) == words


def test_base_type_strips_bounds_and_null() -> None:
    assert base_type(Annotated[Int, Ge(1)] | None) is int and base_type(Number) is float and base_type(str) is str


@pytest.mark.parametrize(("raw", "line"), [
    ({"inner": {"size": 0}}, "sub.inner.size=0 is not allowed: expected an integer > 0"),
    ({"inner": {"ratio": "1e-1x"}}, "sub.inner.ratio='1e-1x' is not allowed: expected a finite number >= 0 and < 1"),
    ({"limit": 2.0}, "sub.limit=2.0 is not allowed: expected an integer >= 1 or null"),
    ({"on": "yes"}, "sub.on='yes' is not allowed: expected a boolean (true/false)"),
    ({"kind": "c"}, "sub.kind='c' is not allowed: expected one of ['a', 'b']"),
    ({"either": "x"}, "sub.either='x' is not allowed: expected a number"),  # one line for the union, not two
    ({"inner": 3}, "sub.inner=3 is not allowed: expected a mapping with keys size, ratio"),
    ({"limt": 3}, "sub.limt is not a known key (value 3) (did you mean limit?); allowed keys: name, kind, on, limit,"),
    ({"inner": {"sise": 3}}, "sub.inner.sise is not a known key (value 3) (did you mean size?); allowed keys: size, ratio"),
    ({"on": True}, "part.limit is missing: part.on=True needs a limit"),  # a rule's own message, verbatim
])
def test_validate_names_key_value_and_what_is_allowed(raw: dict, line: str) -> None:
    with pytest.raises(PartError) as info:
        validate(Part, raw, "sub", PartError)
    assert str(info.value).startswith(line) and "\n" not in str(info.value)


def test_every_problem_is_one_line() -> None:
    with pytest.raises(ConfigError) as info:
        validate(Part, {"kind": "c", "inner": {"size": -1, "zz": 0}}, "sub")
    assert str(info.value).splitlines() == [
        "sub.kind='c' is not allowed: expected one of ['a', 'b']",
        "sub.inner.size=-1 is not allowed: expected an integer > 0",
        "sub.inner.zz is not a known key (value 0); allowed keys: size, ratio",
    ]


def test_yaml_spellings_of_numbers() -> None:
    # PyYAML reads 1e-1 (no dot) as a string; an int is a valid Number and becomes a float.
    part = validate(Part, {"inner": {"ratio": "1e-1"}, "either": 2})
    assert part.inner.ratio == 0.1 and isinstance(validate(Inner, {"ratio": 0}).ratio, float)
    assert part.either == 2 and isinstance(part.either, int)  # Int | Number keeps an integer as written
    with pytest.raises(ConfigError, match=r"sub\.size=True is not allowed"):
        validate(Inner, {"size": True}, "sub")  # a boolean is not an integer


def test_direct_construction_and_replace_raise_the_callers_error() -> None:
    with pytest.raises(PartError, match=r"^part\.inner\.size=0 is not allowed: expected an integer > 0$"):
        Part(inner={"size": 0})  # type: ignore[arg-type]
    with pytest.raises(PartError, match=r"part\.ratio=1\.0"):
        dataclasses.replace(Inner(), ratio=1.0)
    with pytest.raises(PartError, match=r"part\.colour is not a known key"):
        Inner(colour=1)  # type: ignore[call-arg]
    with pytest.raises(dataclasses.FrozenInstanceError):
        Inner().size = 2  # type: ignore[misc]


def test_did_you_mean() -> None:
    assert did_you_mean("hidden", ["family", "hidden_size"]) == " (did you mean hidden_size?)"
    assert did_you_mean("lr", ["learning_rate", "seed"]) == ""
