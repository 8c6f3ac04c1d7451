"""Tiny random models of every registry architecture, built offline with ``transformers``.

One shared set of small sizes (:data:`TINY`: 2 layers, width 64, 4 experts of width 32) and,
per ``model_type``, the few keys its config needs beyond it (:data:`OVERRIDES`: multi-head latent
attention ranks, Mamba heads and state sizes, linear-attention heads, the layer types of a
hybrid, shared-expert widths). Hybrid and mixed models get one layer of each kind, so every
block type is built and checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

TINY: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
    "num_local_experts": 4,
    "num_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
}
_MLA = {  # multi-head latent attention: one key head per query head, RoPE width = head_dim
    "q_lora_rank": 32,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "num_key_value_heads": 4,
}
_MAMBA2 = {
    "mamba_n_heads": 8,
    "mamba_d_head": 16,
    "mamba_d_state": 16,
    "mamba_chunk_size": 16,
    "mamba_n_groups": 1,
    "mamba_d_conv": 4,
    "mamba_expand": 2,
}
_LINEAR_ATTENTION = {
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_conv_kernel_dim": 4,
}
_HYBRID_LAYERS = {"layer_types": ["linear_attention", "full_attention"]}
OVERRIDES: dict[str, dict[str, Any]] = {
    "deepseek_v2": {**_MLA, "first_k_dense_replace": 1, "n_shared_experts": 1, "n_group": 1, "topk_group": 1},
    "deepseek_v3": {**_MLA, "first_k_dense_replace": 1, "n_shared_experts": 1, "n_group": 1, "topk_group": 1},
    "glm4_moe": {"first_k_dense_replace": 1, "n_shared_experts": 1, "n_group": 1, "topk_group": 1},
    "glm4_moe_lite": {
        **_MLA,
        "first_k_dense_replace": 1,
        "n_shared_experts": 1,
        "n_group": 1,
        "topk_group": 1,
    },
    "glm_moe_dsa": {
        **_MLA,
        "index_topk": 8,
        "index_head_dim": 16,
        "index_n_heads": 2,
        "mlp_layer_types": ["dense", "sparse"],
        "n_group": 1,
        "topk_group": 1,
    },
    "qwen2_moe": {"shared_expert_intermediate_size": 32},
    "qwen3_next": {**_LINEAR_ATTENTION, **_HYBRID_LAYERS, "shared_expert_intermediate_size": 32},
    "qwen3_5_text": {**_LINEAR_ATTENTION, **_HYBRID_LAYERS},
    "qwen3_5_moe_text": {**_LINEAR_ATTENTION, **_HYBRID_LAYERS, "shared_expert_intermediate_size": 32},
    "olmo_hybrid": {**_LINEAR_ATTENTION},
    "llama4_text": {"intermediate_size_mlp": 128, "interleave_moe_layer_step": 2, "moe_layers": [1]},
    "gemma4_text": {"hidden_size_per_layer_input": 16},
    "recurrent_gemma": {"block_types": ["recurrent", "attention"], "lru_width": 64},
    "falcon_h1": {**_MAMBA2, "mamba_d_ssm": 128},
    "bamba": {**_MAMBA2, "attn_layer_indices": [1]},
    "granitemoehybrid": {
        **_MAMBA2,
        "shared_intermediate_size": 64,
        "layer_types": ["mamba", "attention"],
        "position_embedding_type": "rope",
    },
    "nemotron_h": {
        "mamba_num_heads": 8,
        "mamba_head_dim": 16,
        "ssm_state_size": 16,
        "n_groups": 1,
        "chunk_size": 16,
        "moe_shared_expert_intermediate_size": 32,
        "num_hidden_layers": 4,
        "layers_block_type": ["mamba", "moe", "attention", "mlp"],
    },
    "jamba": {
        "attn_layer_period": 2,
        "attn_layer_offset": 1,
        "expert_layer_period": 2,
        "expert_layer_offset": 1,
        "mamba_d_state": 16,
        "mamba_dt_rank": 8,
    },
    "zamba2": {**_MAMBA2, "layers_block_type": ["mamba", "hybrid"]},
    "mamba2": {
        "num_heads": 8,
        "head_dim": 16,
        "expand": 2,
        "n_groups": 1,
        "state_size": 16,
        "chunk_size": 16,
    },
    "gpt_neo": {"attention_types": [[["global", "local"], 1]], "num_layers": 2},
    "gptj": {"rotary_dim": 8},
    "codegen": {"rotary_dim": 8},
    "youtu": {**_MLA},
    "lfm2_moe": {"num_dense_layers": 1, "layer_types": ["conv", "full_attention"]},
}
#: keys a model_type's config cannot take (a read-only property there)
DROPPED: dict[str, tuple[str, ...]] = {"falcon": ("head_dim",)}
MAX_TINY_PARAMETERS = 12_000_000  # untied embeddings of a 49k vocabulary at width 64 are ~6.3M


def _defines(config: Any, key: str) -> bool:
    """Whether a config class has ``key`` (a per-layer attribute, which raises on a global read, too)."""
    try:
        getattr(config, key)
    except AttributeError:
        return False
    except Exception:
        return True
    return True


def tiny_config(model_type: str, vocab_size: int, **extra: Any) -> Any:
    """The tiny config of ``model_type``: the :data:`TINY` keys its config class defines (an
    unknown key would only become a stray attribute, which TransformerBridge may still read, e.g.
    ``num_key_value_heads`` on GPT-2), then its :data:`OVERRIDES`, then ``extra``."""
    from transformers import AutoConfig

    defaults = AutoConfig.for_model(model_type)
    known = {key: value for key, value in TINY.items() if _defines(defaults, key)}
    if _defines(defaults, "vocab_size_per_layer_input"):  # Gemma 3n / 4 per-layer input embeddings
        known["vocab_size_per_layer_input"] = vocab_size
    keys = {**known, **OVERRIDES.get(model_type, {}), **extra}
    for key in DROPPED.get(model_type, ()):
        keys.pop(key, None)
    return AutoConfig.for_model(model_type, vocab_size=vocab_size, **keys)


def build_tiny(
    model_type: str,
    out_dir: Path,
    tokenizer_dir: Path,
    *,
    dtype: torch.dtype = torch.float32,
    **extra: Any,
) -> Path:
    """Save a tiny random ``model_type`` model (random biases, stored in ``dtype``) with the given
    tokenizer; ``extra`` config keys override the tiny sizes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = tiny_config(model_type, len(tokenizer), **extra)
    with torch.device("meta"):
        size = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    if size > MAX_TINY_PARAMETERS:
        raise ValueError(f"the tiny config still has {size / 1e6:.0f}M parameters (keys not recognised)")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):  # ``.bias`` and fused experts' ``down_proj_bias``
                param.normal_(0.0, 0.02)
    model.to(dtype).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def registry_architectures() -> dict[str, str | None]:
    """TransformerBridge's causal-LM architecture classes -> the transformers ``model_type`` building
    them (the text-only ``*_text`` type where a class is shared with a multimodal one)."""
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    by_class: dict[str, list[str]] = {}
    for model_type, classes in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        for name in classes if isinstance(classes, (list, tuple)) else [classes]:
            by_class.setdefault(name.lower(), []).append(model_type)
    out: dict[str, str | None] = {}
    for arch in SUPPORTED_ARCHITECTURES:
        if not (arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel")):
            continue
        types = by_class.get(arch.lower(), [])
        stem = arch.lower().removesuffix("forcausallm").removesuffix("lmheadmodel").replace("_", "")
        named = [t for t in types if t.replace("_", "").removesuffix("text") == stem]
        out[arch] = (
            next((t for t in named if t.endswith("_text")), None)
            or (named[0] if named else None)
            or (types[0] if types else None)
        )
    return dict(sorted(out.items()))
