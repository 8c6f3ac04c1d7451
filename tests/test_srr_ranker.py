"""SRR ranker, loss, metrics, training and baselines on synthetic lists with a known answer."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from srr_synthetic import IDENTITY, D, synthetic_dataset

from lens_safety.errors import LensSafetyError
from lens_safety.srr.baselines import load_baselines, train_baselines
from lens_safety.srr.combine import concat_datasets, load_datasets
from lens_safety.srr.evaluate import evaluate
from lens_safety.srr.experiments import category_transfer, layer_sweep
from lens_safety.srr.metrics import ndcg, pairwise, ranking_metrics
from lens_safety.srr.ranker import RankerConfig, SafetyRanker, listwise_loss, load_ranker, save_ranker
from lens_safety.srr.train import TrainConfig, train_ranker

FAST = TrainConfig(max_epochs=40, patience=8, seed=0)


def test_loss_matches_float64_reference() -> None:
    scores = torch.tensor([[2.0, -1.0, 0.5, 0.0], [0.3, 0.1, 0.0, 0.0]])
    positive = torch.tensor([[True, False, True, False], [False, True, False, False]])
    valid = torch.tensor([[True, True, True, True], [True, True, False, False]])
    expected = []
    for s, y, v in zip(scores.double(), positive, valid, strict=True):
        s, y = s[v], y[v]
        log_p = s - torch.logsumexp(s, 0)
        k = int(y.sum())
        expected.append(sum((1 / k) * (math.log(1 / k) - float(log_p[i])) for i in range(len(s)) if y[i]))
    got = listwise_loss(scores, positive, valid)
    assert abs(float(got) - sum(expected) / 2) < 1e-6
    # the loss vanishes when all mass sits uniformly on the positives
    perfect = torch.tensor([[5.0, -1e4, 5.0]])
    assert (
        float(listwise_loss(perfect, torch.tensor([[True, False, True]]), torch.ones(1, 3, dtype=torch.bool)))
        < 1e-6
    )


def test_metrics_against_brute_force() -> None:
    s = torch.tensor([0.9, 0.9, 0.1, 0.5])
    y = [False, True, True, False]
    credit, pairs = pairwise(s, y)
    brute = sum(
        1.0 if s[p] > s[n] else 0.5 if s[p] == s[n] else 0.0 for p, n in itertools.product([1, 2], [0, 3])
    )
    assert (credit, pairs) == (brute, 4)
    # stable tie-break: candidate 0 (negative) is ranked first -> ranks (0, 1, 3, 2)
    assert abs(ndcg(s, y) - (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3))) < 1e-9
    m = ranking_metrics(
        [s, torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])],
        [y, [True, True], [True, False]],
        ["harmful", "harmless", "harmless"],
    )
    assert m.n_lists_harmful == 1 and m.n_lists_harmless == 1  # the all-positive list is skipped
    assert m.harmful_top1_safe == 0.0 and m.harmless_top1_helpful == 0.0
    # over EVERY list: the all-positive harmless list yields a positive, the mixed ones do not
    assert (m.n_all_harmful, m.n_all_harmless) == (1, 2)
    assert m.harmful_selected_safe == 0.0 and m.harmless_selected_helpful == 0.5
    flipped = ranking_metrics(
        [torch.tensor([0.0, 1.0]), torch.tensor([0.0, 1.0])], [[False, False], [False, True]], ["harmful"] * 2
    )
    assert flipped.n_lists_harmful == 1 and flipped.n_all_harmful == 2  # the all-negative list counts here
    assert flipped.harmful_top1_safe == 1.0 and flipped.harmful_selected_safe == 0.5
    assert abs(m.pairwise_accuracy - (brute / 4 + 0.0) / 2) < 1e-9


def test_ranker_is_permutation_equivariant_and_padding_invariant() -> None:
    torch.manual_seed(0)
    ranker = SafetyRanker(RankerConfig(d_input=D, width=32, n_heads=4, ff_width=64)).eval()
    inst, resp = torch.randn(1, D), torch.randn(1, 5, D)
    scores = ranker(inst, resp)[0]
    perm = torch.tensor([3, 0, 4, 1, 2])
    assert torch.allclose(ranker(inst, resp[:, perm])[0], scores[perm], atol=1e-5)
    padded = torch.cat([resp, torch.randn(1, 2, D) * 100], dim=1)
    valid = torch.tensor([[True] * 5 + [False] * 2])
    out = ranker(inst, padded, valid)[0]
    assert torch.allclose(out[:5], scores, atol=1e-5) and torch.isinf(out[5:]).all()
    assert (scores.abs() <= 1 / ranker.config.tau + 1e-4).all()  # cosine / tau


def test_parameter_budget() -> None:
    assert SafetyRanker(RankerConfig(d_input=576)).n_parameters() < 5_000_000
    with pytest.raises(LensSafetyError, match="parameters"):
        SafetyRanker(RankerConfig(d_input=4096, width=1024, ff_width=4096))


def test_training_learns_the_signal_and_beats_baselines(tmp_path: Path) -> None:
    train, test = synthetic_dataset(160, seed=0), synthetic_dataset(40, seed=1)
    ranker, report = train_ranker(train, layer=1, train_config=FAST)
    assert report.n_train_lists + report.n_val_lists == 160 and report.n_val_lists > 0
    train_baselines(
        train,
        tmp_path,
        layer=1,
        context="with_instruction",
        ranker_config=None,
        train_config=FAST,
        base_model=IDENTITY,
    )
    result = evaluate(ranker, test, load_baselines(tmp_path))
    assert result.ranker.pairwise_accuracy > 0.9
    assert result.ranker.harmful_top1_safe >= 0.9 and result.ranker.harmless_top1_helpful >= 0.9
    assert set(result.baselines) == {"first_sample", "random", "text_only", "final_layer", "direction"}
    for name in ("first_sample", "random", "text_only", "final_layer"):
        assert result.beats(name), name
        assert result.baselines[name].pairwise_accuracy < 0.75, name
    # refusal-ness of responses lies off the instruction direction here, so one direction cannot rank
    assert result.beats("direction") and result.baselines["direction"].pairwise_accuracy < 0.75
    as_dict = result.to_dict()
    for key in (
        "pairwise_accuracy",
        "harmful_top1_safe",
        "harmless_top1_helpful",
        "n_lists_harmful",
        "n_lists_harmless",
    ):
        assert key in as_dict and key in as_dict["baselines"]["text_only"]


def test_direction_scorer_ranks_when_responses_share_the_instruction_axis() -> None:
    from lens_safety.srr.baselines import DirectionScorer

    train, test = synthetic_dataset(80, 0, response_axis=0), synthetic_dataset(40, 1, response_axis=0)
    scorer = DirectionScorer.fit(train, layer=1, context="with_instruction")
    assert abs(float(scorer.direction.norm()) - 1) < 1e-5 and abs(float(scorer.direction[0])) > 0.8
    metrics = ranking_metrics(
        scorer.scores(test), [x.positive for x in test.lists], [x.kind for x in test.lists]
    )
    assert metrics.pairwise_accuracy > 0.9


def test_training_is_deterministic_with_a_seed() -> None:
    data = synthetic_dataset(40)
    a, _ = train_ranker(data, layer=1, train_config=TrainConfig(max_epochs=5, seed=3))
    b, _ = train_ranker(data, layer=1, train_config=TrainConfig(max_epochs=5, seed=3))
    c, _ = train_ranker(data, layer=1, train_config=TrainConfig(max_epochs=5, seed=4))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_save_load_roundtrip_and_model_check(tmp_path: Path) -> None:
    data = synthetic_dataset(20)
    ranker, _ = train_ranker(data, layer=1, train_config=TrainConfig(max_epochs=2))
    save_ranker(ranker, tmp_path / "r", IDENTITY)

    class Fake:
        def __init__(self, sha: str) -> None:
            self.sha = sha

        def identity(self) -> dict:
            return {**IDENTITY, "spec": "other", "weights_sha256": self.sha}

    loaded = load_ranker(tmp_path / "r", Fake(IDENTITY["weights_sha256"]))
    inst, resp = data.instruction_features(1)[:1], data.response_features(0, 1, "with_instruction")[None]
    assert torch.equal(loaded(inst, resp), ranker(inst, resp))
    with pytest.raises(LensSafetyError, match="trained on synthetic"):
        load_ranker(tmp_path / "r", Fake("b" * 64))
    with pytest.raises(LensSafetyError, match="holds no SRR ranker"):
        load_ranker(tmp_path / "missing")


def test_layer_sweep_and_category_transfer() -> None:
    train, test = synthetic_dataset(60, seed=0), synthetic_dataset(30, seed=1)
    rows = layer_sweep(train, test, contexts=["with_instruction"], train_config=FAST)
    by_layer = {r.layer: r for r in rows}
    assert by_layer[1].pairwise_accuracy > 0.9 > by_layer[2].pairwise_accuracy + 0.2
    result = category_transfer(synthetic_dataset(80), ["weapons", "drugs"], layer=1, train_config=FAST)
    assert result["test_categories"] == ["fraud", "hacking"]
    assert result["transfer"]["pairwise_accuracy"] > 0.85
    with pytest.raises(LensSafetyError, match="categories"):
        category_transfer(train, ["nope"], layer=1)


def test_concat_datasets_keeps_every_list_with_its_own_features(tmp_path: Path) -> None:
    first, second = synthetic_dataset(7, seed=1), synthetic_dataset(5, seed=2)
    second.responses["generated"] = second.responses["response_only"].clone()  # only one part has it
    first.save(tmp_path / "a")
    second.save(tmp_path / "b")
    both = load_datasets([tmp_path / "a", tmp_path / "b"])
    assert [x.instruction for x in both.lists] == [x.instruction for x in [*first.lists, *second.lists]]
    assert sorted(both.responses) == ["response_only", "with_instruction"]
    for i, (part, j) in enumerate([(first, j) for j in range(7)] + [(second, j) for j in range(5)]):
        assert torch.equal(
            both.response_features(i, 1, "with_instruction"), part.response_features(j, 1, "with_instruction")
        )
        assert torch.equal(both.instruction_features(2)[i], part.instruction_features(2)[j])
    assert [p["name"] for p in both.meta["parts"]] == [str(tmp_path / "a"), str(tmp_path / "b")]
    assert (
        both.mixed().counts()["n_mixed_harmless"]
        == first.counts()["n_mixed_harmless"] + second.counts()["n_mixed_harmless"]
    )
    other_model = synthetic_dataset(3, seed=3)
    other_model.meta = {"model": {**IDENTITY, "weights_sha256": "b" * 64}}
    with pytest.raises(LensSafetyError, match="another model"):
        concat_datasets([first, other_model])
    other_layers = synthetic_dataset(3, seed=3)
    other_layers.layers = (1, 3)
    with pytest.raises(LensSafetyError, match="layers"):
        concat_datasets([first, other_layers])


def test_ensemble_averages_independently_trained_members(tmp_path: Path) -> None:
    data = synthetic_dataset(30)
    small = RankerConfig(d_input=D, width=8, ff_width=16)
    config = TrainConfig(max_epochs=4, seed=5)
    ensemble, report = train_ranker(
        data, layer=1, ranker_config=replace(small, members=3), train_config=config
    )
    singles = [
        train_ranker(data, layer=1, ranker_config=small, train_config=replace(config, seed=5 + k))[0]
        for k in range(3)
    ]
    assert ensemble.config.members == 3 and len(report.members) == 3
    assert ensemble.n_parameters() == 3 * singles[0].n_parameters()
    inst, resp = (
        data.instruction_features(1)[:2],
        torch.stack([data.response_features(i, 1, "with_instruction")[:3] for i in range(2)]),
    )
    expected = torch.stack([s(inst, resp).double() for s in singles]).mean(0)
    assert torch.allclose(ensemble(inst, resp).double(), expected, atol=1e-5)
    assert not torch.allclose(singles[0](inst, resp), singles[1](inst, resp))  # members differ
    save_ranker(ensemble, tmp_path / "e", IDENTITY)
    loaded = load_ranker(tmp_path / "e")
    assert loaded.config.members == 3 and torch.equal(loaded(inst, resp), ensemble(inst, resp))
    # a one-member ranker saved before ensembles existed (no "members." prefix) still loads
    single_state = {k.removeprefix("members.0."): v for k, v in singles[0].state_dict().items()}
    save_ranker(singles[0], tmp_path / "old", IDENTITY)
    save_file(single_state, str(tmp_path / "old" / "ranker.safetensors"))
    assert torch.equal(load_ranker(tmp_path / "old")(inst, resp), singles[0](inst, resp))
    with pytest.raises(LensSafetyError, match="member"):
        SafetyRanker(replace(small, members=0))


def test_ranker_options_default_to_the_config_dataclasses_and_reject_unknown_names() -> None:
    """``train_ranker_directory``'s options have one home for their defaults: with none given the
    configs are the dataclasses' own; a given width sets the feed-forward width to twice it; a
    misspelt option or an invalid value is one error before any training."""
    from lens_safety.srr.train import TrainConfig
    from lens_safety.srr.train_job import ranker_configs

    assert ranker_configs(D, {}) == (RankerConfig(d_input=D), TrainConfig())
    shape, fit = ranker_configs(D, {"width": 16, "seed": 7, "weight_decay": 0.0})
    assert (shape.width, shape.ff_width, fit.seed, fit.weight_decay) == (16, 32, 7, 0.0)
    with pytest.raises(LensSafetyError, match=r"unknown ranker option.*widht"):
        ranker_configs(D, {"widht": 16})  # type: ignore[typeddict-unknown-key]
    with pytest.raises(LensSafetyError, match="invalid ranker settings"):
        ranker_configs(D, {"dropout": 1.0})


def test_invalid_ranker_settings_fail_before_the_lists_are_read(tmp_path) -> None:
    """The settings are checked before any data directory is opened: a missing one is not reached."""
    from lens_safety.srr.train_job import train_ranker_directory

    with pytest.raises(LensSafetyError, match="invalid ranker settings"):
        train_ranker_directory([tmp_path / "no-such-lists"], tmp_path / "ranker", dropout=1.0)
    with pytest.raises(LensSafetyError, match=r"unknown ranker option.*widht"):
        train_ranker_directory([tmp_path / "no-such-lists"], tmp_path / "ranker", widht=4)  # type: ignore[call-arg]
    assert not (tmp_path / "ranker").exists()
