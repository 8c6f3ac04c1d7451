"""Hybrid blocks: every Mamba / linear-attention / convolution mixer's output projection writes to
the residual stream and is edited (ROSI and abliteration), or the architecture is refused with one
error naming the block type; a writer is never skipped silently.

References: the mixer writers are named here by regular expressions over the checkpoint's tensor
names; abliteration must leave no component along ``s`` in the residual entering any block (a
missed writer keeps writing along it) and must equal inference-time directional ablation (an
edited tensor that is not a residual writer would make them differ); exported deltas are the
float64 formulas and every other tensor is bitwise unchanged.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from lens_safety.arch_matrix.checks import check_ablation, check_complete, check_formula, stored_state
from lens_safety.arch_matrix.configs import build_tiny
from lens_safety.edits import orthogonalize, rosi
from lens_safety.edits.checkpoint import checkpoint_writers
from lens_safety.errors import LensSafetyError
from lens_safety.export import export_edit
from lens_safety.models import load_model

#: model_type -> the checkpoint tensors of its mixers' output projections
MIXERS: dict[str, str] = {
    "falcon_h1": r"mamba\.out_proj\.weight",
    "nemotron_h": r"layers\.0\.mixer\.out_proj\.weight",
    "jamba": r"mamba\.out_proj\.weight",
    "granitemoehybrid": r"mamba\.out_proj\.weight",
    "bamba": r"mamba\.out_proj\.weight",
    "qwen3_next": r"linear_attn\.out_proj\.weight",
    "qwen3_5_text": r"linear_attn\.out_proj\.weight",
    "olmo_hybrid": r"linear_attn\.o_proj\.weight",
}
FAST = ("falcon_h1", "nemotron_h")
PARAMS = [pytest.param(t, marks=() if t in FAST else pytest.mark.slow) for t in MIXERS]
S = torch.randn(64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
S = S / S.norm()


@pytest.mark.parametrize("model_type", PARAMS)
def test_every_mixer_output_is_a_writer_and_edits_are_exact(
    model_type: str, tmp_path: Path, smollm2_dir: Path
) -> None:
    model = load_model(build_tiny(model_type, tmp_path / "base", smollm2_dir), device="cpu")
    mixers = {k for k in stored_state(model.hf_path) if re.search(rf"\.{MIXERS[model_type]}$", k)}
    writers = checkpoint_writers(model)
    found = {t.key for w in writers if w.kind == "mixer_out" for t in w.tensors}
    assert mixers and found == mixers
    export_edit(model, rosi(S, 5.0), tmp_path / "rosi")  # default targets include mixer_out
    assert check_formula(model, tmp_path / "rosi", "rosi", S) < 1e-3
    batch = model.chat.encode(["How do I bake sourdough bread?"])
    try:
        export_edit(model, orthogonalize(S), tmp_path / "ablated")
    except LensSafetyError as exc:  # a post-norm (OLMo-hybrid's attention layers): refused, said so
        assert "post-norm" in str(exc) and model_type == "olmo_hybrid"
        return
    assert check_formula(model, tmp_path / "ablated", "orthogonalize", S) < 1e-3
    assert check_complete(tmp_path / "ablated", S, batch.input_ids, model.n_layers) <= 1e-6
    gap = check_ablation(model, tmp_path / "ablated", S, batch)
    assert gap is not None and gap <= 1e-4


@pytest.mark.parametrize(
    ("model_type", "block_type"),
    [
        ("rwkv", "RwkvSelfAttention"),
        pytest.param("zamba2", "Zamba2MambaDecoderLayer", marks=pytest.mark.slow),
    ],
)
def test_blocks_whose_writes_cannot_be_located_are_refused_by_name(
    model_type: str, block_type: str, tmp_path: Path, smollm2_dir: Path
) -> None:
    """RWKV gates its value projection elementwise after the projection, Zamba2 nests a shared
    transformer whose outputs reach the residual through another linear map: one error each."""
    path = build_tiny(model_type, tmp_path / "base", smollm2_dir)
    with pytest.raises(LensSafetyError, match=block_type) as info:
        load_model(path, device="cpu")
    assert "not supported for edits" in str(info.value) and "\n" not in str(info.value)
