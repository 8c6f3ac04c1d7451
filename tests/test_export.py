"""Export: exact formula in the saved weights, vanilla reload, compat == raw, tying, lineage, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import lens_safety.export as export_module
from lens_safety.edits import orthogonalize, rosi
from lens_safety.errors import LensSafetyError
from lens_safety.export import export_edit
from lens_safety.hashing import weights_fingerprint
from lens_safety.models import load_model

ALPHA = 25.0


def _state(path: Path) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _direction(width: int) -> torch.Tensor:
    return torch.randn(width, generator=torch.Generator().manual_seed(11))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_exported_rosi_weights_equal_the_formula(
    tiny_dirs: dict[str, Path], tmp_path: Path, arch: str
) -> None:
    model = load_model(tiny_dirs[arch], device="cpu")
    s = _direction(model.d_model)
    result = export_edit(model, rosi(s, ALPHA), tmp_path / "out")
    assert result.max_abs_logit_diff <= 1e-4 and not result.untied
    base, new = _state(tiny_dirs[arch]), _state(tmp_path / "out")  # vanilla transformers, both
    assert base.keys() == new.keys()
    s_hat = (s / s.norm()).double()
    edited = set(result.edit["edited_parameters"])
    assert len(edited) == (4 * 3 if arch == "gpt2" else 2 * 3)  # weights (+ biases) of 3 blocks x 2 writers
    for name in base:
        if name not in edited:
            assert torch.equal(base[name], new[name]), name
            continue
        w = base[name].double()
        if w.ndim == 1:  # bias: one more write vector
            expected = ALPHA * s_hat * w.mean()
        elif arch == "gpt2":  # Conv1D (d_in, d_model): the HF-maths W is w.T
            expected = (ALPHA * torch.outer(s_hat, w.T.mean(0))).T
        else:
            expected = ALPHA * torch.outer(s_hat, w.mean(0))
        delta = new[name].double() - w
        assert (delta - expected).norm() / expected.norm() < 1e-3, name
    assert new["lm_head.weight"].data_ptr() != 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config.get("tie_word_embeddings", arch == "gpt2") == (arch == "gpt2")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_compatibility_mode_exports_the_same_weights(
    tiny_dirs: dict[str, Path], tmp_path: Path, arch: str
) -> None:
    s = _direction(64)
    raw = load_model(tiny_dirs[arch], device="cpu")
    export_edit(raw, rosi(s, ALPHA), tmp_path / "raw")
    compat = load_model(tiny_dirs[arch], device="cpu", compatibility_mode=True)
    result = export_edit(compat, rosi(s, ALPHA), tmp_path / "compat")
    assert result.edit["from_compatibility_mode"] and result.max_abs_logit_diff <= 1e-4
    with (
        safe_open(str(tmp_path / "raw" / "model.safetensors"), "pt") as a,
        safe_open(str(tmp_path / "compat" / "model.safetensors"), "pt") as b,
    ):
        assert set(a.keys()) == set(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())  # noqa: SIM118


def test_orthogonalised_export_unties_and_equals_ablation(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    model = load_model(tiny_dirs["gpt2"], device="cpu")  # tied embeddings, pos_embed, biases
    s = _direction(model.d_model)
    result = export_edit(model, orthogonalize(s), tmp_path / "out")
    assert result.untied and result.edit["untied"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    base, new = _state(tiny_dirs["gpt2"]), _state(tmp_path / "out")
    assert torch.equal(new["lm_head.weight"], base["transformer.wte.weight"])  # original unembedding kept
    s_hat = s / s.norm()
    for name in ("transformer.wte.weight", "transformer.wpe.weight"):
        assert (new[name].double() @ s_hat.double()).abs().max() < 1e-5
    # the exported model reproduces inference-time ablation
    from lens_safety.interventions import ablate_direction

    batch = model.chat.encode(["How do I bake bread?"])
    with torch.inference_mode(), ablate_direction(model, s):
        ablated = model.hf_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32)
    with torch.inference_mode():
        exported = reloaded(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert (exported - ablated).abs().max() < 1e-4


def test_edit_json_model_card_and_lineage(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    model = load_model(tiny_dirs["llama"], device="cpu")
    measurements = {"harmful_refusal": {"before": 0.1, "after": 0.9}}
    export_edit(
        model, rosi(_direction(64), ALPHA, direction_layer=2), tmp_path / "out", measurements=measurements
    )
    record = json.loads((tmp_path / "out" / "edit.json").read_text())
    for key in (
        "method",
        "alpha",
        "layer",
        "targets",
        "base_model",
        "base_weights_sha256",
        "direction_sha256",
        "lens_safety_version",
        "verification",
        "untied",
    ):
        assert key in record, key
    assert record["base_weights_sha256"] == model.weights_hash and record["layer"] == 2
    card = (tmp_path / "out" / "README.md").read_text()
    assert "rosi" in card and "| harmful_refusal | 0.1 | 0.9 |" in card
    with safe_open(str(tmp_path / "out" / "direction.safetensors"), "pt") as handle:
        saved = handle.get_tensor("direction")
    assert torch.allclose(saved.double(), rosi(_direction(64), 1.0).direction, atol=1e-7)
    exported = load_model(tmp_path / "out", device="cpu")
    assert exported.lineage["base_weights_sha256"] == model.weights_hash
    assert exported.lineage["method"] == "rosi"
    assert exported.lineage["ancestors_weights_sha256"] == []


def test_lineage_chains_through_repeated_edits(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    """An edit of an edited model records its grandparent, so the grandparent's direction loads silently."""
    import warnings

    from lens_safety.directions import Direction, load_direction

    base = load_model(tiny_dirs["llama"], device="cpu")
    Direction(torch.randn(base.n_layers, base.d_model), 1, -1, "mean-diff", {"model": base.identity()}).save(
        tmp_path / "dir"
    )
    export_edit(base, orthogonalize(_direction(64)), tmp_path / "child")
    child = load_model(tmp_path / "child", device="cpu")
    export_edit(child, rosi(_direction(64), ALPHA), tmp_path / "grandchild")
    grandchild = load_model(tmp_path / "grandchild", device="cpu")
    assert grandchild.lineage["base_weights_sha256"] == child.weights_hash
    assert grandchild.lineage["ancestors_weights_sha256"] == [base.weights_hash]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_direction(tmp_path / "dir", grandchild)


def test_output_checks(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    model = load_model(tiny_dirs["llama"], device="cpu")
    spec = rosi(_direction(64), ALPHA)
    with pytest.raises(LensSafetyError, match="overlaps the input"):
        export_edit(model, spec, tiny_dirs["llama"] / "edited")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(LensSafetyError, match="already exists"):
        export_edit(model, spec, tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    export_edit(model, spec, tmp_path / "taken", overwrite=True)
    assert not (tmp_path / "taken" / "keep.txt").exists() and (tmp_path / "taken" / "edit.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no temporary siblings left


def test_disk_error_mid_export_leaves_nothing(
    tiny_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = load_model(tiny_dirs["llama"], device="cpu")
    before = weights_fingerprint(tiny_dirs["llama"])
    original_copy = shutil.copy2
    calls = {"n": 0}

    def failing_copy(src, dst, *args, **kwargs):  # the weights are written; a side file then fails
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return original_copy(src, dst, *args, **kwargs)

    monkeypatch.setattr(shutil, "copy2", failing_copy)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "keep.txt").write_text("mine")
    with pytest.raises(LensSafetyError, match="No space left"):
        export_edit(model, rosi(_direction(64), ALPHA), tmp_path / "new")
    with pytest.raises(LensSafetyError, match="No space left"):
        calls["n"] = 0
        export_edit(model, rosi(_direction(64), ALPHA), tmp_path / "old", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    assert (tmp_path / "old" / "keep.txt").read_text() == "mine"
    assert weights_fingerprint(tiny_dirs["llama"]) == before


def test_failed_verification_leaves_nothing(
    tiny_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = load_model(tiny_dirs["llama"], device="cpu")
    monkeypatch.setattr(export_module, "logit_bound", lambda dtype: -1.0)  # any difference now fails
    with pytest.raises(LensSafetyError, match="verification failed"):
        export_edit(model, rosi(_direction(64), ALPHA), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_smollm2_rosi_export_verifies(tmp_path: Path) -> None:
    model = load_model("smollm2", device="cpu")  # own copy: verification edits it in place, reversibly
    result = export_edit(model, rosi(_direction(model.d_model), 30.0), tmp_path / "out")
    assert result.max_abs_logit_diff <= 1e-4 and not result.untied
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config.get("tie_word_embeddings", True) is True
    assert (tmp_path / "out" / "chat_template.jinja").is_file() or "chat_template" in (
        tmp_path / "out" / "tokenizer_config.json"
    ).read_text()


def test_streamed_export_is_bitwise_the_pure_edit_and_carries_extra_files(
    tiny_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """The copy-and-patch writer produces exactly compute_edit's tensors; other bytes are untouched."""
    from safetensors.torch import load_file

    from lens_safety.edits import amplify, compute_edit
    from lens_safety.edits.checkpoint import checkpoint_writers

    model = load_model(tiny_dirs["llama"], device="cpu")
    spec = amplify(_direction(64), 0.7, layers=[0, 2])
    export_edit(model, spec, tmp_path / "out", extra_files={"calibration.json": "{}"})
    base = load_file(str(tiny_dirs["llama"] / "model.safetensors"))
    new = load_file(str(tmp_path / "out" / "model.safetensors"))
    expected = compute_edit(spec, base, checkpoint_writers(model))
    assert sorted(expected) == sorted(
        json.loads((tmp_path / "out" / "edit.json").read_text())["edited_parameters"]
    )
    assert len(expected) == 4 and base.keys() == new.keys()
    for name in base:
        assert torch.equal(new[name], expected.get(name, base[name])), name
    assert (tmp_path / "out" / "calibration.json").read_text() == "{}"
    for bad in ("config.json", "edit.json", "../x.txt", "w.safetensors"):
        with pytest.raises(LensSafetyError, match="not allowed"):
            export_edit(model, spec, tmp_path / "other", extra_files={bad: "x"})
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("method", ["rosi", "orthogonalize"])
def test_sharded_checkpoint_exports_shard_by_shard(
    tiny_dirs: dict[str, Path], tmp_path: Path, method: str
) -> None:
    """A checkpoint split over several shards (+ index) exports the same weights as a single file."""
    sharded = tmp_path / "sharded"
    vanilla = AutoModelForCausalLM.from_pretrained(str(tiny_dirs["gpt2"]), dtype=torch.float32)
    vanilla.save_pretrained(str(sharded), max_shard_size="100KB")
    for item in tiny_dirs["gpt2"].iterdir():  # tokenizer and chat template
        if item.suffix != ".safetensors" and not (sharded / item.name).exists():
            (sharded / item.name).write_bytes(item.read_bytes())
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) > 2 and (sharded / "model.safetensors.index.json").is_file()
    s = _direction(vanilla.config.n_embd)
    spec = rosi(s, ALPHA) if method == "rosi" else orthogonalize(s)
    from_shards = export_edit(load_model(sharded, device="cpu"), spec, tmp_path / "a")
    from_single = export_edit(load_model(tiny_dirs["gpt2"], device="cpu"), spec, tmp_path / "b")
    assert from_shards.max_abs_logit_diff <= 1e-4
    index = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) <= {p.name for p in (tmp_path / "a").glob("*.safetensors")}
    a, b = _state(tmp_path / "a"), _state(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert from_shards.untied == (method == "orthogonalize")
    assert sorted(from_shards.edit["edited_parameters"]) == sorted(from_single.edit["edited_parameters"])
