"""What a residual-stream writer is, in the loaded model and in the checkpoint on disk.

Layouts (of one write matrix, i.e. of each expert's slice of a fused expert tensor): ``linear``
weights are ``(d_model, d_in)`` (``W x`` writes: columns are write vectors); ``conv1d`` weights
are ``(d_in, d_model)`` (``x W`` writes: rows are write vectors; GPT-2's Conv1D, gpt-oss's fused
experts); ``embedding`` weights are ``(vocab, d_model)`` (rows are written). A bias is one more
write vector ``(d_model,)``, ``(n_experts, d_model)`` for fused experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from lens_safety.records import Record

WriterKind = Literal["embed", "pos_embed", "attn_out", "mlp_out", "mixer_out"]
Layout = Literal["linear", "conv1d", "embedding"]

#: the other layout of a transposed write matrix
TRANSPOSED: dict[str, Layout] = {"linear": "conv1d", "conv1d": "linear", "embedding": "embedding"}


def clean_hf_name(name: str) -> str:
    """Drop the bridge's ``_original_component`` wrappers from a module path (HF state-dict name)."""
    return ".".join(part for part in name.split(".") if part != "_original_component")


@dataclass(frozen=True)
class WriterTensor(Record):
    """One tensor of a residual writer as the checkpoint stores it, and where it lives in memory.

    Attributes:
        key: the tensor's name in the checkpoint's safetensors files.
        is_bias: a bias (write vectors along the last axis) rather than a weight.
        layout: the layout of the STORED tensor's last two axes (a leading expert axis allowed).
        live: the loaded model's parameter holding it (HF state-dict name, bridge wrappers dropped).
        index: the stored tensor is ``live[index]`` (one expert of a fused ``[n_experts, ...]``
            parameter stored per expert), ``None`` when it is the whole parameter.
        transposed: the stored tensor is the live one with its last two axes swapped.
    """

    key: str
    is_bias: bool
    layout: Layout
    live: str
    index: int | None = None
    transposed: bool = False


@dataclass(frozen=True)
class ResidualWriter(Record):
    """One module (or fused expert tensor) that adds its output to the residual stream.

    Attributes:
        name: TransformerLens-style name (``embed``, ``blocks.3.attn.o``, ``blocks.3.mlp.out``);
            writers the bridge's adapter does not name are ``blocks.{l}.`` + their path inside the
            Hugging Face decoder layer (``blocks.3.mlp.experts.down_proj``, ``blocks.0.mamba.out_proj``).
        kind: ``embed`` / ``pos_embed``, ``attn_out`` (attention), ``mlp_out`` (dense MLP, every
            expert, shared experts) or ``mixer_out`` (Mamba, linear-attention, convolution mixers).
        layer: block index (``None`` for embeddings).
        hf_name: dotted module name in the Hugging Face model (``model.layers.3.self_attn.o_proj``).
        layout: layout of one write matrix in memory (see the module docstring).
        has_bias: whether a bias (which also writes to the residual stream) comes with the weight.
        post_norm: HF name of a norm applied to the output before the residual add (Gemma 2/3);
            for an embedding, what norms its write before block 0 reads it (Bloom's
            ``word_embeddings_layernorm``, NanoChat's ``model.norm`` applied inside its forward).
        fixed_with: a weightless write joining this one before block 0 (XGLM's sinusoidal position
            embedding joins the token embedding): no weight edit can remove a direction from it.
        weight: the live weight parameter (default ``{hf_name}.weight``).
        bias: the live bias parameter (default ``{hf_name}.bias`` when ``has_bias``).
        experts: number of experts of a fused ``[n_experts, ...]`` weight (each slice is edited
            as its own writer), ``None`` for a plain weight.
        stored: the checkpoint tensors (set by :func:`lens_safety.edits.checkpoint.checkpoint_writers`;
            empty means "stored under the live names, in the live layout").
    """

    name: str
    kind: WriterKind
    layer: int | None
    hf_name: str
    layout: Layout
    has_bias: bool
    post_norm: str | None = None
    weight: str = ""
    fixed_with: str | None = None
    bias: str | None = None
    experts: int | None = None
    stored: tuple[WriterTensor, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.weight:
            object.__setattr__(self, "weight", f"{self.hf_name}.weight")
        if self.has_bias and self.bias is None:
            object.__setattr__(self, "bias", f"{self.hf_name}.bias")

    def live_tensors(self) -> tuple[WriterTensor, ...]:
        """The writer's tensors under their live names and layout (a checkpoint saved as loaded)."""
        out = [WriterTensor(self.weight, False, self.layout, self.weight)]
        if self.bias is not None:
            out.append(WriterTensor(self.bias, True, self.layout, self.bias))
        return tuple(out)

    @property
    def tensors(self) -> tuple[WriterTensor, ...]:
        """The checkpoint tensors an edit of this writer rewrites."""
        return self.stored or self.live_tensors()


@dataclass(frozen=True)
class ArchitectureFacts(Record):
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
        out = super().to_dict()
        out["writers"] = [w.to_dict() for w in self.writers]
        return out
