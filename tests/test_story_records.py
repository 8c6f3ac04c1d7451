"""The story tables on external prompts (organism -> abliterated -> ROSI -> conditional ROSI)
quote the committed records: the external columns each stage's record, the builtin column the
demonstration's record (story-v2, story-v7 in full) or each stage's builtin record (story-v4, the
stopped story-v7 run). That the records' counts follow from their stored completions is checked in test_external_records.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from doc_tables import CONCEPTS, section, table_rows

RESULTS = Path(__file__).parents[1] / "docs" / "results" / "external"

#: the story on the shipped organism: (record under RESULTS, table row, stage of story-v2/demo.json)
STORY_V2 = [
    ("story-v2/organism-external.json", "organism smollm2-refusal", "organism"),
    ("story-v2/abliterated-external.json", "abliterated (block-25 direction)", "abliterated"),
    ("story-v2/rosi-external.json", "ROSI repair (alpha 30)", "repaired"),
    (
        "story-v2/conditional-rosi-external.json",
        "conditional-ROSI repair (blocks 15..28, 112.5)",
        "conditional",
    ),
]
#: the story on smollm2-refusal-v4: (record, table row, record of its builtin test figures); no
#: demonstration record exists (its run raised; see the page)
STORY_V4 = [
    ("organism-v4-test.json", "organism smollm2-refusal-v4", "organism-v4-test.json"),
    (
        "story-v4/abliterated-external.json",
        "abliterated (block-23 direction)",
        "story-v4/abliterated-builtin.json",
    ),
]


def _quoted(pooled: dict[str, Any]) -> str:
    low, high = pooled["interval"]
    return f"**{pooled['rate']:.3f} ({pooled['refused']}/{pooled['n']})** [{low:.2f}, {high:.2f}]"


def _check_row(rows: dict[str, list[str]], name: str, label: str, builtin_cell: str) -> None:
    """The row ``label`` quotes record ``name``'s pooled external rates (``substring`` with its
    interval, ``learned`` as rate and count) and holds ``builtin_cell`` in its last column."""
    pooled = json.loads((RESULTS / name).read_text(encoding="utf-8"))["external"]["pooled"]
    row = rows[label]
    for column, kind in ((1, "harmful"), (3, "harmless")):
        assert row[column] == _quoted(pooled[kind]["substring"]), (name, kind)
        learned = pooled[kind]["learned"]
        assert row[column + 1] == f"{learned['rate']:.3f} ({learned['refused']})", (name, kind)
    assert row[5] == builtin_cell, name


#: the story on smollm2-refusal-v7, run in full (the ROSI repair was not exported: no row quotes one)
STORY_V7_FULL = [
    ("organism-v7-test.json", "organism smollm2-refusal-v7", "organism"),
    ("story-v7/abliterated-external.json", "abliterated (block-19 direction)", "abliterated"),
    (
        "story-v7/conditional-rosi-external.json",
        "conditional-ROSI repair (blocks 20..28, 150)",
        "conditional",
    ),
]


@pytest.mark.parametrize(
    ("page_name", "heading", "demo_name", "stages"),
    [
        ("external-prompts.md", "### The story, external next to builtin", "story-v2/demo.json", STORY_V2),
        (
            "organism-v6.md",
            "### The story on v7, external next to builtin",
            "story-v7/demo.json",
            STORY_V7_FULL,
        ),
    ],
    ids=["v2", "v7"],
)
def test_the_demonstrated_story_table_quotes_the_records(
    page_name: str, heading: str, demo_name: str, stages: list[tuple[str, str, str]]
) -> None:
    page = (CONCEPTS / page_name).read_text(encoding="utf-8")
    rows = table_rows(section(page, heading))
    demo = json.loads((RESULTS / demo_name).read_text(encoding="utf-8"))["stages"]
    for name, label, stage in stages:
        harmful, harmless = demo[stage]["harmful_refusal"], demo[stage]["harmless_refusal"]
        n_harmful, n_harmless = demo[stage]["n"]
        cell = (
            f"{harmful:.3f} ({round(harmful * n_harmful)}) / {harmless:.3f} ({round(harmless * n_harmless)})"
        )
        _check_row(rows, name, label, cell)


def test_the_v7_demonstration_exported_no_rosi_repair() -> None:
    """The v7 table's ROSI row says "not exported"; the record must agree (no alpha, no export)."""
    demo = json.loads((RESULTS / "story-v7" / "demo.json").read_text(encoding="utf-8"))
    assert demo["alpha"] is None and "repaired" not in demo["stages"]
    assert {e["stage"] for e in demo["exports"]} == {"abliterated", "conditional"}
    page = (CONCEPTS / "organism-v6.md").read_text(encoding="utf-8")
    rows = table_rows(section(page, "### The story on v7, external next to builtin"))
    assert rows["ROSI repair"][1].startswith("not exported")


#: abliteration on smollm2-refusal-v7 (its demonstration was stopped before it wrote a record)
STORY_V7 = [
    ("organism-v7-test.json", "organism smollm2-refusal-v7", "organism-v7-test.json"),
    (
        "story-v7/abliterated-external.json",
        "abliterated (block-19 direction)",
        "story-v7/abliterated-builtin.json",
    ),
]


@pytest.mark.parametrize(
    ("page_name", "heading", "stages"),
    [
        ("organism-v5.md", "### The story on v4, external next to builtin", STORY_V4),
        ("organism-v6.md", "### Abliteration on v7, external next to builtin", STORY_V7),
    ],
    ids=["v4", "v7"],
)
def test_the_story_table_quotes_the_records(
    page_name: str, heading: str, stages: list[tuple[str, str, str]]
) -> None:
    page = (CONCEPTS / page_name).read_text(encoding="utf-8")
    rows = table_rows(section(page, heading))
    for name, label, builtin_name in stages:
        builtin = json.loads((RESULTS / builtin_name).read_text(encoding="utf-8"))["builtin"]["pooled"]
        harmful, harmless = builtin["harmful"]["substring"], builtin["harmless"]["substring"]
        cell = (
            f"{harmful['rate']:.3f} ({harmful['refused']}) / {harmless['rate']:.3f} ({harmless['refused']})"
        )
        _check_row(rows, name, label, cell)
