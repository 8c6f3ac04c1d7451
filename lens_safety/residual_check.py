"""Load-time check that the bridge's residual hook points read the residual stream.

Everything lens-safety computes starts from ``blocks.{l}.hook_resid_pre``: directions, probes,
selection, conditional ROSI's read directions, SRR's features. TransformerBridge boots more
architectures than it reads correctly (on some state-space models its ``hook_resid_pre`` is not the
input of block ``l``), and a wrong read gives plausible-looking directions, not an error. So
:func:`check_residual_reads` compares, on one short token sequence, the bridge's ``resid_pre`` of
every block with the Hugging Face model's own ``hidden_states[l]`` (the input of decoder layer
``l``), both from ONE forward pass of the Hugging Face model with the bridge's hooks in place, the
path every residual read of lens-safety takes (same module, same weights, no second copy):

    err = max_l  max |resid_pre_l - hidden_l| / max |hidden_l|        (in float64)

and raises :class:`~lens_safety.errors.LensSafetyError` above :func:`residual_tolerance` (the two
compute the same operations, so the difference is round-off of the model's dtype; a wrong hook
point differs by order one). A bridge that cannot run the model at all is reported the same way,
as one error line. Run before compatibility mode rewrites the weights. Set
``LENS_SAFETY_SKIP_SELFCHECK=1`` to skip it knowingly.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from jaxtyping import Int

from lens_safety.errors import LensSafetyError
from lens_safety.placement import input_device

__all__ = ["CHECK_TEXT", "check_residual_reads", "residual_error", "residual_tolerance"]

#: the token sequence of the check (a plain sentence: no chat template needed)
CHECK_TEXT = "The quick brown fox jumps over the lazy dog, and then it rests."
SUPPORTED = "use an architecture TransformerBridge reads correctly (docs: how-to/architectures.md)"


def residual_tolerance(dtype: torch.dtype) -> float:
    """Largest accepted relative difference: 1e-4 in float32 / float64, 2e-2 in half precision
    (bfloat16 keeps 8 significant bits; a wrong hook point differs by order one)."""
    return 2e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4


def residual_error(bridge: Any, ids: Int[torch.Tensor, "1 seq"]) -> tuple[float, int]:
    """``(err, block)``: the largest relative difference between the bridge's ``resid_pre`` and
    HF ``hidden_states`` over every block (float64), and the block where it is largest."""
    n_layers = len(bridge.blocks)
    cache: dict[str, torch.Tensor] = {}

    def keeper(name: str) -> Any:
        def keep(activation: torch.Tensor, hook: Any) -> torch.Tensor:
            cache[name] = activation.detach()
            return activation

        return keep

    # one pass, the way lens-safety reads: the HF forward with the bridge's hooks in place
    names = [f"blocks.{layer}.hook_resid_pre" for layer in range(n_layers)]
    points = [(name, keeper(name)) for name in names]
    with torch.inference_mode(), bridge.hooks(fwd_hooks=points):
        hidden = bridge.original_model(ids, output_hidden_states=True, use_cache=False).hidden_states
    if hidden is None or len(hidden) < n_layers:
        raise LensSafetyError(
            f"{type(bridge.original_model).__name__} returns no hidden state per block to check the "
            "bridge's residual reads against",
            SUPPORTED,
        )
    worst, where = 0.0, 0
    for layer in range(n_layers):
        name = f"blocks.{layer}.hook_resid_pre"
        if name not in cache:
            return float("inf"), layer
        ours = cache[name].to("cpu", torch.float64)
        theirs = hidden[layer].to("cpu", torch.float64)
        if ours.shape != theirs.shape:
            return float("inf"), layer
        err = float((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-12))
        if not err <= worst:  # NaN counts as the worst
            worst, where = err, layer
    return worst, where


def check_residual_reads(bridge: Any, tokenizer: Any, dtype: torch.dtype) -> float:
    """Raise unless the bridge's ``resid_pre`` equals HF ``hidden_states`` at every block (see the
    module docstring); return the relative error (``0.0`` when skipped by the environment)."""
    if os.environ.get("LENS_SAFETY_SKIP_SELFCHECK") == "1":
        return 0.0
    architecture = type(bridge.original_model).__name__
    ids = tokenizer(CHECK_TEXT, return_tensors="pt").input_ids[:, :16]
    ids = ids.to(input_device(bridge.original_model))
    try:
        err, layer = residual_error(bridge, ids)
    except (RuntimeError, AttributeError, TypeError, ValueError, KeyError, IndexError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise LensSafetyError(
            f"TransformerBridge cannot run {architecture} ({type(exc).__name__}: {first[:160]})", SUPPORTED
        ) from None
    bound = residual_tolerance(dtype)
    if not err <= bound:
        raise LensSafetyError(
            f"TransformerBridge's resid_pre of {architecture} differs from its Hugging Face hidden "
            f"states by {err:.2g} (relative, block {layer}; bound {bound:g}): its hook points do not "
            "read the residual stream here",
            SUPPORTED,
        )
    return err
