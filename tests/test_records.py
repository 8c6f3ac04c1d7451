"""The shared result-record mixin: ``to_dict`` is the dataclass's fields, recursively."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from lens_safety.records import Record


@dataclass(frozen=True)
class _Inner(Record):
    value: float
    n: int


@dataclass
class _Outer(Record):
    name: str
    inner: _Inner
    maybe: _Inner | None = None
    layers: tuple[int, ...] = (3, 1)
    rows: list[dict[str, float]] = field(default_factory=list)


@dataclass
class _Renamed(Record):
    a: int

    def to_dict(self) -> dict[str, int]:
        return {**super().to_dict(), "double": 2 * self.a}


def test_to_dict_is_the_fields_in_order_recursively() -> None:
    rows = [{"x": 1.0}]
    record = _Outer("m", _Inner(0.5, 3), None, (2, 0), rows)
    out = record.to_dict()
    assert list(out) == ["name", "inner", "maybe", "layers", "rows"]
    assert out == {
        "name": "m",
        "inner": {"value": 0.5, "n": 3},
        "maybe": None,
        "layers": (2, 0),
        "rows": rows,
    }
    assert isinstance(out["layers"], tuple)
    out["rows"][0]["x"] = 9.0  # a copy: mutating the dictionary leaves the record alone
    assert record.rows[0]["x"] == 1.0
    assert json.loads(json.dumps(record.to_dict()))["inner"] == {"value": 0.5, "n": 3}


def test_override_starts_from_the_fields() -> None:
    assert _Renamed(4).to_dict() == {"a": 4, "double": 8}


def test_a_non_dataclass_is_refused() -> None:
    class Plain(Record):
        pass

    with pytest.raises(TypeError, match="not a dataclass"):
        Plain().to_dict()
