"""Find every residual-stream writer of a booted TransformerBridge.

The token embedding (and a position embedding) write the residual stream first; they carry
``post_norm`` where block 0 does not read their write as it is (a norm in between: Bloom's, which
the adapter names, or NanoChat's, applied inside its forward; found by running the model up to
block 0, :mod:`lens_safety.architecture.embedding`). Then, in each block, every sub-layer whose
output is added back: attention (``attn.o``), the MLP (``mlp.out``), and in mixture-of-experts and
hybrid blocks the output projection of every expert, of shared experts, of a dense MLP and of
every Mamba / linear-attention / convolution mixer.

Where the bridge's adapter names ``attn.o`` / ``mlp.out`` those modules are the writers. Every
other child of the Hugging Face decoder layer that holds matrices must then contain writers found
by their role: a fused expert tensor ``down_proj`` (``[n_experts, d_model, d_in]``, or
``[n_experts, d_in, d_model]`` where the experts module says ``is_transposed``) with its
``down_proj_bias``, or an output projection (``o_proj``, ``out_proj``, ``down_proj``, ``w2``, …)
whose output width is ``d_model``. A child holding matrices where none is found stops the
discovery with one error naming its type: an edit never silently skips a writer. (A child that
is a single projection narrower than ``d_model`` only reads the residual and is not a writer.)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from lens_safety.architecture.embedding import embedding_path
from lens_safety.architecture.types import Layout, ResidualWriter, WriterKind, clean_hf_name
from lens_safety.errors import LensSafetyError

#: leaf names of projections that write a sub-layer's output (checked with the output width)
OUTPUT_NAMES = frozenset(
    {
        "o_proj",
        "out_proj",
        "down_proj",
        "output_linear",
        "linear_out",
        "o_b_proj",
        "w2",
        "c_proj",
        "dense",
        "dense_4h_to_h",
        "fc2",
        "wo",
    }
)
_MIXERS = ("Mamba", "Mixer", "Delta", "Conv", "SSM", "Recurrent", "Rwkv")
_MLPS = ("MLP", "Mlp", "MoE", "Moe", "Expert", "FeedForward")
UNSUPPORTED = "this architecture is not supported for edits yet"


def hf_names(hf_model: nn.Module) -> dict[int, str]:
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


def original(component: Any) -> nn.Module | None:
    """The Hugging Face module a bridge component wraps (``None`` when there is none)."""
    module = getattr(component, "original_component", None)
    return module if isinstance(module, nn.Module) else None


def unwrap(module: nn.Module) -> nn.Module:
    """Descend through bridge wrappers to the Hugging Face module that owns the weights."""
    while (inner := original(module)) is not None:
        module = inner
    return module


def walk(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """``(path, module)`` for every Hugging Face submodule below ``module``, bridge wrappers skipped."""
    for name, child in module.named_children():
        inner = unwrap(child)
        path = f"{prefix}.{name}" if prefix else name
        yield path, inner
        yield from walk(inner, path)


def layout_of(module: nn.Module) -> Layout:
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


def _out_width(module: nn.Module) -> int | None:
    """Output width of a projection module (``nn.Linear`` or GPT-2's ``Conv1D``), else ``None``."""
    if isinstance(module, nn.Linear):
        return int(module.out_features)
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor):
        return int(weight.shape[1])
    return None


def _has_matrices(module: nn.Module) -> bool:
    return any(p.ndim >= 2 for p in module.parameters())


@dataclass(frozen=True)
class _Block:
    """What the search inside one decoder layer needs."""

    layer: int
    prefix: str  # the layer's HF name
    architecture: str
    d_model: int
    post_norms: dict[str, str | None]  # writer kind -> HF name of its post-norm

    def writer(self, path: str, kind: WriterKind, module: nn.Module) -> ResidualWriter:
        return ResidualWriter(
            name=f"blocks.{self.layer}.{path}",
            kind=kind,
            layer=self.layer,
            hf_name=f"{self.prefix}.{path}",
            layout=layout_of(module),
            has_bias=isinstance(getattr(module, "bias", None), torch.Tensor),
            post_norm=self.post_norms.get(kind),
        )


def _expert_layout(block: _Block, name: str, module: nn.Module, shape: torch.Size) -> Layout:
    """``linear`` for ``[E, d_model, d_in]`` experts, ``conv1d`` for ``[E, d_in, d_model]``."""
    transposed = getattr(module, "is_transposed", None)
    width = block.d_model
    if isinstance(transposed, bool) and shape[2 if transposed else 1] == width:
        return "conv1d" if transposed else "linear"
    if transposed is None and (shape[1] == width) != (shape[2] == width):
        return "linear" if shape[1] == width else "conv1d"
    raise LensSafetyError(
        f"cannot tell which axis of the fused expert tensor {name} {tuple(shape)} writes the "
        f"residual width {width} (block {block.layer} of {block.architecture})",
        "report this architecture to lens-safety",
    )


def _fused_experts(
    block: _Block, path: str, module: nn.Module, kind: WriterKind, parent: nn.Module | None
) -> ResidualWriter | None:
    """The writer of a fused ``[n_experts, ...]`` output projection held by ``module``, if any, with
    its bias: per expert (``[n_experts, d_model]``, gpt-oss) or one ``[d_model]`` ``bias`` of the
    experts block ``parent`` added to the routed sum (JetMoE)."""
    leaf = path.rsplit(".", 1)[-1]
    for attr, bias_attr in (("down_proj", "down_proj_bias"), ("weight", "bias")):
        param = module._parameters.get(attr)
        if param is None or param.ndim != 3 or (attr == "weight" and leaf not in OUTPUT_NAMES):
            continue
        hf_name = f"{block.prefix}.{path}"
        layout = _expert_layout(block, f"{hf_name}.{attr}", module, param.shape)
        bias = module._parameters.get(bias_attr)
        has_bias = bias is not None and tuple(bias.shape) == (param.shape[0], block.d_model)
        bias_name = f"{hf_name}.{bias_attr}" if has_bias else None
        shared = parent._parameters.get("bias") if parent is not None else None
        if not has_bias and shared is not None and tuple(shared.shape) == (block.d_model,):
            has_bias, bias_name = True, f"{block.prefix}.{path.rsplit('.', 1)[0]}.bias"
        post = block.post_norms.get(kind)
        if getattr(module, "has_post_expert_norm", False):
            post = post or f"{hf_name} (post-expert norm)"
        return ResidualWriter(
            name=f"blocks.{block.layer}.{path}.{attr}",
            kind=kind,
            layer=block.layer,
            hf_name=hf_name,
            layout=layout,
            has_bias=has_bias,
            post_norm=post,
            weight=f"{hf_name}.{attr}",
            bias=bias_name,
            experts=int(param.shape[0]),
        )
    return None


def child_kind(child: nn.Module, architecture: str = "") -> WriterKind:
    """The writer kind of a decoder-layer child, by what its Hugging Face class is (the model's own
    class prefix dropped: ``RecurrentGemmaMlp`` is an MLP, ``GraniteMoeHybridMambaLayer`` a mixer)."""
    prefix = architecture.removesuffix("ForCausalLM").removesuffix("LMHeadModel")
    name = type(child).__name__
    name = name.removeprefix(prefix) if prefix and name != prefix else name
    if any(key in name for key in _MLPS):
        return "mlp_out"
    if any(key in name for key in _MIXERS):
        return "mixer_out"
    if "Attention" in name or "MoA" in name:
        return "attn_out"
    return "mixer_out"


def _child_writers(block: _Block, path: str, child: nn.Module) -> list[ResidualWriter]:
    """Writers inside one decoder-layer child the adapter does not map (see the module docstring)."""
    kind = child_kind(child, block.architecture)
    if (width := _out_width(child)) is not None:
        return [block.writer(path, kind, child)] if width == block.d_model else []
    found: list[ResidualWriter] = []
    taken: list[str] = []
    modules = dict([(path, child), *walk(child, path)])
    for sub, module in modules.items():
        if any(sub.startswith(t + ".") for t in taken):
            continue
        if (
            fused := _fused_experts(block, sub, module, kind, modules.get(sub.rsplit(".", 1)[0]))
        ) is not None:
            found.append(fused)
            taken.append(sub)
        elif sub.rsplit(".", 1)[-1] in OUTPUT_NAMES and _out_width(module) == block.d_model:
            found.append(block.writer(sub, kind, module))
            taken.append(sub)
    return found


def _adapter_writers(
    block: Any, layer: int, names: dict[int, str], post_norms: dict[str, str | None]
) -> list[tuple[ResidualWriter, nn.Module]]:
    """``attn.o`` / ``mlp.out`` where the bridge's adapter maps them, with their HF modules."""
    children = dict(block.named_children())
    out = []
    for sub, leaf, kind in (("attn", "o", "attn_out"), ("mlp", "out", "mlp_out")):
        part = children.get(sub)
        module = original(getattr(part, leaf, None)) if part is not None else None
        if module is None:
            continue
        if id(module) not in names:
            raise LensSafetyError(
                f"could not locate blocks.{layer}.{sub}.{leaf} in the Hugging Face model",
                "report this architecture to lens-safety",
            )
        hf_name = names[id(module)]
        writer = ResidualWriter(
            name=f"blocks.{layer}.{sub}.{leaf}",
            kind=kind,  # type: ignore[arg-type]
            layer=layer,
            hf_name=hf_name,
            layout=layout_of(module),
            has_bias=isinstance(getattr(module, "bias", None), torch.Tensor),
            post_norm=post_norms.get(kind),
        )
        out.append((writer, module))
    return out


def block_writers(
    bridge_block: Any, layer: int, names: dict[int, str], architecture: str, d_model: int
) -> list[ResidualWriter]:
    """Every residual writer of one block (see the module docstring); raises rather than skip one."""
    hf_block = original(bridge_block)
    if hf_block is None or id(hf_block) not in names:
        raise LensSafetyError(f"block {layer} of {architecture} has no Hugging Face layer", UNSUPPORTED)
    children = dict(bridge_block.named_children())
    post_norms = {}
    for kind, post in (("attn_out", "ln1_post"), ("mlp_out", "ln2_post")):
        norm = original(children[post]) if post in children else None
        post_norms[kind] = names.get(id(norm)) if norm is not None else None
    context = _Block(layer, names[id(hf_block)], architecture, d_model, post_norms)
    mapped = _adapter_writers(bridge_block, layer, names, post_norms)
    found = [writer for writer, _ in mapped]
    adapter_modules = {id(module) for _, module in mapped}
    for path, child in ((n, unwrap(c)) for n, c in hf_block.named_children()):
        if not _has_matrices(child) or any(id(m) in adapter_modules for m in child.modules()):
            continue
        if "DecoderLayer" in type(child).__name__:
            raise LensSafetyError(
                f"block {layer} of {architecture} nests a {type(child).__name__} ({path}) whose "
                "sub-layers reach the residual stream only through other modules",
                UNSUPPORTED,
            )
        inside = _child_writers(context, path, child)
        if not inside and _out_width(child) is None:
            raise LensSafetyError(
                f"block {layer} of {architecture} has a {type(child).__name__} ({path}) whose "
                "residual write lens-safety cannot locate",
                UNSUPPORTED,
            )
        found += inside
    if not found:
        raise LensSafetyError(f"block {layer} of {architecture} has no residual writer", UNSUPPORTED)
    return found


def find_residual_writers(bridge: Any) -> tuple[ResidualWriter, ...]:
    """Locate every residual-stream writer of a TransformerBridge (see the module docstring)."""
    hf_model = bridge.original_model
    names = hf_names(hf_model)
    architecture = type(hf_model).__name__
    embed = original(bridge.embed)
    if embed is None:
        raise LensSafetyError(
            "the bridge exposes no token embedding", "report this architecture to lens-safety"
        )
    weight = embed.weight
    if not isinstance(weight, torch.Tensor):
        raise LensSafetyError("the token embedding has no weight", "report this architecture to lens-safety")
    d_model = int(weight.shape[-1])
    writers = [_embedding("embed", "embed", embed, names)]
    if hasattr(bridge, "pos_embed") and (pos := original(bridge.pos_embed)) is not None:
        writers.append(_embedding("pos_embed", "pos_embed", pos, names))
    elif (fixed := _weightless_positions(hf_model)) is not None:
        writers[0] = replace(writers[0], fixed_with=f"a weightless position embedding ({fixed})")
    blocks = [
        writer
        for layer, block in enumerate(bridge.blocks)
        for writer in block_writers(block, layer, names, architecture, d_model)
    ]
    # a weightless position embedding already makes abliterating the embedding inexact (refused)
    if not writers[0].fixed_with and (path := _embedding_norm(bridge, names)) is not None:
        writers = [replace(writer, post_norm=path) for writer in writers]
    writers += blocks
    _refuse_shared(hf_model, writers, architecture)
    return tuple(writers)


def _embedding_norm(bridge: Any, names: dict[int, str]) -> str | None:
    """What norms the embedding's write before block 0 reads it, if anything: the norm the adapter
    names (Bloom's ``embed_ln``), else what the probe up to block 0 finds (NanoChat normalises the
    embedding inside its forward; :mod:`lens_safety.architecture.embedding`)."""
    if (norm := original(getattr(bridge, "embed_ln", None))) is not None:
        return names.get(id(norm))
    found = (original(getattr(bridge, name, None)) for name in ("embed", "pos_embed"))
    modules = [module for module in found if module is not None]
    return embedding_path(bridge.original_model, names, modules, list(bridge.blocks))


def _weightless_positions(hf_model: nn.Module) -> str | None:
    """The HF name of a position embedding without weights (XGLM's sinusoidal one), if any: its
    write joins the token embedding's and no weight edit can remove a direction from it."""
    for name, module in walk(hf_model):
        kind = type(module).__name__
        positional = "Positional" in kind or "PositionEmbedding" in kind or "Sinusoidal" in kind
        if positional and "Rotary" not in kind and not any(True for _ in module.parameters()):
            return name
    return None


def _refuse_shared(hf_model: nn.Module, writers: list[ResidualWriter], architecture: str) -> None:
    """Refuse writers whose weight is one tensor shared between blocks (Zamba2's shared transformer):
    an edit of one block's writer would silently edit the others."""
    params = {clean_hf_name(n): p for n, p in hf_model.named_parameters(remove_duplicate=False)}
    seen: dict[int, str] = {}
    for writer in writers:
        param = params.get(writer.weight)
        if param is None:
            continue
        if id(param) in seen:
            raise LensSafetyError(
                f"{writer.name} of {architecture} shares its weight with {seen[id(param)]}, so a "
                "per-block edit is not defined",
                UNSUPPORTED,
            )
        seen[id(param)] = writer.name


def _embedding(name: str, kind: WriterKind, module: nn.Module, names: dict[int, str]) -> ResidualWriter:
    if id(module) not in names:
        raise LensSafetyError(
            f"could not locate {name} in the Hugging Face model", "report this architecture to lens-safety"
        )
    return ResidualWriter(
        name=name,
        kind=kind,
        layer=None,
        hf_name=names[id(module)],
        layout=layout_of(module),
        has_bias=isinstance(getattr(module, "bias", None), torch.Tensor),
    )
