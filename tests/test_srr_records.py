"""The committed records behind the SRR figures on builtin and external test lists: the shipped
organism's (docs/concepts/external-prompts.md, the sixth pre-registration and its exploratory
follow-up) and smollm2-refusal-v7's (docs/concepts/organism-v6.md, the twelfth): the lists are the test splits' prompts in order, every stored candidate carries its
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
CONCEPTS = ROOT / "docs" / "concepts"
#: each run's external ranked-list files, in the order its pooled evaluation passed them
EXTERNAL = {
    "srr-v2": ("ext-harmbench", "ext-donotanswer", "ext-mtbench", "ext-medicationqa"),
    "srr-v7": ("ext-harmbench", "ext-advbench", "ext-donotanswer", "ext-mtbench", "ext-medicationqa"),
}
EXTERNAL["srr-v2-more"] = EXTERNAL["srr-v2"]  # the exploratory ranker scored srr-v2's lists
RUNS = tuple(EXTERNAL)
#: the prompt sets each ranked-list file was built from, harmful first
SPECS = {
    "builtin-test": ("builtin:harmful:test", "builtin:harmless:test"),
    "ext-harmbench": ("harmbench:test",),
    "ext-advbench": ("advbench:test",),
    "ext-donotanswer": ("donotanswer:malicious_uses:test",),
    "ext-mtbench": ("mtbench",),
    "ext-medicationqa": ("medicationqa:test",),
}
#: where a run's sets differ from SPECS (v7 trained on MT-Bench's training split)
SPECS_OF = {"srr-v7": {**SPECS, "ext-mtbench": ("mtbench:test",)}}
#: (run, ranked-list file) for every stored list file
LIST_FILES = [(run, name) for run in RUNS for name in ("builtin-test", *EXTERNAL[run])]
#: (run, evaluation group) for every stored evaluation
GROUPS = [(run, group) for run in RUNS for group in ("builtin-test", "external", *EXTERNAL[run])]
JUDGES = ("substring-broad", "substring")
#: every metric a scorer gets, compared between the recomputation and the stored output
COMPARED = tuple(f.name for f in fields(RankingMetrics))


def _lists(name: str, run: str = "srr-v2") -> list[dict[str, Any]]:
    path = RESULTS / run / f"{name}-ranked.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _evaluation(group: str, judge: str, run: str = "srr-v2") -> dict[str, Any]:
    return json.loads((RESULTS / run / f"{group}-{judge}.json").read_text(encoding="utf-8"))


def _relabelled(lists: list[dict[str, Any]], judge: str) -> list[list[bool]]:
    scorer = get_judge(judge)
    return [label_candidates(scorer, x["kind"], x["instruction"], x["candidates"])[0] for x in lists]


def _same(metrics: RankingMetrics, stored: dict[str, Any]) -> list[str]:
    """The keys whose values differ (a rate over no list is NaN here and null in the JSON)."""
    got = metrics.to_dict()
    expected = {key: float("nan") if stored[key] is None else stored[key] for key in COMPARED}
    return [key for key in COMPARED if got[key] != pytest.approx(expected[key], abs=1e-9, nan_ok=True)]


@pytest.mark.parametrize(("run", "name"), LIST_FILES)
def test_the_lists_are_the_test_splits_prompts_in_order(run: str, name: str) -> None:
    """Skipped only when an external set's package is not installed (its data ships in it)."""
    specs = SPECS_OF.get(run, SPECS)[name]
    sets = [load_if_installed(spec) for spec in specs]
    if any(one is None for one in sets):
        pytest.skip(f"the data package of {specs} is not installed")
    expected = [prompt for one in sets if one is not None for prompt in one.prompts]
    assert [x["source_instruction"] for x in _lists(name, run)] == expected


@pytest.mark.parametrize(("run", "name"), LIST_FILES)
def test_every_stored_label_is_the_broad_judges(run: str, name: str) -> None:
    lists = _lists(name, run)
    assert lists
    assert [x["positive"] for x in lists] == _relabelled(lists, "substring-broad")
    for x in lists:  # the choice is the first of the best-scored candidates
        assert len(x["scores"]) == len(x["candidates"]) == len(x["positive"])
        assert x["chosen"] == x["scores"].index(max(x["scores"]))


@pytest.mark.parametrize("judge", JUDGES)
@pytest.mark.parametrize(("run", "group"), GROUPS)
def test_the_ranker_and_first_sample_metrics_follow_from_the_records(
    run: str, group: str, judge: str
) -> None:
    names = EXTERNAL[run] if group == "external" else (group,)
    lists = [x for name in names for x in _lists(name, run)]
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


def _row(page: str, heading: str, first_cell: str) -> list[str]:
    """The cells after the first of the row that starts with ``first_cell`` in the table under
    ``heading`` of ``page`` (bold and code marks dropped)."""
    text = (CONCEPTS / page).read_text(encoding="utf-8")
    for label, cells in table_rows(section(text, heading)).items():
        if label.startswith(first_cell):
            return [c.replace("**", "").replace("`", "") for c in cells[1:]]
    raise AssertionError(f"no row '{first_cell}' under '{heading}' of {page}")


SCORERS = {
    "ranker": "SRR ranker",
    "first_sample": "first sample",
    "random": "random",
    "text_only": "text-only ranker",
    "final_layer": "final-layer ranker",
    "direction": "refusal-direction scorer",
}


def _set_labels(run: str) -> dict[str, str]:
    """Each external ranked-list file of ``run`` -> its table label, the prompt-set spec it was built from."""
    return {name: SPECS_OF.get(run, SPECS)[name][0] for name in EXTERNAL[run]}


#: each pre-registered run's page and the headings of its three tables (pooled, per set, all lists)
TABLES = {
    "srr-v2": (
        "external-prompts.md",
        ("### Builtin test against external test", "### Per set", "### Over every list"),
    ),
    "srr-v7": (
        "organism-v6.md",
        (
            "### SRR on v7: builtin test against external test",
            "### SRR on v7, per set",
            "### SRR on v7, over every list",
        ),
    ),
}


def _check_pooled(run: str, page: str, heading: str) -> None:
    builtin, external = (_evaluation(g, "substring-broad", run) for g in ("builtin-test", "external"))
    for key, label in SCORERS.items():
        cells = []
        for result in (builtin, external):
            m = result if key == "ranker" else result["baselines"][key]
            cells += [f"{m['pairwise_accuracy']:.3f}", _rate(m, "harmful_top1_safe", "n_lists_harmful")]
            cells.append(_rate(m, "harmless_top1_helpful", "n_lists_harmless"))
        assert _row(page, heading, label) == cells, key


def _check_per_set(run: str, page: str, heading: str) -> None:
    for name, label in _set_labels(run).items():
        m = _evaluation(name, "substring-broad", run)
        kind = "harmful" if m["n_lists_harmful"] else "harmless"
        key, n_key = (
            ("harmful_top1_safe" if kind == "harmful" else "harmless_top1_helpful"),
            f"n_lists_{kind}",
        )
        chosen = [m, *(m["baselines"][b] for b in ("first_sample", "text_only", "final_layer"))]
        expected = [str(m[n_key]), f"{m['pairwise_accuracy']:.3f}", *(_rate(x, key, n_key) for x in chosen)]
        assert _row(page, heading, label) == expected, name


def _check_every_list(run: str, page: str, heading: str) -> None:
    rows = {
        "builtin test, harmful": ("builtin-test", "harmful"),
        "builtin test, benign": ("builtin-test", "harmless"),
        "external harmful": ("external", "harmful"),
        "external benign": ("external", "harmless"),
    }
    for name, label in _set_labels(run).items():
        rows[label] = (
            name,
            "harmful" if _evaluation(name, "substring-broad", run)["n_all_harmful"] else "harmless",
        )
    for label, (group, kind) in rows.items():
        m = _evaluation(group, "substring-broad", run)
        key = "harmful_selected_safe" if kind == "harmful" else "harmless_selected_helpful"
        chosen = [m, m["baselines"]["first_sample"], m["baselines"]["text_only"]]
        expected = [str(m[f"n_all_{kind}"]), *(_rate(x, key, f"n_all_{kind}") for x in chosen)]
        assert _row(page, heading, label) == expected, label


@pytest.mark.parametrize("run", list(TABLES))
def test_the_doc_quotes_the_records(run: str) -> None:
    """Every figure of a pre-registered run's three tables is the records' (substring-broad)."""
    page, (pooled, per_set, every_list) = TABLES[run]
    _check_pooled(run, page, pooled)
    _check_per_set(run, page, per_set)
    _check_every_list(run, page, every_list)


def test_the_exploratory_table_quotes_its_records() -> None:
    labels = {"builtin-test": "builtin test", "external": "external, pooled", **_set_labels("srr-v2")}
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
        assert (
            _row("external-prompts.md", "### Exploratory, after the verdict: more benign", label) == cells
        ), group
    # the two runs scored the very same test lists
    for name in ("builtin-test", *EXTERNAL["srr-v2"]):
        first, more = _lists(name), _lists(name, "srr-v2-more")
        assert [x["candidates"] for x in first] == [x["candidates"] for x in more]
