"""Architecture facts, read from the TransformerBridge's adapter rather than hard-coded.

The residual stream is written by the token embedding (and, for GPT-2-style models, the position
embedding), by every attention output projection (``attn.o``) and by every MLP output projection
(``mlp.out``). The bridge's adapter maps those TransformerLens names to the wrapped Hugging Face
modules; we resolve each module to its dotted name in the HF model so that edits and exports speak
the HF state-dict basis.

Layouts: ``linear`` weights are ``(d_model, d_in)`` (``W x`` writes); GPT-2's ``conv1d`` weights
are ``(d_in, d_model)`` (``x W`` writes); ``embedding`` weights are ``(vocab, d_model)`` (rows
are written). Gemma 2/3 pass every sub-layer output through a post-norm before the residual add;
such writers carry ``post_norm`` and a weight edit of them is not an exact residual edit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from lens_safety.errors import LensSafetyError

WriterKind = Literal["embed", "pos_embed", "attn_out", "mlp_out"]
Layout = Literal["linear", "conv1d", "embedding"]


@dataclass(frozen=True)
class ResidualWriter:
    """One module that adds its output to the residual stream.

    Attributes:
        name: TransformerLens-style name (``embed``, ``blocks.3.attn.o``, ``blocks.3.mlp.out``).
        kind: which role the module plays.
        layer: block index (``None`` for embeddings).
        hf_name: dotted module name in the Hugging Face model (``model.layers.3.self_attn.o_proj``);
            its parameters are ``{hf_name}.weight`` and, when ``has_bias``, ``{hf_name}.bias``.
        layout: weight layout, see the module docstring.
        has_bias: whether the module has a bias (which also writes to the residual stream).
        post_norm: HF name of a norm applied to the output before the residual add (Gemma 2/3).
    """

    name: str
    kind: WriterKind
    layer: int | None
    hf_name: str
    layout: Layout
    has_bias: bool
    post_norm: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ArchitectureFacts:
    """What lens-safety needs to know about a model's shape."""

    architecture: str
    model_type: str
    n_layers: int
    d_model: int
    d_vocab: int
    normalization: str
    tied_embeddings: bool
    writers: tuple[ResidualWriter, ...] = field(default=())

    def writers_of(self, *kinds: WriterKind) -> list[ResidualWriter]:
        return [w for w in self.writers if w.kind in kinds]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["writers"] = [w.to_dict() for w in self.writers]
        return out


def clean_hf_name(name: str) -> str:
    """Drop the bridge's ``_original_component`` wrappers from a module path (HF state-dict name)."""
    return ".".join(part for part in name.split(".") if part != "_original_component")


def _hf_names(hf_model: nn.Module) -> dict[int, str]:
    """Module id -> HF state-dict name.

    The bridge wraps HF modules in place (the original is its ``_original_component``) and also
    registers aliases of them as its own children (GPT-2's ``attn.c_proj`` is reachable as
    ``attn.o``). The HF path is the one that leaves every bridge wrapper only through
    ``_original_component``; alias paths are skipped.
    """
    from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent

    names: dict[int, str] = {}
    stack: list[tuple[str, nn.Module]] = [("", hf_model)]
    while stack:
        prefix, module = stack.pop()
        names.setdefault(id(module), clean_hf_name(prefix))
        is_bridge = isinstance(module, GeneralizedComponent)
        for child_name, child in module.named_children():
            if is_bridge and child_name != "_original_component":
                continue
            stack.append((f"{prefix}.{child_name}" if prefix else child_name, child))
    return names


def _original(component: Any) -> nn.Module | None:
    module = getattr(component, "original_component", None)
    return module if isinstance(module, nn.Module) else None


def _layout(module: nn.Module) -> Layout:
    kind = type(module).__name__
    if isinstance(module, nn.Embedding) or "Embedding" in kind:
        return "embedding"
    if kind == "Conv1D":
        return "conv1d"
    if isinstance(module, nn.Linear):
        return "linear"
    raise LensSafetyError(
        f"unsupported residual-writer module type {kind}", "report this architecture to lens-safety"
    )


def _writer(
    name: str,
    kind: WriterKind,
    layer: int | None,
    module: nn.Module,
    names: dict[int, str],
    post_norm: str | None = None,
) -> ResidualWriter:
    if id(module) not in names:
        raise LensSafetyError(
            f"could not locate {name} in the Hugging Face model", "report this architecture to lens-safety"
        )
    return ResidualWriter(
        name=name,
        kind=kind,
        layer=layer,
        hf_name=names[id(module)],
        layout=_layout(module),
        has_bias=isinstance(getattr(module, "bias", None), torch.Tensor),
        post_norm=post_norm,
    )


def _unsupported_block(block: Any) -> str | None:
    """Why a block has residual writers beyond ``attn.o`` / ``mlp.out`` (experts, a hybrid mixer),
    named by what its Hugging Face modules are; ``None`` for a plain attention + MLP block."""
    hf_block = _original(block)
    names = [name.lower() for name, _ in hf_block.named_modules()] if hf_block is not None else []
    if any("expert" in name for name in names):
        return (
            "is a mixture-of-experts block: each expert's output projection writes to the residual "
            "stream and lens-safety does not edit expert writers"
        )
    if any(key in name for name in names for key in ("mamba", "mixer", "linear_attn", "ssm")):
        return (
            "is a hybrid block (a Mamba / linear-attention mixer): its mixer's output projection writes "
            "to the residual stream and lens-safety does not edit mixer writers"
        )
    return None


def find_residual_writers(bridge: Any) -> tuple[ResidualWriter, ...]:
    """Locate every residual-stream writer of a TransformerBridge through its adapter map."""
    hf_model = bridge.original_model
    names = _hf_names(hf_model)
    writers: list[ResidualWriter] = []
    embed = _original(bridge.embed)
    if embed is None:
        raise LensSafetyError(
            "the bridge exposes no token embedding", "report this architecture to lens-safety"
        )
    writers.append(_writer("embed", "embed", None, embed, names))
    if hasattr(bridge, "pos_embed") and (pos := _original(bridge.pos_embed)) is not None:
        writers.append(_writer("pos_embed", "pos_embed", None, pos, names))
    for layer, block in enumerate(bridge.blocks):
        if (reason := _unsupported_block(block)) is not None:
            raise LensSafetyError(
                f"block {layer} of {type(hf_model).__name__} {reason}",
                "this architecture is not supported for edits yet",
            )
        children = dict(block.named_children())
        for sub, leaf, kind, post in (
            ("attn", "o", "attn_out", "ln1_post"),
            ("mlp", "out", "mlp_out", "ln2_post"),
        ):
            part = children.get(sub)
            module = _original(getattr(part, leaf, None)) if part is not None else None
            if module is None:
                raise LensSafetyError(
                    f"block {layer} of {type(hf_model).__name__} has no {sub}.{leaf} writer in its adapter",
                    "this architecture is not supported for edits yet",
                )
            norm_module = _original(children[post]) if post in children else None
            post_norm = names.get(id(norm_module)) if norm_module is not None else None
            writers.append(_writer(f"blocks.{layer}.{sub}.{leaf}", kind, layer, module, names, post_norm))  # type: ignore[arg-type]
    return tuple(writers)


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
