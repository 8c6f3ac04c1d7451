"""Architecture facts, read from the TransformerBridge's adapter and the Hugging Face modules it
wraps rather than hard-coded.

The residual stream is written by the token embedding (and, for GPT-2-style models, the position
embedding), by every attention output projection (``attn.o``), every MLP output projection
(``mlp.out``), every expert's and shared expert's output projection in mixture-of-experts blocks
and every Mamba / linear-attention / convolution mixer's output projection in hybrid blocks
(:mod:`lens_safety.architecture.writers`). Each writer is resolved to its dotted name in the HF
model, so that edits and exports speak the HF state-dict basis; where the checkpoint stores a
writer differently (transformers 5 fuses per-expert tensors on load),
:func:`lens_safety.edits.checkpoint.checkpoint_writers` maps it to the tensors on disk.

Layouts (:mod:`lens_safety.architecture.types`): ``linear`` weights are ``(d_model, d_in)``
(``W x`` writes); GPT-2's ``conv1d`` weights (and gpt-oss's fused experts) are ``(d_in, d_model)``
(``x W`` writes); ``embedding`` weights are ``(vocab, d_model)`` (rows are written). Gemma 2/3
pass every sub-layer output through a post-norm before the residual add, and Bloom and NanoChat
norm the embedding before block 0 (NanoChat inside its forward, found by running the model up to
block 0: :mod:`lens_safety.architecture.embedding`); such writers carry ``post_norm`` and a weight
edit of them is not an exact residual edit.
"""

from __future__ import annotations

from typing import Any

from lens_safety.architecture.types import (
    ArchitectureFacts,
    Layout,
    ResidualWriter,
    WriterKind,
    WriterTensor,
    clean_hf_name,
)
from lens_safety.architecture.writers import find_residual_writers

__all__ = [
    "ArchitectureFacts",
    "Layout",
    "ResidualWriter",
    "WriterKind",
    "WriterTensor",
    "architecture_facts",
    "clean_hf_name",
    "find_residual_writers",
]


def architecture_facts(bridge: Any) -> ArchitectureFacts:
    """Collect :class:`ArchitectureFacts` from a booted bridge (raw HF config + adapter map)."""
    hf_model = bridge.original_model
    config = hf_model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    emb = hf_model.get_input_embeddings()
    out = hf_model.get_output_embeddings()
    tied = bool(getattr(text_config, "tie_word_embeddings", False)) or (
        out is not None and emb is not None and out.weight is emb.weight
    )
    return ArchitectureFacts(
        architecture=(config.architectures or [type(hf_model).__name__])[0],
        model_type=str(getattr(config, "model_type", "unknown")),
        n_layers=len(bridge.blocks),
        d_model=int(emb.weight.shape[1]),
        d_vocab=int(emb.weight.shape[0]),
        normalization=str(getattr(bridge.cfg, "normalization_type", "unknown")),
        tied_embeddings=tied,
        writers=find_residual_writers(bridge),
    )
