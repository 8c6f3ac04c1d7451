"""Mixture-of-experts writers: every expert's output projection (fused ``[n_experts, ...]`` in
memory, per expert or fused on disk), shared experts and dense MLPs of mixed models are residual
writers; ROSI, abliteration and conditional ROSI edit each expert on its own (ROSI's ``w_bar`` per
expert), in memory and in the export; router weights are never touched.

References: the writer tensors are named here by regular expressions over the checkpoint's own
tensor names (not by the library's discovery), the exported deltas are recomputed per expert in
float64 (:func:`lens_safety.arch_matrix.checks.expected_tensor`), and every other stored tensor is
compared bitwise.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from test_half_precision import half_ulp

from lens_safety.arch_matrix.checks import (
    check_complete,
    check_formula,
    expected_tensor,
    stored_state,
    vanilla,
)
from lens_safety.arch_matrix.configs import build_tiny
from lens_safety.edits import applied_edit, conditional_rosi, orthogonalize, rosi
from lens_safety.edits.checkpoint import checkpoint_writers
from lens_safety.edits.stored import live_parameters
from lens_safety.export import export_edit
from lens_safety.models import load_model

EXPERTS = 4  # arch_matrix.configs.TINY
#: model_type -> (stored MLP-side writer tensors, stored router tensors), as the checkpoint names them
CASES: dict[str, tuple[str, str]] = {
    "mixtral": (r"block_sparse_moe\.experts\.\d+\.w2\.weight", r"block_sparse_moe\.gate\.weight"),
    "gpt_oss": (r"mlp\.experts\.down_proj(_bias)?", r"mlp\.router\.(weight|bias)"),
    "deepseek_v3": (
        r"(layers\.0\.mlp\.down_proj|mlp\.experts\.\d+\.down_proj|mlp\.shared_experts\.down_proj)\.weight",
        r"mlp\.gate\.(weight|e_score_correction_bias)",
    ),
    "qwen3_moe": (r"mlp\.experts\.\d+\.down_proj\.weight", r"mlp\.gate\.weight"),
    "olmoe": (r"mlp\.experts\.\d+\.down_proj\.weight", r"mlp\.gate\.weight"),
    "qwen2_moe": (
        r"mlp\.(experts\.\d+|shared_expert)\.down_proj\.weight",
        r"mlp\.(gate|shared_expert_gate)\.weight",
    ),
    "granitemoe": (r"block_sparse_moe\.output_linear\.weight", r"block_sparse_moe\.router\.layer\.weight"),
}
FAST = ("mixtral", "gpt_oss", "deepseek_v3")
PARAMS = [pytest.param(t, marks=() if t in FAST else pytest.mark.slow) for t in CASES]
S = torch.randn(64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
S = S / S.norm()
G = torch.randn(64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
G = G / G.norm()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Callable[[str], Any]:
    """``models("mixtral")`` / ``models("mixtral:bfloat16")``: a tiny MoE model (stored in that
    dtype, loaded in float32), built and loaded on first use."""
    root = tmp_path_factory.mktemp("moe")
    cache: dict[str, Any] = {}

    def get(key: str) -> Any:
        if key not in cache:
            model_type, _, dtype = key.partition(":")
            stored = getattr(torch, dtype or "float32")
            path = build_tiny(model_type, root / key.replace(":", "-"), smollm2_dir, dtype=stored)
            cache[key] = load_model(path, device="cpu")
        return cache[key]

    return get


def _matching(state: dict[str, torch.Tensor], pattern: str) -> set[str]:
    return {k for k in state if re.search(rf"\.{pattern}$", k)}


@pytest.mark.parametrize("model_type", PARAMS)
def test_every_expert_shared_expert_and_dense_mlp_is_a_writer(
    models: Callable[[str], Any], model_type: str
) -> None:
    model = models(model_type)
    state = stored_state(model.hf_path)
    writers_pattern, routers_pattern = CASES[model_type]
    expected = _matching(state, writers_pattern)
    writers = checkpoint_writers(model)
    found = {t.key for w in writers if w.kind == "mlp_out" for t in w.tensors}
    assert found == expected and expected
    assert not found & _matching(state, routers_pattern) and _matching(state, routers_pattern)
    slices = sum(w.experts or 1 for w in writers if w.experts)
    assert slices == EXPERTS * sum(1 for w in writers if w.experts) > 0
    assert all(w.kind == "attn_out" for w in writers if w.kind != "mlp_out" and w.layer is not None)


def _spec(method: str) -> Any:
    if method == "rosi":
        return rosi(S, 5.0)
    if method == "conditional_rosi":
        return conditional_rosi(S, G, 5.0)
    return orthogonalize(S)


@pytest.mark.parametrize("method", ["rosi", "orthogonalize", "conditional_rosi"])
@pytest.mark.parametrize("model_type", PARAMS)
def test_exported_experts_follow_the_formula_and_nothing_else_changes(
    models: Callable[[str], Any], model_type: str, method: str, tmp_path: Path
) -> None:
    model = models(model_type)
    result = export_edit(model, _spec(method), tmp_path / "out")
    error = check_formula(model, tmp_path / "out", method, S, alpha=5.0, read=G)
    assert error < 1e-3
    routers = _matching(stored_state(model.hf_path), CASES[model_type][1])
    assert not routers & set(result.edit["edited_parameters"])  # check_formula: unedited = bitwise equal
    assert result.edit["verification"]["reference"] == "in-memory edited model"
    assert result.max_abs_logit_diff <= 1e-5
    if method == "orthogonalize":
        ids = model.chat.encode(["How do I bake sourdough bread?"]).input_ids
        assert check_complete(tmp_path / "out", S, ids, model.n_layers) <= 1e-6


@pytest.mark.parametrize("model_type", PARAMS)
def test_the_in_memory_edit_holds_the_exported_weights(
    models: Callable[[str], Any], model_type: str, tmp_path: Path
) -> None:
    """The live fused tensors under an in-memory edit equal a vanilla reload of the export, bit for
    bit (each expert's slice in its live orientation), and are restored exactly afterwards."""
    model = models(model_type)
    spec = orthogonalize(S)
    export_edit(model, spec, tmp_path / "out")
    reloaded = vanilla(tmp_path / "out", torch.float32).state_dict()
    params = live_parameters(model.hf_model)
    before = {name: p.detach().clone() for name, p in params.items()}
    fused = {t.live for w in checkpoint_writers(model) if w.experts for t in w.tensors}
    assert fused
    with applied_edit(model, spec):
        for name in fused:
            assert torch.equal(params[name].detach(), reloaded[name]), name
            assert not torch.equal(params[name].detach(), before[name])
    assert all(torch.equal(params[name].detach(), value) for name, value in before.items())


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_bfloat16_experts_are_edited_in_float64_and_rounded_once(
    models: Callable[[str], Any], model_type: str, tmp_path: Path
) -> None:
    """A bfloat16 checkpoint (experts per tensor on disk: Mixtral; fused with biases: gpt-oss),
    loaded in float32: every exported tensor is the float64 formula rounded once to bfloat16 (within
    half an ulp per element; the delta within 1e-2 relative, at an alpha where deltas are not tiny
    next to the weights) and the export verifies."""
    model = models(f"{model_type}:bfloat16")
    alpha = 100.0
    result = export_edit(model, rosi(S, alpha), tmp_path / "out")
    assert check_formula(model, tmp_path / "out", "rosi", S, alpha=alpha) < 1e-2
    base, new = stored_state(model.hf_path), stored_state(tmp_path / "out")
    assert all(t.dtype == torch.bfloat16 for t in new.values())
    tensors = {t.key: t for w in checkpoint_writers(model) for t in w.tensors}
    for name in result.edit["edited_parameters"]:
        info = tensors[name]
        expected = expected_tensor("rosi", base[name], info.layout, info.is_bias, S, alpha=alpha)
        got = new[name].double()
        ulp = torch.maximum(half_ulp(expected, torch.bfloat16), half_ulp(got, torch.bfloat16))
        assert ((got - expected).abs() <= ulp * (1 + 1e-3)).all(), name
    assert result.max_abs_logit_diff <= result.bound
