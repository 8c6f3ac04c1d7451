"""Residual-stream reads through TransformerLens hook points, batched, in bounded memory.

Space: with compatibility mode off (the default) the bridge wraps the unmodified Hugging Face
model, so ``blocks.{l}.hook_resid_pre`` is exactly HF ``hidden_states[l]`` — the **raw HF residual
basis** every lens-safety direction is stored in. Prompts are formatted with the chat template,
LEFT padded and run with the attention mask and mask-derived position ids, so a batched read
equals a one-prompt read. Positions are negative offsets from the end of the formatted prompt
(``-1`` = last token).

The forward pass stops right after the deepest requested layer (the unembedding is never
computed), and only the requested positions are copied out of each hook, so a read costs less
than a plain forward pass and never holds a full activation cache.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypedDict, Unpack

import torch
from jaxtyping import Float

from lens_safety.chat import EncodedBatch
from lens_safety.errors import LensSafetyError
from lens_safety.forward_pass import forward
from lens_safety.models import ChatModel
from lens_safety.progress import track
from lens_safety.prompts import PromptSet, PromptSource

HookName = Literal["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"]
HOOKS: tuple[str, ...] = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
PositionSpec = Sequence[int] | Literal["post_instruction"]


@dataclass(frozen=True)
class ReadPoints:
    """Where a read looks: hook ``hook`` of blocks ``layers`` at negative ``positions`` (a read's axes 1, 2)."""

    layers: tuple[int, ...]
    positions: tuple[int, ...]
    hook: str


class ResidualReader(Protocol):
    """Another engine that reads the residual stream of a LEFT-padded batch (e.g.
    :class:`lens_safety.evaluation.vllm_engine.VLLMReader`), in the raw HF basis."""

    name: str

    def read(
        self, model: ChatModel, batch: EncodedBatch, points: ReadPoints
    ) -> Float[torch.Tensor, "batch n_layers n_positions d_model"]:
        """States of every row at ``points``, float32 on CPU."""
        ...


class _StopForward(Exception):
    """Raised inside a hook once every requested layer has been read."""


@dataclass
class Activations:
    """Residual activations of a prompt set.

    Attributes:
        tensor: ``[n_prompts, n_layers, n_positions, d_model]`` float32 on CPU, raw HF basis
            (when ``space == "raw_hf"``); ``tensor[:, i]`` is layer ``layers[i]``.
        layers: the layers read, in the order of axis 1.
        positions: negative positions from the end of the prompt, in the order of axis 2.
        hook: which hook point (``resid_pre`` …).
        space: ``raw_hf``, or ``processed`` when compatibility mode had been applied.
        prompts: the prompt set they were read from.
        system_prompt: the system prompt used when formatting, if any.
    """

    tensor: Float[torch.Tensor, "n_prompts n_layers n_positions d_model"]
    layers: tuple[int, ...]
    positions: tuple[int, ...]
    hook: str
    space: str
    prompts: PromptSet
    system_prompt: str | None = None

    def at(self, layer: int, position: int = -1) -> Float[torch.Tensor, "n_prompts d_model"]:
        """Activations of every prompt at one layer and position."""
        return self.tensor[:, self.layers.index(layer), self.positions.index(position)]


@dataclass
class ActivationSums:
    """Streaming float64 sums of activations (memory independent of the number of prompts).

    ``mean`` is ``[n_layers, n_positions, d_model]`` float64, same layout as :class:`Activations`.
    """

    sums: Float[torch.Tensor, "n_layers n_positions d_model"]
    count: int
    layers: tuple[int, ...]
    positions: tuple[int, ...]
    hook: str
    space: str

    @property
    def mean(self) -> Float[torch.Tensor, "n_layers n_positions d_model"]:
        return self.sums / max(self.count, 1)


def hook_point_name(hook: str, layer: int) -> str:
    """TransformerLens hook name for a residual hook at a layer, e.g. ``blocks.3.hook_resid_pre``."""
    if hook not in HOOKS:
        raise LensSafetyError(f"unknown hook '{hook}'", f"use one of {', '.join(HOOKS)}")
    return f"blocks.{layer}.hook_{hook}"


def resolve_positions(
    model: ChatModel, positions: PositionSpec, system_prompt: str | None = None
) -> tuple[int, ...]:
    """Turn ``"post_instruction"`` into concrete negative positions; validate explicit ones."""
    if isinstance(positions, str):
        if positions != "post_instruction":
            raise LensSafetyError(
                f"unknown positions '{positions}'", "use 'post_instruction' or negative integers like -1"
            )
        return model.chat.post_instruction_positions(system_prompt)
    out = tuple(int(p) for p in positions)
    if not out or any(p >= 0 for p in out):
        raise LensSafetyError(
            f"positions {out} must be negative offsets from the end", "use e.g. (-1,) for the last token"
        )
    return out


def resolve_layers(model: ChatModel, layers: Sequence[int] | None) -> tuple[int, ...]:
    out = tuple(range(model.n_layers)) if layers is None else tuple(int(x) for x in layers)
    bad = [x for x in out if not 0 <= x < model.n_layers]
    if bad or not out:
        raise LensSafetyError(f"layers {bad or out} out of range", f"use layers 0..{model.n_layers - 1}")
    return out


@contextmanager
def hooks(model: ChatModel, fwd_hooks: list[tuple[str, Any]]) -> Iterator[None]:
    """Install TransformerLens forward hooks for the duration of the block (always removed)."""
    with model.bridge.hooks(fwd_hooks=fwd_hooks):
        yield


def batches(
    model: ChatModel, prompts: PromptSet, batch_size: int, system_prompt: str | None
) -> Iterator[EncodedBatch]:
    """Encode prompts into left-padded batches (prompts sorted by nothing: order is preserved)."""
    for rows in row_batches(model, prompts, batch_size, system_prompt):
        yield model.chat.pad(rows)


def row_batches(
    model: ChatModel, prompts: PromptSet, batch_size: int, system_prompt: str | None
) -> Iterator[list[list[int]]]:
    """The chat-formatted token rows of the prompts, ``batch_size`` at a time, in order."""
    if batch_size < 1:
        raise LensSafetyError(f"batch_size must be >= 1, got {batch_size}", "pass a positive batch size")
    for start in range(0, len(prompts), batch_size):
        chunk = prompts.prompts[start : start + batch_size]
        yield [model.chat.token_ids(model.chat.format(x, system_prompt)) for x in chunk]


def read_hook_points(
    model: ChatModel,
    batch: EncodedBatch,
    points: Sequence[str],
    take: Callable[[torch.Tensor], torch.Tensor],
) -> list[torch.Tensor]:
    """``take(activation)`` at every hook point in ``points``, in order, from ONE forward pass of a
    left-padded batch (:func:`forward`); the pass stops as soon as every point has been read.

    This is the one loop behind every residual read here and in the feature readers: ``take``
    picks what to keep of ``activation`` (``[batch, seq, d_model]``, in the basis of the bridge,
    raw HF with compatibility mode off), e.g. chosen positions or a weighted mean over tokens, so
    the full activation is never kept. A point that never fires is an error naming the points.
    """
    wanted = set(points)
    captured: dict[str, torch.Tensor] = {}

    def reader(name: str) -> Callable[[torch.Tensor, Any], torch.Tensor]:
        def read(activation: torch.Tensor, hook: Any) -> torch.Tensor:
            captured[name] = take(activation)
            if wanted <= captured.keys():  # nothing deeper is needed: skip the rest of the model
                raise _StopForward
            return activation

        return read

    try:
        with torch.inference_mode(), hooks(model, [(name, reader(name)) for name in dict.fromkeys(points)]):
            forward(model, batch)
    except _StopForward:
        pass
    missing = [name for name in points if name not in captured]
    if missing:
        raise LensSafetyError(
            f"hook points {missing} did not fire", "this architecture's bridge lacks those hook points"
        )
    return [captured[name] for name in points]


def _read_batch(
    model: ChatModel, batch: EncodedBatch, points: ReadPoints
) -> Float[torch.Tensor, "batch n_layers n_positions d_model"]:
    width = batch.input_ids.shape[1]
    if -min(points.positions) > width:
        raise LensSafetyError(
            f"position {min(points.positions)} is before the start of a {width}-token prompt",
            "use positions closer to the end",
        )
    index = torch.tensor(points.positions)  # moved to each hook's device (blocks may sit on several)

    def take(activation: torch.Tensor) -> torch.Tensor:
        return activation.index_select(1, index.to(activation.device) + activation.shape[1]).float().cpu()

    states = read_hook_points(model, batch, [hook_point_name(points.hook, i) for i in points.layers], take)
    return torch.stack(states, dim=1)


class ReadOptions(TypedDict, total=False):
    """What a residual read takes besides the model and the prompts (every key optional).

    Keys:
        layers: block indices (default: all). ``resid_pre`` of layer ``l`` is HF ``hidden_states[l]``.
        positions: negative offsets from the end of the prompt, or ``"post_instruction"``
            (default ``(-1,)``, the last token).
        hook: ``resid_pre`` (default), ``resid_mid``, ``resid_post``, ``attn_out`` or ``mlp_out``.
        batch_size: prompts per forward pass (default 16).
        system_prompt: overrides the formatter's default system prompt.
        progress: show a progress bar (default off).
        reader: read through another engine (:class:`ResidualReader`, e.g. vLLM) instead of the
            bridge's hooks.
    """

    layers: Sequence[int] | None
    positions: PositionSpec
    hook: HookName
    batch_size: int
    system_prompt: str | None
    progress: bool
    reader: ResidualReader | None


def collect_activations(
    model: ChatModel, prompts: PromptSource, **options: Unpack[ReadOptions]
) -> Activations:
    """Read residual activations ``[n_prompts, n_layers, n_positions, d_model]`` (raw HF basis) of
    ``prompts`` (instructions, formatted here with the chat template); ``options``: :class:`ReadOptions`."""
    read = _read_all(model, prompts, **options)
    tensor = torch.cat(list(read.chunks))
    return Activations(tensor, *read.layout(model), read.prompts, read.system_prompt)


def sum_activations(
    model: ChatModel, prompts: PromptSource, **options: Unpack[ReadOptions]
) -> ActivationSums:
    """Streaming mode of :func:`collect_activations` (same options): float64 per-(layer, position)
    sums; memory flat in the number of prompts."""
    read = _read_all(model, prompts, **options)
    sums = torch.zeros(len(read.points.layers), len(read.points.positions), model.d_model, dtype=torch.double)
    count = 0
    for chunk in read.chunks:
        sums += chunk.double().sum(0)
        count += chunk.shape[0]
    return ActivationSums(sums, count, *read.layout(model))


@dataclass
class _Read:
    """A validated read request and its lazy stream of per-batch reads."""

    prompts: PromptSet
    points: ReadPoints
    system_prompt: str | None
    chunks: Iterator[Float[torch.Tensor, "batch n_layers n_positions d_model"]]

    def layout(self, model: ChatModel) -> tuple[tuple[int, ...], tuple[int, ...], str, str]:
        """``(layers, positions, hook, space)``: the axes and basis of every result of the read."""
        space = "processed" if model.compatibility_mode else "raw_hf"
        return self.points.layers, self.points.positions, self.points.hook, space


def _read_all(
    model: ChatModel,
    prompts: PromptSource,
    *,
    layers: Sequence[int] | None = None,
    positions: PositionSpec = (-1,),
    hook: HookName = "resid_pre",
    batch_size: int = 16,
    system_prompt: str | None = None,
    progress: bool = False,
    reader: ResidualReader | None = None,
) -> _Read:
    """Validate the request (the defaults of :class:`ReadOptions` are these); nothing is read yet."""
    prompt_set = PromptSet.load(prompts)
    layer_ids, pos = resolve_layers(model, layers), resolve_positions(model, positions, system_prompt)
    points = ReadPoints(layer_ids, pos, hook)
    encoded = track(
        batches(model, prompt_set, batch_size, system_prompt),
        f"reading {hook}",
        total=-(-len(prompt_set) // batch_size),
        enabled=progress,
    )
    read = reader.read if reader is not None else _read_batch
    chunks = (read(model, batch, points) for batch in encoded)
    return _Read(prompt_set, points, system_prompt, chunks)
