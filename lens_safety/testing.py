"""Tiny random models of several architectures, built offline, for tests and examples.

``make_tiny_model("gpt2", out_dir, tokenizer_dir)`` writes a randomly initialised 3-layer model
(``from_config`` + ``save_pretrained``) with the tokenizer (and chat template) copied from
``tokenizer_dir``. The architectures cover the traps lens-safety must handle: grouped-query
attention (Llama, Mistral), LayerNorm + biases + Conv1D + tied embeddings (GPT-2), biases (Qwen2),
post-sublayer norms and scaled embeddings (Gemma 2 / 3), fused QKV and gate-up projections (Phi-3).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TINY_ARCHITECTURES: tuple[str, ...] = ("llama", "gpt2", "qwen2", "gemma2", "gemma3", "mistral", "phi3")

_GQA = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def tiny_config(arch: str, vocab_size: int) -> Any:
    """A small random config of ``arch`` (3 layers, width 64)."""
    from transformers import AutoConfig

    if arch == "gpt2":
        return AutoConfig.for_model(
            "gpt2",
            n_embd=64,
            n_layer=3,
            n_head=4,
            n_positions=512,
            vocab_size=vocab_size,
            bos_token_id=1,
            eos_token_id=2,
        )
    extra: dict[str, Any] = {}
    if arch in {"gemma2", "gemma3"}:
        extra["head_dim"] = 16
    if arch == "phi3":
        extra["pad_token_id"] = 2
    model_type = {"gemma3": "gemma3_text"}.get(arch, arch)
    return AutoConfig.for_model(
        model_type,
        vocab_size=vocab_size,
        tie_word_embeddings=arch in {"gemma2", "gemma3"},
        bos_token_id=1,
        eos_token_id=2,
        **_GQA,
        **extra,
    )


def make_tiny_model(
    arch: str, out_dir: str | Path, tokenizer_dir: str | Path, seed: int = 0, dtype: str = "float32"
) -> Path:
    """Write a tiny random ``arch`` model with the tokenizer of ``tokenizer_dir`` to ``out_dir``.

    The weights are drawn in float32 and saved in ``dtype`` (``float32``, ``bfloat16`` or
    ``float16``: one cast, as a checkpoint converted with ``save_pretrained`` after ``.to(dtype)``).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if arch not in TINY_ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {TINY_ARCHITECTURES}")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer)), dtype=torch.float32)
    with torch.no_grad():  # random biases, so that bias handling is exercised
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.02)
    out = Path(out_dir)
    if dtype != "float32":
        model = model.to(getattr(torch, dtype))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
