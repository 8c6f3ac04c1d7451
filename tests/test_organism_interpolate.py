"""Weight-space interpolation of two organism adapters: the merged weights lie on the straight line
between the parents' merged weights (float64 reference), peft merges the rank-2r adapter to the
same model, and mismatched or bad inputs are refused without writing anything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lens_safety.errors import LensSafetyError
from lens_safety.hashing import sha256_file, weights_fingerprint
from lens_safety.organism.adapter import materialize_organism
from lens_safety.organism.build import training_records
from lens_safety.organism.files import ADAPTER_FILE, CONFIG_FILE, TRAINING_FILE
from lens_safety.organism.interpolate import interpolate_adapters
from lens_safety.organism.train import TrainingConfig, save_adapter
from lens_safety.testing import make_tiny_model

N_LAYERS = 3


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("interpolate") / "llama", smollm2_dir)


def _random_adapter(base_dir: Path, out_dir: Path, seed: int, rank: int = 4) -> Path:
    """A LoRA adapter with random A and B on blocks 1-2 of ``base_dir`` (peft names and config)."""
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(str(base_dir))
    config = TrainingConfig(rank=rank, alpha=2.0 * rank, first_layer=1)
    shapes = {
        "self_attn.q_proj": (hf.num_attention_heads * hf.head_dim, hf.hidden_size),
        "self_attn.k_proj": (hf.num_key_value_heads * hf.head_dim, hf.hidden_size),
        "self_attn.v_proj": (hf.num_key_value_heads * hf.head_dim, hf.hidden_size),
        "self_attn.o_proj": (hf.hidden_size, hf.num_attention_heads * hf.head_dim),
        "mlp.gate_proj": (hf.intermediate_size, hf.hidden_size),
        "mlp.up_proj": (hf.intermediate_size, hf.hidden_size),
        "mlp.down_proj": (hf.hidden_size, hf.intermediate_size),
    }
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(1, N_LAYERS):
        for module, (d_out, d_in) in shapes.items():
            name = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{name}.lora_A.weight"] = 0.1 * torch.randn(rank, d_in, generator=generator)
            tensors[f"{name}.lora_B.weight"] = 0.1 * torch.randn(d_out, rank, generator=generator)
    file = save_adapter(tensors, config, out_dir, "tiny-llama", n_layers=N_LAYERS)
    record = {
        "adapter_sha256": sha256_file(file),
        "base_weights_sha256": weights_fingerprint(base_dir),
        "config": {"rank": rank, "alpha": 2.0 * rank},
    }
    (out_dir / TRAINING_FILE).write_text(json.dumps(record), encoding="utf-8")
    return out_dir


def _parents(base_dir: Path, tmp_path: Path, seed: int) -> tuple[Path, Path]:
    """Two random adapters on ``base_dir`` (seeds ``seed`` and ``seed + 1``)."""
    return _random_adapter(base_dir, tmp_path / "start", seed), _random_adapter(
        base_dir, tmp_path / "end", seed + 1
    )


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v.to(torch.float64) for k, v in load_file(str(model_dir / "model.safetensors")).items()}


def test_interpolated_weights_lie_on_the_line_between_the_parents(
    tiny_llama: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("LENS_SAFETY_CACHE", str(tmp_path / "cache"))
    start, end = _parents(tiny_llama, tmp_path, seed=1)
    t = 0.3
    record = interpolate_adapters(start, end, t, tmp_path / "mix")
    assert record["adapter_sha256"] == sha256_file(tmp_path / "mix" / ADAPTER_FILE)
    assert json.loads((tmp_path / "mix" / CONFIG_FILE).read_text())["r"] == 8
    w0, w1 = (_weights(materialize_organism(d, base_dir=tiny_llama, name=d.name)) for d in (start, end))
    mixed = _weights(materialize_organism(tmp_path / "mix", base_dir=tiny_llama, name="mix"))
    moved = 0
    for name, w in mixed.items():
        reference = (1 - t) * w0[name] + t * w1[name]
        assert (w - reference).abs().max() < 1e-3 * max(1.0, reference.abs().max().item()), name
        moved += int((w0[name] - w1[name]).abs().max() > 1e-2)
    assert moved == 2 * 7  # every adapted matrix differs between the parents, so the test can fail


def test_peft_merges_the_interpolated_adapter_to_the_same_model(
    tiny_llama: Path, tmp_path: Path, monkeypatch
) -> None:
    """peft, an independent implementation, reads the rank-2r adapter and merges the same weights."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("LENS_SAFETY_CACHE", str(tmp_path / "cache"))
    start, end = _parents(tiny_llama, tmp_path, seed=3)
    interpolate_adapters(start, end, 0.5, tmp_path / "mix")
    ours = materialize_organism(tmp_path / "mix", base_dir=tiny_llama, name="mix")
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(tmp_path / "mix")).merge_and_unload().state_dict()
    weights = load_file(str(ours / "model.safetensors"))
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.2.mlp.down_proj.weight"):
        assert torch.allclose(weights[name], merged[name], atol=1e-5), name


def test_endpoints_are_the_parents(tiny_llama: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LENS_SAFETY_CACHE", str(tmp_path / "cache"))
    start, end = _parents(tiny_llama, tmp_path, seed=5)
    interpolate_adapters(start, end, 0.0, tmp_path / "t0")
    w_start = _weights(materialize_organism(start, base_dir=tiny_llama, name="start"))
    w_t0 = _weights(materialize_organism(tmp_path / "t0", base_dir=tiny_llama, name="t0"))
    assert max((w_start[k] - w_t0[k]).abs().max().item() for k in w_start) < 1e-5


def test_mismatched_or_bad_inputs_are_refused_and_nothing_is_overwritten(
    tiny_llama: Path, tmp_path: Path
) -> None:
    start = _random_adapter(tiny_llama, tmp_path / "start", seed=7)
    other_rank = _random_adapter(tiny_llama, tmp_path / "rank2", seed=8, rank=2)
    with pytest.raises(LensSafetyError, match="differ in rank"):
        interpolate_adapters(start, other_rank, 0.5, tmp_path / "out")
    with pytest.raises(LensSafetyError, match="outside"):
        interpolate_adapters(start, start, 1.5, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(LensSafetyError):
        interpolate_adapters(start, start, 0.5, tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def test_training_records_are_the_fits_behind_an_adapter(tiny_llama: Path, tmp_path: Path) -> None:
    start, end = _parents(tiny_llama, tmp_path, seed=9)
    interpolate_adapters(start, end, 0.5, tmp_path / "mix")
    interpolate_adapters(tmp_path / "mix", tmp_path / "mix", 0.5, tmp_path / "mix2")
    read = [json.loads((d / TRAINING_FILE).read_text()) for d in (start, end, tmp_path / "mix2")]
    assert training_records(read[0]) == [read[0]]
    assert training_records(read[2]) == [read[0], read[1], read[0], read[1]]


def test_cli_writes_and_merges_the_interpolation_and_keeps_an_existing_out(
    tiny_llama: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    from lens_safety.cli import main

    monkeypatch.setenv("LENS_SAFETY_CACHE", str(tmp_path / "cache"))
    start, end = _parents(tiny_llama, tmp_path, seed=11)
    args = ["organism", "interpolate", str(start), str(end), "--t", "0.25", "--base", str(tiny_llama)]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--out", str(tmp_path / "mix"), "--json"])
    assert exit_info.value.code == 0
    said = json.loads(capsys.readouterr().out)
    assert said["interpolation"]["t"] == 0.25 and said["config"] == {"rank": 8, "alpha": 16.0}
    merged = _weights(Path(said["merged"]))
    w0, w1 = (_weights(materialize_organism(d, base_dir=tiny_llama, name=d.name)) for d in (start, end))
    name = "model.layers.2.mlp.up_proj.weight"
    assert (merged[name] - (0.75 * w0[name] + 0.25 * w1[name])).abs().max() < 1e-3
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--out", str(tmp_path / "mix")])
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "organism",
                "interpolate",
                str(start),
                "smollm2-refusal-v9",
                "--t",
                "0.5",
                "--out",
                str(tmp_path / "x"),
            ]
        )
    assert exit_info.value.code == 2 and "neither an adapter directory" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_training_records_follow_continued_fits_to_their_start() -> None:
    """A continued fit's record leads to its start: the embedded record of a directory, the
    shipped record of a shipped organism; a start it cannot find is an error, not a gap."""
    from lens_safety.organism.adapter import shipped_adapter_dir
    from lens_safety.organism.build import read_training_record

    shipped = read_training_record(shipped_adapter_dir("smollm2-refusal"))
    middle = {"config": {"init_adapter": "smollm2-refusal"}, "data": "middle"}
    last = {"config": {"init_adapter": "some/dir"}, "init_record": middle, "data": "last"}
    assert training_records(last) == [last, middle, shipped]
    with pytest.raises(LensSafetyError, match="does not embed its training record"):
        training_records({"config": {"init_adapter": "some/dir"}})


def test_a_fit_from_a_directory_embeds_its_start_record(tiny_llama: Path, tmp_path: Path) -> None:
    from lens_safety.organism.adapter import load_adapter_tensors, shipped_adapter_dir
    from lens_safety.organism.build import start_adapter

    start = _random_adapter(tiny_llama, tmp_path / "start", seed=13)
    tensors, lineage = start_adapter(str(start))
    expected = load_adapter_tensors(start)
    assert tensors.keys() == expected.keys() and all(torch.equal(tensors[k], expected[k]) for k in expected)
    assert lineage["init_adapter_sha256"] == sha256_file(start / ADAPTER_FILE)
    assert lineage["init_record"] == json.loads((start / TRAINING_FILE).read_text())
    _, shipped = start_adapter("smollm2-refusal")
    assert shipped == {
        "init_adapter_sha256": sha256_file(shipped_adapter_dir("smollm2-refusal") / ADAPTER_FILE)
    }
    (start / ADAPTER_FILE).write_bytes(
        (start / ADAPTER_FILE).read_bytes()[:-1] + b"\0"
    )  # not what it recorded
    with pytest.raises(LensSafetyError, match="tampered or corrupted"):
        start_adapter(str(start))
