"""Result records: dataclasses whose dictionary form is exactly their fields.

Jobs and measurements return dataclasses with ``to_dict()`` so that the CLI, reports, notebooks
and JSON files share one shape. Most of those dictionaries are nothing but the fields, in
declaration order; :class:`Record` gives them that ``to_dict`` once instead of a copy per class.
"""

from __future__ import annotations

from dataclasses import asdict, is_dataclass
from typing import Any


class Record:
    """Mixin for result dataclasses: ``to_dict()`` is :func:`dataclasses.asdict` of the instance.

    Keys are the field names in declaration order; nested dataclasses become dictionaries,
    lists / tuples / dictionaries are copied recursively (tuples stay tuples), other values
    are kept as they are. Declare it on a ``@dataclass``::

        @dataclass(frozen=True)
        class Estimate(Record):
            value: float
            n: int

    A record whose dictionary renames, adds or leaves out keys overrides ``to_dict`` and starts
    from ``super().to_dict()`` (the hook), so the plain field part still has this one home.
    """

    __slots__ = ()

    def to_dict(self) -> dict[str, Any]:
        """The fields of this dataclass as a dictionary (``dataclasses.asdict``)."""
        if not is_dataclass(self) or isinstance(self, type):
            raise TypeError(f"{type(self).__name__} uses Record but is not a dataclass instance")
        return asdict(self)
