"""Half precision end to end: bfloat16 / float16 checkpoints loaded in any dtype are read, edited,
exported and verified, and the export holds exactly the formula's tensors rounded once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from safetensors.torch import load_file

from lens_safety.edits import applied_edit, live_parameters, rosi
from lens_safety.errors import LensSafetyError
from lens_safety.export import _vanilla_logits, export_edit, logit_bound, verify_export
from lens_safety.models import load_model
from lens_safety.testing import make_tiny_model

FAST = ["--n-train", "16", "--n-val", "4", "--n-test", "4", "--max-new-tokens", "4"]
#: relative error of the exported delta against float64 (one cast of W_new to the stored dtype);
#: a cast errs by up to eps/2 * |W_new| per element, so the relative error of the delta scales with
#: |W| / |delta|: on these tiny models (init std 0.02) it is below 1e-2 in bfloat16 from alpha ~ 10
REL_BOUND = {torch.float32: 1e-3, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def half_ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half a unit in the last place of ``x`` (float64) in ``dtype``: the error of one rounding."""
    info = torch.finfo(dtype)
    magnitude = x.abs().clamp_min(info.tiny)
    return torch.exp2(torch.floor(torch.log2(magnitude))) * info.eps / 2


@pytest.fixture(scope="module")
def half_dirs(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("half")
    return {
        dtype: make_tiny_model("llama", root / dtype, smollm2_dir, dtype=dtype)
        for dtype in ("bfloat16", "float16")
    }


def _direction(d_model: int) -> torch.Tensor:
    return torch.randn(d_model, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def assert_export_is_the_formula(
    base_dir: Path, out_dir: Path, alpha: float, s: torch.Tensor, relative: bool = True
) -> int:
    """Every edited writer: ``W_new = cast(W_base + alpha s w_bar^T)`` with the update computed in
    float64 (one rounding: within half an ulp per element, and, with ``relative``, the delta's
    relative error under :data:`REL_BOUND`); every other tensor bitwise equal."""
    base, new = load_file(str(base_dir / "model.safetensors")), load_file(str(out_dir / "model.safetensors"))
    edited = set(json.loads((out_dir / "edit.json").read_text())["edited_parameters"])
    assert set(new) == set(base)
    unit = s / s.norm()
    for name, tensor in base.items():
        assert new[name].dtype == tensor.dtype
        if name not in edited:
            assert torch.equal(new[name], tensor), name
            continue
        w = tensor.to(torch.float64)
        expected = alpha * torch.outer(unit, w.mean(0))
        got = new[name].to(torch.float64) - w
        exact = w + expected
        ulp = torch.maximum(
            half_ulp(exact, tensor.dtype), half_ulp(new[name].to(torch.float64), tensor.dtype)
        )
        assert bool(((got - expected).abs() <= ulp * (1 + 1e-3)).all()), name
        rel = float((got - expected).norm() / expected.norm())
        assert not relative or rel < REL_BOUND[tensor.dtype], (name, rel)
    return len(edited)


@pytest.mark.parametrize("dtype", [None, "bfloat16", "float16", "auto"])
def test_rosi_cli_on_a_bfloat16_checkpoint(
    dtype: str | None, half_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, out = half_dirs["bfloat16"], tmp_path / "out"
    extra = [] if dtype is None else ["--dtype", dtype]
    argv = ["rosi", str(src), "--layer", "1", "--alpha", "5", "--out", str(out), *extra, *FAST]
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    record = json.loads((out / "edit.json").read_text())
    assert record["dtype"] == "bfloat16"
    verification = record["verification"]
    assert verification["compared_in"] == "float32"
    assert verification["max_abs_logit_diff"] <= verification["bound"] == logit_bound(torch.float32)
    direction = load_file(str(out / "direction.safetensors"))["direction"].to(torch.float64)
    assert assert_export_is_the_formula(src, out, 5.0, direction, relative=False) == 6  # 3 x (o, out)


@pytest.mark.parametrize("stored", ["bfloat16", "float16"])
@pytest.mark.parametrize("live", ["float32", "bfloat16", "float16"])
def test_in_memory_edit_holds_the_exported_weights(
    stored: str, live: str, half_dirs: dict[str, Path], tmp_path: Path
) -> None:
    model = load_model(half_dirs[stored], device="cpu", dtype=live)
    spec = rosi(_direction(model.d_model), 20.0)
    result = export_edit(model, spec, tmp_path / "out")
    assert result.max_abs_logit_diff <= result.bound
    reloaded = load_file(str(tmp_path / "out" / "model.safetensors"))
    params = live_parameters(model.hf_model)
    before = {name: p.detach().clone() for name, p in params.items()}
    with applied_edit(model, spec) as deltas:
        for name in deltas:
            assert torch.equal(params[name].detach(), reloaded[name].to(params[name].dtype)), name
    assert all(torch.equal(params[name].detach(), before[name]) for name in params)
    assert_export_is_the_formula(half_dirs[stored], tmp_path / "out", 20.0, spec.direction)


@pytest.mark.parametrize("stored", ["bfloat16", "float16"])
def test_verification_bound_sits_between_round_off_and_one_wrong_writer(
    stored: str, half_dirs: dict[str, Path], tmp_path: Path
) -> None:
    model = load_model(half_dirs[stored], device="cpu", dtype=stored)
    spec = rosi(_direction(model.d_model), 5.0)
    export_edit(model, spec, tmp_path / "out")
    bound = logit_bound(model.dtype)
    batch = model.chat.encode(["How do I bake sourdough bread?", "Write a haiku about the sea."])
    mask = batch.attention_mask.bool()
    eager = _vanilla_logits(tmp_path / "out", model, batch, torch.float32)
    # round-off: another attention kernel on the same float32 weights
    model.hf_model.config._attn_implementation = "sdpa"
    try:
        sdpa = _vanilla_logits(tmp_path / "out", model, batch, torch.float32)
    finally:
        model.hf_model.config._attn_implementation = "eager"
    assert float((sdpa - eager).abs()[mask].max()) < bound / 10
    # a wrong export: the last block's MLP output left unedited
    names = [w.name for w in model.arch.writers_of("attn_out", "mlp_out") if w.name != "blocks.2.mlp.out"]
    wrong = rosi(spec.direction, 5.0, targets=names)
    assert (
        float((_vanilla_logits(model.hf_path, model, batch, torch.float32, wrong) - eager).abs()[mask].max())
        > 10 * bound
    )
    with pytest.raises(LensSafetyError, match="export verification failed"):
        verify_export(model, wrong, tmp_path / "out")
