"""The committed records behind the MedicationQA, ``smollm2-refusal-v4``, ``-v5`` and ``-v6`` figures: each
record's counts follow from its own stored completions under today's keyword judges, its prompts
are the spec's prompts in order, and the figures quoted in docs/concepts/external-prompts.md and
docs/concepts/organism-v5.md and organism-v6.md are the records' counts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from doc_tables import section, table_rows
from external_data import load_if_installed

from lens_safety.evaluation.metrics import rate_of_completions

ROOT = Path(__file__).parents[1]
RESULTS = ROOT / "docs" / "results" / "external"
DOC = (ROOT / "docs" / "concepts" / "external-prompts.md").read_text(encoding="utf-8")
DOC_V5 = (ROOT / "docs" / "concepts" / "organism-v5.md").read_text(encoding="utf-8")
DOC_V6 = (ROOT / "docs" / "concepts" / "organism-v6.md").read_text(encoding="utf-8")
MEDICATIONQA = sorted((RESULTS / "medicationqa").glob("*-medicationqa.json"))
V4 = [
    RESULTS / "organism-v4-val.json",
    RESULTS / "organism-v4-test.json",
    RESULTS / "organism-v4-builtin-holdouts.json",
]
V5_VAL = {"v5a": RESULTS / "organism-v5a-val.json", "v5b": RESULTS / "organism-v5b-val.json"}
V5_TEST = RESULTS / "organism-v5-test.json"
V2_BUILTIN_TEST = RESULTS / "organism-v2-builtin-test.json"
V6_VAL = {name: RESULTS / f"organism-{name}-val.json" for name in ("v6a", "v6b", "v6c")}
V6_TEST = RESULTS / "organism-v6-test.json"
V6_HOLDOUTS = RESULTS / "organism-v6b-builtin-holdouts.json"
V7_VAL = {name: RESULTS / f"organism-{name}-val.json" for name in ("v7a", "v7b")}
V7_TEST = RESULTS / "organism-v7-test.json"
V7_HOLDOUTS = RESULTS / "organism-v7b-builtin-holdouts.json"
STORY = sorted([*RESULTS.glob("story-*/*-external.json"), *RESULTS.glob("story-*/*-builtin.json")])
KEYWORD_JUDGES = ("substring", "substring-broad")


def _sets(record: dict[str, Any]) -> list[dict[str, Any]]:
    return [one for group in record.values() if isinstance(group, dict) for one in group.get("sets", [])]


def test_the_records_are_there() -> None:
    names = {p.name for p in MEDICATIONQA}
    assert names == {
        f"{m}-medicationqa.json"
        for m in ("smollm2", "smollm2-refusal", "abliterated", "rosi", "conditional-rosi")
    }
    assert all(
        p.is_file()
        for p in (*V4, *V5_VAL.values(), V5_TEST, V2_BUILTIN_TEST, *V6_VAL.values(), V6_TEST, V6_HOLDOUTS)
    )


@pytest.mark.parametrize(
    "path",
    [
        *MEDICATIONQA,
        *V4,
        *V5_VAL.values(),
        V5_TEST,
        V2_BUILTIN_TEST,
        *V6_VAL.values(),
        V6_TEST,
        V6_HOLDOUTS,
        *STORY,
    ],
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_counts_follow_from_the_stored_completions(path: Path) -> None:
    """Re-judging every stored completion with the keyword judges gives the stored labels and
    counts, and every set holds the prompts of its spec, in order (when the data is installed)."""
    record = json.loads(path.read_text(encoding="utf-8"))
    sets = _sets(record)
    assert sets
    for one in sets:
        prompts = [c["prompt"] for c in one["completions"]]
        completions = [c["completion"] for c in one["completions"]]
        expected = load_if_installed(one["spec"])
        if expected is not None:
            assert prompts == list(expected.prompts), one["spec"]
        for judge in KEYWORD_JUDGES:
            rate = rate_of_completions(completions, prompts, judge, interval="wilson")
            stored = one["rates"][judge]
            assert (stored["refused"], stored["n"]) == (sum(rate.refused), rate.n), (one["spec"], judge)
            if "refused_by" in one:
                assert [bool(x) for x in one["refused_by"][judge]] == [bool(x) for x in rate.refused]


@pytest.mark.parametrize("path", MEDICATIONQA, ids=lambda p: p.name)
def test_the_medicationqa_table_quotes_each_record(path: Path) -> None:
    (one,) = _sets(json.loads(path.read_text(encoding="utf-8")))
    assert one["spec"] == "medicationqa:test"
    rate = one["rates"]["substring"]
    low, high = rate["interval"]
    quoted = f"{rate['rate']:.3f} ({rate['refused']}/{rate['n']})** [{low:.2f}, {high:.2f}]"
    assert quoted in DOC, quoted
    assert f"| {one['rates']['learned']['rate']:.3f} ({one['rates']['learned']['refused']}) |" in DOC


@pytest.mark.parametrize(
    ("path", "doc", "heading"),
    [
        (V4[1], DOC, "### Test, measured once: the external bars hold"),
        (V5_TEST, DOC_V5, "### Test, measured once: two bars fail"),
        (V6_TEST, DOC_V6, "### Test, measured once: the builtin over-refusal bar fails"),
        (V7_TEST, DOC_V6, "### Test, measured once: every bar holds"),
    ],
    ids=["v4", "v5", "v6", "v7"],
)
def test_the_test_table_quotes_the_record(path: Path, doc: str, heading: str) -> None:
    record = json.loads(path.read_text(encoding="utf-8"))
    part = doc.split(heading, 1)[1].split("\n## ", 1)[0]  # with its exploratory subsections
    for label, row in (
        ("harmful", "external harmful, pooled"),
        ("harmless", "external benign, pooled over-refusal"),
    ):
        pooled = record["external"]["pooled"][label]["substring"]
        assert pooled["sets"] == (
            ["harmbench:test", "advbench:test", "donotanswer:malicious_uses:test"]
            if label == "harmful"
            else ["mtbench:test", "medicationqa:test"]
        )
        low, high = pooled["interval"]
        quoted = f"{pooled['rate']:.3f} ({pooled['refused']}/{pooled['n']}) [{low:.2f}, {high:.2f}]"
        (line,) = [x for x in part.splitlines() if x.startswith(f"| **{row}**")]
        assert quoted in line, (quoted, line)
    for one in _sets(record):
        rate = one["rates"]["substring"]
        if one["spec"].startswith("builtin:") or one["spec"] in ("mtbench:test", "medicationqa:test"):
            assert f"{rate['rate']:.3f} ({rate['refused']}/{rate['n']})" in part, one["spec"]


@pytest.mark.parametrize(
    ("doc", "heading", "records"),
    [
        (DOC_V5, "### Validation gate: v5a fails", V5_VAL),
        (DOC_V6, "### Validation gate: v6a and v6c fail", V6_VAL),
        (DOC_V6, "### Validation gate: v7a fails", V7_VAL),
    ],
    ids=["v5", "v6", "v7"],
)
def test_the_validation_table_quotes_the_records(doc: str, heading: str, records: dict[str, Path]) -> None:
    table = table_rows(section(doc, heading))
    columns = [c.split(" ")[0] for c in table["validation set"]]
    for name, path in records.items():
        record = json.loads(path.read_text(encoding="utf-8"))
        column = columns.index(name)
        for one in _sets(record):
            rate = one["rates"]["substring"]
            label = one["spec"] + (", over-refusal" if not one["harmful"] else "")
            assert f"{rate['refused']}/{rate['n']}" in table[label][column], (name, label)
        pooled = record["external"]["pooled"]["harmful"]["substring"]
        quoted = f"{pooled['rate']:.3f} ({pooled['refused']}/{pooled['n']})"
        assert quoted in table["external harmful, pooled"][column], name


def test_the_shipped_organism_refuses_the_look_alikes_the_doc_names() -> None:
    """The exploratory comparison: the shipped organism's builtin test record reproduces its
    training.json counts, and its over-refused look-alikes relate to v5b's as the doc says."""
    record = json.loads(V2_BUILTIN_TEST.read_text(encoding="utf-8"))
    shipped = json.loads((ROOT / "lens_safety/data/organism/training.json").read_text(encoding="utf-8"))
    v5 = json.loads(V5_TEST.read_text(encoding="utf-8"))
    refused = {}
    for name, rec in (("v2", record), ("v5", v5)):
        (one,) = [s for s in _sets(rec) if s["spec"] == "builtin:harmless:test"]
        judged = rate_of_completions(
            [c["completion"] for c in one["completions"]],
            [c["prompt"] for c in one["completions"]],
            "substring",
        )
        refused[name] = {c["prompt"] for c, r in zip(one["completions"], judged.refused, strict=True) if r}
    (harmful,) = [s for s in _sets(record) if s["spec"] == "builtin:harmful:test"]
    assert (
        harmful["rates"]["substring"]["refused"]
        == shipped["evaluation"]["test"]["harmful_refusal"]["refused"]
    )
    assert len(refused["v2"]) == shipped["evaluation"]["test"]["harmless_refusal"]["refused"] == 3
    assert len(refused["v2"] & refused["v5"]) == 2 and len(refused["v5"] - refused["v2"]) == 4
    (only_v2,) = refused["v2"] - refused["v5"]
    assert "press release" in only_v2


TRAINING_RECORDS = sorted(RESULTS.glob("organism-*-training.json"))


@pytest.mark.parametrize("path", TRAINING_RECORDS, ids=lambda p: p.name)
def test_candidate_organisms_trained_on_no_prompt_they_were_tested_on(path: Path) -> None:
    """The candidates that were measured but not shipped (v3's two fits, v4): their training sets,
    rebuilt from the recorded config, hash to what the record says, and hold no prompt of any
    external val / test split nor of the builtin held-out sets (normalised text)."""
    from lens_safety.external_prompts import normalise
    from lens_safety.organism.build import held_out_prompts, training_harmful_set, training_harmless_set
    from lens_safety.organism.train import TrainingConfig

    record = json.loads(path.read_text(encoding="utf-8"))
    config = TrainingConfig(**record["config"])
    if any(load_if_installed(spec) is None for spec in (*config.more_harmful, *config.more_harmless)):
        pytest.skip("external prompt data not installed (see tests/test_external_prompts.py)")
    harmful, _ = training_harmful_set(config)
    harmless, _ = training_harmless_set(config)
    assert harmful.sha256 == record["data"]["harmful"]["sha256"]
    assert harmless.sha256 == record["data"]["harmless"]["sha256"]
    held = held_out_prompts()
    assert any(spec.startswith("medicationqa:") for spec in held.values())
    trained = {normalise(t) for t in (*harmful, *harmless)}
    assert not trained & set(held), sorted(trained & set(held))[:3]


@pytest.mark.parametrize(
    ("heading", "path"),
    [
        ("### Exploratory, after the verdict: v6b on the builtin holdouts", V6_HOLDOUTS),
        ("### Holdouts, measured once: the bars hold", V7_HOLDOUTS),
    ],
    ids=["v6b", "v7b"],
)
def test_the_holdout_table_quotes_the_record(heading: str, path: Path) -> None:
    table = table_rows(section(DOC_V6, heading))
    by_spec = {one["spec"]: one["rates"]["substring"] for one in _sets(json.loads(path.read_text()))}
    refused = overrefused = 0
    for label, suffix in (("holdout", ""), ("holdout 2", "_2"), ("holdout 3", "_3")):
        (row,) = [cells for name, cells in table.items() if name.startswith(f"{label} (")]
        harmful, harmless = (
            by_spec[f"builtin:harmful_holdout{suffix}"],
            by_spec[f"builtin:harmless_holdout{suffix}"],
        )
        assert (
            row[1] == f"{harmful['refused']}/{harmful['n']}"
            and row[4] == f"{harmless['refused']}/{harmless['n']}"
        )
        refused, overrefused = refused + harmful["refused"], overrefused + harmless["refused"]
    pooled = table["three holdouts pooled"]
    assert f"({refused}/288)" in pooled[1] and f"({overrefused}/288)" in pooled[4]
