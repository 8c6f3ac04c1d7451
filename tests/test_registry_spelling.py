"""A checkpoint whose class transformers spells differently from TransformerBridge's registry
(Phi-MoE: ``PhimoeForCausalLM`` vs ``PhiMoEForCausalLM``) boots with the registry's adapter."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lens_safety.arch_matrix.checks import check_formula
from lens_safety.arch_matrix.configs import build_tiny
from lens_safety.edits import rosi
from lens_safety.export import export_edit
from lens_safety.models import load_model, registry_spelling


def test_registry_spelling_matches_class_names_up_to_case_only() -> None:
    assert registry_spelling("PhimoeForCausalLM") == "PhiMoEForCausalLM"
    assert registry_spelling("PhiMoEForCausalLM") is None  # already the registry's key
    assert registry_spelling("LlamaForCausalLM") is None
    assert registry_spelling("PhimoeXForCausalLM") is None


def test_phimoe_is_the_only_causal_lm_class_spelt_otherwise_in_the_registry() -> None:
    """What the architectures page says, for the pinned transformers and TransformerLens."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    classes = {
        c for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for c in ([v] if isinstance(v, str) else v)
    }
    assert {c for c in classes if registry_spelling(c)} == {"PhimoeForCausalLM"}


def test_phimoe_boots_and_exports_rosi_exactly(tmp_path: Path, smollm2_dir: Path) -> None:
    path = build_tiny("phimoe", tmp_path / "phimoe", smollm2_dir)
    assert json.loads((path / "config.json").read_text())["architectures"] == ["PhimoeForCausalLM"]
    model = load_model(path, device="cpu")
    assert type(model.bridge.adapter).__name__ == "PhiMoEArchitectureAdapter"
    assert "original_architecture" not in model.hf_model.config.to_dict()  # the config stays as stored
    experts = [w for w in model.arch.writers if w.experts]
    assert [w.experts for w in experts] == [4, 4] and all(w.kind == "mlp_out" for w in experts)
    assert len(model.arch.writers) == 1 + 2 * 2
    s = torch.randn(model.d_model, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    s = s / s.norm()
    result = export_edit(model, rosi(s, 5.0), tmp_path / "rosi")
    assert result.max_abs_logit_diff <= result.bound
    assert check_formula(model, tmp_path / "rosi", "rosi", s) < 1e-3  # per expert, in float64
    exported = json.loads((tmp_path / "rosi" / "config.json").read_text())
    assert exported["architectures"] == ["PhimoeForCausalLM"] and "original_architecture" not in exported
