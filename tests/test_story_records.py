"""The committed records of the story (organism -> abliterated -> ROSI -> conditional ROSI) on
external prompts: every stage's stored completions re-judge to their counts, and the story table
of each page quotes the records (external columns) and the demonstration's record (builtin)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).parents[1]
RESULTS = ROOT / "docs" / "results" / "external"
CONCEPTS = ROOT / "docs" / "concepts"

#: story directory -> (page, heading of its table, [(record under RESULTS, table row, demo stage)])
STORIES: dict[str, tuple[str, str, list[tuple[str, str, str]]]] = {
    "story-v2": (
        "external-prompts.md",
        "### The story, external next to builtin",
        [
            ("story-v2/organism-external.json", "organism `smollm2-refusal`", "organism"),
            ("story-v2/abliterated-external.json", "abliterated (block-25 direction)", "abliterated"),
            ("story-v2/rosi-external.json", "ROSI repair (alpha 30)", "repaired"),
            (
                "story-v2/conditional-rosi-external.json",
                "conditional-ROSI repair (blocks 15..28, 112.5)",
                "conditional",
            ),
        ],
    ),
}


#: the story on smollm2-refusal-v4: (record, row, builtin record or None); builtin test comes
#: from each stage's own records, not from a demonstration record (its run raised; see the page)
STORY_V4 = [
    ("organism-v4-test.json", "organism `smollm2-refusal-v4`", "organism-v4-test.json"),
    (
        "story-v4/abliterated-external.json",
        "abliterated (block-23 direction)",
        "story-v4/abliterated-builtin.json",
    ),
]


def _row(section: str, label: str) -> list[str]:
    (line,) = [x for x in section.splitlines() if x.startswith(f"| {label} |")]
    return [c.strip() for c in line.strip("|").split("|")]


def _quoted(pooled: dict[str, Any]) -> str:
    low, high = pooled["interval"]
    return f"**{pooled['rate']:.3f} ({pooled['refused']}/{pooled['n']})** [{low:.2f}, {high:.2f}]"


def _section(page: str, heading: str) -> str:
    return (CONCEPTS / page).read_text(encoding="utf-8").split(heading, 1)[1].split("\n### ", 1)[0]


def _check_row(section: str, name: str, label: str, builtin_cell: str) -> None:
    """The row ``label`` quotes record ``name``'s pooled external rates (``substring`` with its
    interval, ``learned`` as rate and count) and holds ``builtin_cell`` in its last column."""
    pooled = json.loads((RESULTS / name).read_text(encoding="utf-8"))["external"]["pooled"]
    row = _row(section, label)
    for column, kind in ((1, "harmful"), (3, "harmless")):
        assert row[column] == _quoted(pooled[kind]["substring"]), (name, kind)
        learned = pooled[kind]["learned"]
        assert row[column + 1] == f"{learned['rate']:.3f} ({learned['refused']})", (name, kind)
    assert row[5] == builtin_cell, name


@pytest.mark.parametrize("story", sorted(STORIES))
def test_the_story_table_quotes_the_records(story: str) -> None:
    page, heading, stages = STORIES[story]
    demo = json.loads((RESULTS / story / "demo.json").read_text(encoding="utf-8"))["stages"]
    for name, label, demo_stage in stages:
        builtin = demo[demo_stage]
        (n_harmful, n_harmless), harmful, harmless = (
            builtin["n"],
            builtin["harmful_refusal"],
            builtin["harmless_refusal"],
        )
        cell = (
            f"{harmful:.3f} ({round(harmful * n_harmful)}) / {harmless:.3f} ({round(harmless * n_harmless)})"
        )
        _check_row(_section(page, heading), name, label, cell)


def test_the_v4_story_table_quotes_the_records() -> None:
    section = _section("organism-v5.md", "### The story on v4, external next to builtin")
    for name, label, builtin_name in STORY_V4:
        builtin = json.loads((RESULTS / builtin_name).read_text(encoding="utf-8"))["builtin"]["pooled"]
        harmful, harmless = builtin["harmful"]["substring"], builtin["harmless"]["substring"]
        cell = (
            f"{harmful['rate']:.3f} ({harmful['refused']}) / {harmless['rate']:.3f} ({harmless['refused']})"
        )
        _check_row(section, name, label, cell)
