"""Whether block 0 reads the embedding's write as it is, found by running the model up to block 0.

The embedding writers (the token embedding, plus a position embedding) write ``e`` (raw Hugging
Face basis); block 0 reads ``x = g(e)``, where ``g`` is whatever the model's forward does in
between. Abliterating the embedding (``e -> (I - s s^T) e``) equals inference-time directional
ablation at block 0's input (``x -> (I - s s^T) x``) for every unit ``s`` only when ``g(e) = c e``
with one constant ``c`` (1, RecurrentGemma's ``sqrt(d_model)``, Granite's embedding multiplier). A norm in
between (Bloom's ``word_embeddings_layernorm``; NanoChat's final RMS norm, which
``NanoChatModel.forward`` also applies to the embedding, with no module the bridge's adapter
names) or a linear map breaks this: the embedding is then a writer through a post-norm.

The probe runs the model on one token in a batch of two rows and stops it by raising at block 0's
input, so nothing beyond the embedding lookup and what the forward does before block 0 is
computed. Forward hooks scale the embedding writers' outputs by 1 in the first row and by 2 in the
second (a power of two: exact in every float format). ``g(e) = c e`` requires ``x_2 = 2 x_1``
(homogeneity: a norm is scale invariant, ``x_2 = x_1``) and ``x_1`` parallel to ``e`` (a norm's
weights or bias, or a linear map, turn it), each within a relative error of 1e-4 (1e-2 for 16-bit
floats), computed in float64.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import nn

from lens_safety.architecture.types import clean_hf_name
from lens_safety.errors import LensSafetyError
from lens_safety.placement import input_device

REPORT = "report this architecture to lens-safety"


class _ReachedBlock0(Exception):
    """Raised by the pre-hook of block 0 to stop the forward there."""


@dataclass(frozen=True)
class _Probe:
    """The embedding writers' write of the probe token and block 0's input, both rows."""

    write: Float[torch.Tensor, " d_model"]  # as the model computed it (its dtype and device)
    block_input: Float[torch.Tensor, "2 d_model"]


@contextmanager
def _scaled(modules: list[nn.Module], raw: list[torch.Tensor]) -> Iterator[None]:
    """Forward hooks multiplying each module's output by ``[1, 2]`` along the batch axis (a position
    table of batch 1 broadcasts), recording the unscaled output in ``raw``."""

    def hook(_module: nn.Module, _args: Any, out: torch.Tensor) -> torch.Tensor:
        raw.append(out.detach())
        scale = torch.tensor([1.0, 2.0], dtype=out.dtype, device=out.device)
        return out * scale.view(2, *([1] * (out.ndim - 1)))

    with ExitStack() as stack:
        for module in modules:
            stack.callback(module.register_forward_hook(hook).remove)
        yield


def _probe_tokens(embedding: nn.Module) -> list[int]:
    """Tokens to probe with, away from the special tokens at the start and the padding row (often
    zero): another is tried only where one's embedding row is zero."""
    weight = getattr(embedding, "weight", None)
    vocab = int(weight.shape[0]) if isinstance(weight, torch.Tensor) else 2
    padding = getattr(embedding, "padding_idx", None)
    return [t for t in dict.fromkeys((vocab // 2, vocab // 3, vocab - 1)) if t != padding]


def _probe(hf_model: nn.Module, writers: list[nn.Module], block: nn.Module, token: int) -> _Probe:
    """Run the model on ``token`` up to block 0 (module docstring)."""
    seen: list[torch.Tensor] = []

    def stop(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if isinstance(hidden, torch.Tensor):
            seen.append(hidden.detach())
        raise _ReachedBlock0

    raw: list[torch.Tensor] = []
    ids = torch.full((2, 1), token, dtype=torch.long, device=input_device(hf_model))
    handle = block.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        with torch.no_grad(), _scaled(writers, raw):
            hf_model(input_ids=ids, use_cache=False)
    except _ReachedBlock0:
        pass
    finally:
        handle.remove()
    if not seen or len(raw) != len(writers):
        raise LensSafetyError("the forward did not reach block 0 through the embedding", REPORT)
    width = seen[0].shape[-1]
    if seen[0].numel() != 2 * width or any(out.shape[-1] != width for out in raw):
        per_token = tuple(seen[0].shape[2:]) if seen[0].ndim > 2 else (width,)
        raise LensSafetyError(
            f"the embedding of {type(hf_model).__name__} writes width {raw[0].shape[-1]} but block 0 "
            f"reads shape {per_token} per token (a projection or several residual streams lie in "
            "between), so its residual writers cannot be located",
            "this architecture is not supported for edits yet",
        )
    write = sum((out.reshape(-1, width)[0] for out in raw[1:]), raw[0].reshape(-1, width)[0])
    return _Probe(write, seen[0].reshape(2, -1))


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm()) <= tol * float(b.norm())


def _named_norm(
    hf_model: nn.Module, names: dict[int, str], probe: _Probe, tol: float, blocks: Iterable[nn.Module]
) -> str | None:
    """The HF name of a norm module outside the decoder layers that maps the embedding's write to
    block 0's input, if any (a weightless norm inside a layer may compute the same)."""
    inside = {id(module) for block in blocks for module in block.modules()}
    for module in hf_model.modules():
        kind = type(module).__name__
        if "Norm" not in kind or kind.endswith("Bridge") or id(module) not in names or id(module) in inside:
            continue
        try:
            with torch.no_grad():
                out = module(probe.write.unsqueeze(0))
        except Exception:  # a norm that takes other arguments is not the one
            continue
        if isinstance(out, torch.Tensor) and _close(out.reshape(-1), probe.block_input[0], tol):
            return clean_hf_name(names[id(module)])
    return None


def embedding_path(
    hf_model: nn.Module, names: dict[int, str], writers: list[nn.Module], blocks: Sequence[nn.Module]
) -> str | None:
    """``None`` when block 0 reads ``c e`` for the embedding writers' write ``e``, else what lies in
    between (module docstring): the HF name of the norm that does it, where one is found, or the
    model's forward.

    Args:
        hf_model: the Hugging Face model (bridge wrappers in place).
        names: module id -> HF name (:func:`lens_safety.architecture.writers.hf_names`).
        writers: the HF modules of the embedding writers (the token embedding first).
        blocks: the modules the forward calls as its decoder layers, in order.
    """
    for token in _probe_tokens(writers[0]):
        probe = _probe(hf_model, writers, blocks[0], token)
        e, x = probe.write.double().cpu(), probe.block_input.double().cpu()
        if float(e.norm()) > 0.0 and float(x[0].norm()) > 0.0:
            break
    else:
        raise LensSafetyError(
            "the embedding writes zero for every probe token, so its path to block 0 is unknown", REPORT
        )
    tol = 1e-2 if probe.write.dtype.itemsize < 4 else 1e-4
    homogeneous = _close(x[1], 2 * x[0], tol)
    parallel = _close(x[0], (x[0] @ e) / (e @ e) * e, tol)
    if homogeneous and parallel:
        return None
    found = _named_norm(hf_model, names, probe, tol, blocks)
    where = found or f"{type(hf_model).__name__}'s forward"
    return f"{where}, between the embedding and block 0"
