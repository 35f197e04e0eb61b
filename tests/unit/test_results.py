"""The typed-result base: JSON out in declaration order, back in by declared types."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from kvedge.results import Result, omit_none
from kvedge.stats import Estimate, Rate, wilson


@dataclass(frozen=True)
class Inner(Result):
    rate: Rate
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Outer(Result):
    name: str
    inners: list[Inner]
    by_name: dict[str, Estimate]
    maybe: Inner | None = omit_none()
    count: int | None = None


def test_round_trip_keeps_order_types_and_omitted_keys():
    o = Outer("x", [Inner(wilson(3, 4), ("a", "b"))], {"e": Estimate(0.5, 0.1, 0.9, 10, "bootstrap")})
    d = o.to_dict()
    assert list(d) == ["name", "inners", "by_name", "count"]  # `maybe` left out while None, `count` kept
    assert d["inners"][0] == {"rate": wilson(3, 4).to_dict(), "tags": ["a", "b"]}
    back = Outer.from_dict(d)
    assert back == o and isinstance(back.inners[0].rate, Rate) and isinstance(back.by_name["e"], Estimate)
    with_maybe = Outer("y", [], {}, maybe=Inner(wilson(0, 0)))
    assert Outer.from_dict(with_maybe.to_dict()) == with_maybe


def test_unknown_keys_are_refused():
    with pytest.raises(TypeError, match="no field 'extra'"):
        Inner.from_dict({"rate": wilson(1, 2).to_dict(), "extra": 1})
