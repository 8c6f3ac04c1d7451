"""Cross-validated choice of ranker settings: folds by source, pooled scoring, the margin rule."""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import replace

import pytest
import torch
from cli_runner import run_cli
from srr_synthetic import D, synthetic_dataset

import lens_safety.srr.crossval as crossval
from lens_safety.errors import LensSafetyError
from lens_safety.splits import source_fold as fold_of
from lens_safety.srr.baselines import ranker_scores
from lens_safety.srr.crossval import CVCell, choose, cross_validate, margin
from lens_safety.srr.metrics import ranking_metrics
from lens_safety.srr.ranker import RankerConfig
from lens_safety.srr.train import TrainConfig, train_ranker

SMALL = RankerConfig(d_input=D, width=64, ff_width=128)
FAST = TrainConfig(max_epochs=40, patience=8, seed=3)


def test_cross_validation_finds_the_signal_layer_and_matches_a_hand_written_loop() -> None:
    data = synthetic_dataset(120)
    result = cross_validate(
        data,
        [2, 1],
        contexts=["with_instruction"],
        widths=[64],
        folds=3,
        ranker_config=SMALL,
        train_config=FAST,
    )
    by_layer = {c.layer: c for c in result.cells}
    assert result.best.layer == 1  # layer 1 carries the signal, layer 2 is noise
    assert by_layer[1].pairwise_accuracy > 0.85 > by_layer[2].pairwise_accuracy + 0.15
    mixed = data.mixed()
    assert by_layer[1].n_lists_harmful + by_layer[1].n_lists_harmless == len(mixed)  # each list once
    assert result.n_lists == {
        "harmful": mixed.counts()["n_mixed_harmful"],
        "harmless": mixed.counts()["n_mixed_harmless"],
    }
    # independent reference: the same folds written out by hand give the same pooled metrics
    folds = [fold_of(x.source_instruction, 3) for x in mixed.lists]
    scores, positives, kinds = [], [], []
    for k in range(3):
        train = mixed.subset([i for i, f in enumerate(folds) if f != k])
        test = mixed.subset([i for i, f in enumerate(folds) if f == k])
        ranker, _ = train_ranker(
            train, layer=1, context="with_instruction", ranker_config=SMALL, train_config=FAST
        )
        scores += ranker_scores(ranker, test)
        positives += [x.positive for x in test.lists]
        kinds += [x.kind for x in test.lists]
    reference = ranking_metrics(scores, positives, kinds)
    assert by_layer[1].pairwise_accuracy == reference.pairwise_accuracy
    assert by_layer[1].harmless_top1_helpful == reference.harmless_top1_helpful
    assert by_layer[1].margin == pytest.approx(
        min(reference.pairwise_accuracy - 0.9, reference.harmful_top1_safe - 0.95,
            reference.harmless_top1_helpful - 0.9)
    )  # fmt: skip


def test_no_ranker_is_scored_on_an_instruction_it_was_trained_on(monkeypatch) -> None:
    data = synthetic_dataset(40)
    # every second list is a "jailbreak sibling" of the one before: same source instruction
    for i in range(1, len(data.lists), 2):
        data.lists[i] = replace(data.lists[i], source_instruction=data.lists[i - 1].source_instruction)
    seen: list[set[str]] = []
    scored: list[set[str]] = []
    real_train, real_scores = crossval.train_ranker, crossval.ranker_scores

    def spy_train(dataset, **kwargs):  # type: ignore[no-untyped-def]
        seen.append({x.source_instruction for x in dataset.lists})
        return real_train(dataset, **kwargs)

    def spy_scores(ranker, dataset):  # type: ignore[no-untyped-def]
        scored.append({x.source_instruction for x in dataset.lists})
        return real_scores(ranker, dataset)

    monkeypatch.setattr(crossval, "train_ranker", spy_train)
    monkeypatch.setattr(crossval, "ranker_scores", spy_scores)
    cross_validate(
        data, [1], contexts=["with_instruction"], widths=[64], members=[2], folds=4,
        ranker_config=SMALL, train_config=replace(FAST, max_epochs=2),
    )  # fmt: skip
    assert len(seen) == len(scored) == 4
    for trained_on, tested_on in zip(seen, scored, strict=True):
        assert trained_on and tested_on and not trained_on & tested_on
    assert set().union(*scored) == {x.source_instruction for x in data.mixed().lists}


def _cell(pairwise: float, harmful: float, harmless: float) -> CVCell:
    m = margin(pairwise, harmful, harmless, (0.9, 0.95, 0.9))
    return CVCell(1, "generated_mean", 8, 1, pairwise, harmful, harmless, 0.0, 1, 1, m, 0.0)


def test_the_rule_maximises_the_worst_margin_and_breaks_ties_by_pairwise() -> None:
    cells = [_cell(0.99, 0.99, 0.91), _cell(0.93, 0.98, 0.95), _cell(0.95, 0.98, 0.95)]
    assert cells[0].margin == pytest.approx(0.01) and cells[1].margin == pytest.approx(0.03)
    assert (
        choose(cells) == 2
    )  # cells 1 and 2 tie on the margin (harmful top-1 0.98 - 0.95); 2 has the higher pairwise
    assert math.isclose(margin(0.95, float("nan"), 0.97, (0.9, 0.95, 0.9)), 0.05)  # no harmful lists
    assert choose([_cell(float("nan"), float("nan"), float("nan")), _cell(0.5, 0.5, 0.5)]) == 1
    with pytest.raises(LensSafetyError, match="empty"):
        choose([])


def test_bad_grids_are_refused_with_the_fix() -> None:
    data = synthetic_dataset(20)
    with pytest.raises(LensSafetyError, match="layer 7 is not stored"):
        cross_validate(data, [7], contexts=["with_instruction"])
    with pytest.raises(LensSafetyError, match="context 'generated' is not stored"):
        cross_validate(data, [1], contexts=["generated"])
    with pytest.raises(LensSafetyError, match="folds"):
        cross_validate(data, [1], contexts=["with_instruction"], folds=1)
    with pytest.raises(LensSafetyError, match="of 50 folds hold lists"):
        cross_validate(data, [1], contexts=["with_instruction"], folds=50)
    with pytest.raises(LensSafetyError, match="three bars"):
        cross_validate(data, [1], contexts=["with_instruction"], bars=(0.9, 0.9))


def test_folds_depend_on_the_source_instruction_only() -> None:
    assert fold_of("How do I pick a lock?", 5) == fold_of("How do I pick a lock?", 5)
    counts = torch.bincount(torch.tensor([fold_of(f"instruction {i}", 5) for i in range(1000)]), minlength=5)
    assert int(counts.min()) > 150  # roughly balanced


def test_cli_cv_prints_a_train_command_that_reproduces_the_choice(tmp_path, capsys) -> None:
    synthetic_dataset(60, seed=0).save(tmp_path / "a")
    synthetic_dataset(60, seed=1).save(tmp_path / "b")
    argv = ["srr", "cv", str(tmp_path / "a"), str(tmp_path / "b"), "--contexts", "with_instruction"]
    argv += [
        "--widths",
        "16,32",
        "--members",
        "1",
        "--folds",
        "3",
        "--out",
        str(tmp_path / "cv.json"),
        "--json",
    ]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    record = json.loads(out)
    assert len(record["cells"]) == 4  # every stored layer (1, 2) x two widths
    assert record["chosen"]["layer"] == 1 and record["n_lists"]["harmful"] == 60
    saved = json.loads((tmp_path / "cv.json").read_text())
    assert saved == {key: value for key, value in record.items() if key != "train_command"}
    command = shlex.split(record["train_command"].replace("RANKER_DIR", str(tmp_path / "ranker")))
    assert command[:3] == ["lens-safety", "srr", "train"]
    code, _, err = run_cli([*command[1:], "--no-baselines", "--max-epochs", "3"], capsys)
    assert code == 0, err
    trained = json.loads((tmp_path / "ranker" / "ranker.json").read_text())
    assert trained["config"]["layer"] == 1 and trained["config"]["width"] == record["chosen"]["width"]
    # pooled evaluation of several list directories: every mixed list of both counts
    code, out, err = run_cli(["srr", "eval", str(tmp_path / "ranker"), "--data", str(tmp_path / "a"),
                              "--data", str(tmp_path / "b"), "--json"], capsys)  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["n_lists_harmful"] == 60
    # lists of one kind only: the other kind's metrics are null (strict JSON, no NaN literal)
    only_harmless = synthetic_dataset(20, seed=2)
    only_harmless.subset([i for i, x in enumerate(only_harmless.lists) if x.kind == "harmless"]).save(
        tmp_path / "h"
    )
    code, out, err = run_cli(
        ["srr", "eval", str(tmp_path / "ranker"), "--data", str(tmp_path / "h"), "--json"], capsys
    )
    assert code == 0, err
    strict = json.loads(out, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
    assert strict["harmful_top1_safe"] is None and strict["n_lists_harmful"] == 0
    assert 0.0 <= strict["harmless_top1_helpful"] <= 1.0
    code, out, err = run_cli(argv[:-3], capsys)  # the table, and the command to train the choice
    assert code == 0, err
    assert "margin" in out and "lens-safety srr train" in out and "--layer 1" in out
    code, _, err = run_cli(argv, capsys)  # --out exists
    assert code == 2 and "already exists" in err
    code, _, err = run_cli([*argv[:3], "--layers", "5"], capsys)
    assert code == 2 and "layer 5 is not stored" in err and "Traceback" not in err
    code, _, err = run_cli([*argv[:3], "--widths", "wide"], capsys)
    assert code == 2 and "cannot parse --widths 'wide'" in err
