"""Reading the markdown tables of the docs in tests that check the docs quote their records."""

from __future__ import annotations

from pathlib import Path

CONCEPTS = Path(__file__).parents[1] / "docs" / "concepts"


def section(text: str, heading: str) -> str:
    """The part of ``text`` after ``heading`` up to the next level-3 heading (``### ``)."""
    return text.split(heading, 1)[1].split("\n### ", 1)[0]


def table_rows(text: str) -> dict[str, list[str]]:
    """Every table row in ``text``: its first cell, bold and code marks dropped -> all its cells
    (stripped, marks kept); the first row wins where two share a first cell. Header separators
    are left out."""
    rows: dict[str, list[str]] = {}
    for line in text.splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if set(cells[0]) <= {"-"}:
            continue
        rows.setdefault(cells[0].replace("**", "").replace("`", ""), cells)
    return rows
