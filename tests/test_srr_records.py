"""The committed records behind the SRR figures of the shipped organism on builtin and external test
lists (docs/concepts/external-prompts.md, the sixth pre-registration and its exploratory
follow-up): the lists are the test splits' prompts in order, every stored candidate carries its
judge's label, the ranker's and plain sampling's metrics follow from the stored scores and labels
under either keyword judge, and the docs quote the records."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import torch
from doc_tables import section, table_rows
from external_data import load_if_installed

from lens_safety.evaluation.judges import get_judge
from lens_safety.srr.labels import label_candidates
from lens_safety.srr.metrics import RankingMetrics, ranking_metrics

ROOT = Path(__file__).parents[1]
RESULTS = ROOT / "docs" / "results" / "external"
#: the pre-registered ranker's records, and the exploratory ranker's with more benign lists
RUNS = ("srr-v2", "srr-v2-more")
DOC = (ROOT / "docs" / "concepts" / "external-prompts.md").read_text(encoding="utf-8")
#: which ranked-list files each evaluation pooled, in the order of its --data options
EXTERNAL = ("ext-harmbench", "ext-donotanswer", "ext-mtbench", "ext-medicationqa")
GROUPS = {"builtin-test": ("builtin-test",), "external": EXTERNAL, **{name: (name,) for name in EXTERNAL}}
JUDGES = ("substring-broad", "substring")
#: every metric a scorer gets, compared between the recomputation and the stored output
COMPARED = tuple(f.name for f in fields(RankingMetrics))


def _lists(name: str, run: str = "srr-v2") -> list[dict[str, Any]]:
    path = RESULTS / run / f"{name}-ranked.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _evaluation(group: str, judge: str, run: str = "srr-v2") -> dict[str, Any]:
    return json.loads((RESULTS / run / f"{group}-{judge}.json").read_text(encoding="utf-8"))


#: the prompt sets each ranked-list file was built from, harmful first
SPECS = {
    "builtin-test": ("builtin:harmful:test", "builtin:harmless:test"),
    "ext-harmbench": ("harmbench:test",),
    "ext-donotanswer": ("donotanswer:malicious_uses:test",),
    "ext-mtbench": ("mtbench",),
    "ext-medicationqa": ("medicationqa:test",),
}


def _relabelled(lists: list[dict[str, Any]], judge: str) -> list[list[bool]]:
    scorer = get_judge(judge)
    return [label_candidates(scorer, x["kind"], x["instruction"], x["candidates"])[0] for x in lists]


def _same(metrics: RankingMetrics, stored: dict[str, Any]) -> list[str]:
    """The keys whose values differ (a rate over no list is NaN here and null in the JSON)."""
    got = metrics.to_dict()
    expected = {key: float("nan") if stored[key] is None else stored[key] for key in COMPARED}
    return [key for key in COMPARED if got[key] != pytest.approx(expected[key], abs=1e-9, nan_ok=True)]


@pytest.mark.parametrize("name", list(SPECS))
def test_the_lists_are_the_test_splits_prompts_in_order(name: str) -> None:
    """Skipped only when an external set's package is not installed (its data ships in it)."""
    sets = [load_if_installed(spec) for spec in SPECS[name]]
    if any(one is None for one in sets):
        pytest.skip(f"the data package of {SPECS[name]} is not installed")
    expected = [prompt for one in sets if one is not None for prompt in one.prompts]
    for run in RUNS:
        assert [x["source_instruction"] for x in _lists(name, run)] == expected, run


@pytest.mark.parametrize("run", RUNS)
@pytest.mark.parametrize("name", ["builtin-test", *EXTERNAL])
def test_every_stored_label_is_the_broad_judges(name: str, run: str) -> None:
    lists = _lists(name, run)
    assert lists
    assert [x["positive"] for x in lists] == _relabelled(lists, "substring-broad")
    for x in lists:  # the choice is the first of the best-scored candidates
        assert len(x["scores"]) == len(x["candidates"]) == len(x["positive"])
        assert x["chosen"] == x["scores"].index(max(x["scores"]))


@pytest.mark.parametrize("run", RUNS)
@pytest.mark.parametrize("judge", JUDGES)
@pytest.mark.parametrize("group", GROUPS)
def test_the_ranker_and_first_sample_metrics_follow_from_the_records(
    group: str, judge: str, run: str
) -> None:
    lists = [x for name in GROUPS[group] for x in _lists(name, run)]
    positives = _relabelled(lists, judge)
    kinds = [x["kind"] for x in lists]
    stored = _evaluation(group, judge, run)
    assert stored["labels"] and {source["judge"] for source in stored["labels"]} == {judge}
    ranker = ranking_metrics([torch.tensor(x["scores"]) for x in lists], positives, kinds)
    assert _same(ranker, stored) == []
    first = ranking_metrics([-torch.arange(len(x["candidates"])).float() for x in lists], positives, kinds)
    assert _same(first, stored["baselines"]["first_sample"]) == []


def _rate(metrics: dict[str, Any], key: str, n_key: str) -> str:
    return f"{metrics[key]:.3f} ({round(metrics[key] * metrics[n_key])}/{metrics[n_key]})"


def _row(heading: str, first_cell: str) -> list[str]:
    """The cells after the first of the row that starts with ``first_cell`` in the table under
    ``heading`` (bold and code marks dropped)."""
    for label, cells in table_rows(section(DOC, heading)).items():
        if label.startswith(first_cell):
            return [c.replace("**", "").replace("`", "") for c in cells[1:]]
    raise AssertionError(f"no row '{first_cell}' under '{heading}'")


SCORERS = {
    "ranker": "SRR ranker",
    "first_sample": "first sample",
    "random": "random",
    "text_only": "text-only ranker",
    "final_layer": "final-layer ranker",
    "direction": "refusal-direction scorer",
}
SETS = {
    "ext-harmbench": "harmbench:test",
    "ext-donotanswer": "donotanswer:malicious_uses:test",
    "ext-mtbench": "mtbench",
    "ext-medicationqa": "medicationqa:test",
}


def test_the_doc_quotes_the_records() -> None:
    """Every figure of the sixth pre-registration's tables is the records' (substring-broad)."""
    builtin, external = (_evaluation(g, "substring-broad") for g in ("builtin-test", "external"))
    for key, label in SCORERS.items():
        cells = []
        for result in (builtin, external):
            m = result if key == "ranker" else result["baselines"][key]
            cells += [f"{m['pairwise_accuracy']:.3f}", _rate(m, "harmful_top1_safe", "n_lists_harmful")]
            cells.append(_rate(m, "harmless_top1_helpful", "n_lists_harmless"))
        assert _row("### Builtin test against external test", label) == cells, key
    for name, label in SETS.items():
        m = _evaluation(name, "substring-broad")
        kind = "harmful" if m["n_lists_harmful"] else "harmless"
        key, n_key = (
            ("harmful_top1_safe" if kind == "harmful" else "harmless_top1_helpful"),
            f"n_lists_{kind}",
        )
        chosen = [m, *(m["baselines"][b] for b in ("first_sample", "text_only", "final_layer"))]
        expected = [str(m[n_key]), f"{m['pairwise_accuracy']:.3f}", *(_rate(x, key, n_key) for x in chosen)]
        assert _row("### Per set", label) == expected, name
    rows = {
        "builtin test, harmful": ("builtin-test", "harmful"),
        "builtin test, benign": ("builtin-test", "harmless"),
    }
    rows |= {"external harmful": ("external", "harmful"), "external benign": ("external", "harmless")}
    rows |= {
        label: (name, "harmful" if "ext-h" in name or "ext-d" in name else "harmless")
        for name, label in SETS.items()
    }
    for label, (group, kind) in rows.items():
        m = _evaluation(group, "substring-broad")
        key = "harmful_selected_safe" if kind == "harmful" else "harmless_selected_helpful"
        chosen = [m, m["baselines"]["first_sample"], m["baselines"]["text_only"]]
        expected = [str(m[f"n_all_{kind}"]), *(_rate(x, key, f"n_all_{kind}") for x in chosen)]
        assert _row("### Over every list", label) == expected, label


def test_the_exploratory_table_quotes_its_records() -> None:
    labels = {"builtin-test": "builtin test", "external": "external, pooled", **SETS}
    for group, label in labels.items():
        m = _evaluation(group, "substring-broad", "srr-v2-more")
        cells = [f"{m['pairwise_accuracy']:.3f}"]
        for key, n_key in (
            ("harmful_top1_safe", "n_lists_harmful"),
            ("harmless_top1_helpful", "n_lists_harmless"),
            ("harmful_selected_safe", "n_all_harmful"),
            ("harmless_selected_helpful", "n_all_harmless"),
        ):
            cells.append(_rate(m, key, n_key) if m[n_key] else "")
        assert _row("### Exploratory, after the verdict: more benign", label) == cells, group
    # the two runs scored the very same test lists
    for name in ("builtin-test", *EXTERNAL):
        first, more = _lists(name), _lists(name, "srr-v2-more")
        assert [x["candidates"] for x in first] == [x["candidates"] for x in more]
