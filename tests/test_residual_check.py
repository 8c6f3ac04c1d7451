"""``load_model`` checks that the bridge's ``resid_pre`` is the residual stream (HF ``hidden_states``)
and refuses, in one line, architectures whose hook points read something else or that the bridge
cannot run; correct architectures pass with no difference at all, in float32 and bfloat16."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lens_safety.arch_matrix.configs import build_tiny
from lens_safety.errors import LensSafetyError
from lens_safety.models import load_model
from lens_safety.residual_check import CHECK_TEXT, check_residual_reads, residual_error


@pytest.mark.parametrize(
    ("model_type", "message"),
    [
        ("mamba", "resid_pre of MambaForCausalLM differs from its Hugging Face hidden states"),
        ("falcon_mamba", "resid_pre of FalconMambaForCausalLM differs from its Hugging Face hidden states"),
        ("codegen", "TransformerBridge cannot run CodeGenForCausalLM (AttributeError"),
    ],
)
def test_architectures_the_bridge_reads_wrongly_are_refused_at_load(
    model_type: str, message: str, tmp_path: Path, smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = build_tiny(model_type, tmp_path / model_type, smollm2_dir)
    with pytest.raises(LensSafetyError, match=r"how-to/architectures\.md") as caught:
        load_model(path, device="cpu")
    assert message in str(caught.value) and "\n" not in str(caught.value)
    monkeypatch.setenv("LENS_SAFETY_SKIP_SELFCHECK", "1")  # skipped knowingly: it loads
    if model_type != "codegen":
        assert load_model(path, device="cpu").n_layers == 2


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("model_type", ["llama", "qwen3", "mixtral", "gemma3_text"])
def test_correct_reads_pass_with_no_difference(
    model_type: str, dtype: str, tmp_path: Path, smollm2_dir: Path
) -> None:
    model = load_model(build_tiny(model_type, tmp_path / model_type, smollm2_dir), device="cpu", dtype=dtype)
    ids = model.tokenizer(CHECK_TEXT, return_tensors="pt").input_ids
    err, _ = residual_error(model.bridge, ids)
    assert err == 0.0  # the same modules and weights compute both
    assert check_residual_reads(model.bridge, model.tokenizer, model.dtype) == 0.0


def test_a_wrong_hook_point_is_caught(tmp_path: Path, smollm2_dir: Path) -> None:
    """Shift one block's ``resid_pre`` hook by a constant: the check names that block."""
    model = load_model(build_tiny("llama", tmp_path / "llama", smollm2_dir), device="cpu")
    hook = model.bridge.blocks[1].hook_in
    handle = hook.register_forward_hook(lambda _m, _i, out: out + 0.5 * out.abs().max())
    try:
        with pytest.raises(LensSafetyError, match=r"block 1; bound 0.0001"):
            check_residual_reads(model.bridge, model.tokenizer, torch.float32)
    finally:
        handle.remove()
