"""The checks of one architecture case, each against a reference computed here, independently of
the library's edit code: Hugging Face ``hidden_states`` for residual reads, the edit formulas in
float64 for exported tensors (per expert for fused expert tensors), the checkpoint's bytes for
everything an edit must leave alone, and a vanilla float64 reload for the completeness of the
writers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from lens_safety.edits import orthogonalize, rosi
from lens_safety.edits.checkpoint import checkpoint_writers, weight_shards
from lens_safety.edits.spec import DEFAULT_TARGETS
from lens_safety.errors import LensSafetyError
from lens_safety.export import export_edit

ALPHA = 5.0


def vanilla(path: Path, dtype: torch.dtype) -> Any:
    """A plain ``from_pretrained`` load (eager attention and experts: grouped expert kernels take
    no float64), for reference computations."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, attn_implementation="eager", experts_implementation="eager"
    ).eval()


def stored_state(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint at ``path`` by its stored name, in its stored dtype."""
    state: dict[str, torch.Tensor] = {}
    for shard in weight_shards(path):
        state.update(load_file(str(shard)))
    return state


def check_residuals(model: Any, ids: torch.Tensor) -> float:
    """Largest relative error of the bridge's ``resid_pre`` against HF ``hidden_states``."""
    with torch.inference_mode():
        _, cache = model.bridge.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_resid_pre"))
        hidden = vanilla(model.hf_path, torch.float32)(ids, output_hidden_states=True).hidden_states
    worst = 0.0
    for layer in range(model.n_layers):
        ours, theirs = cache[f"blocks.{layer}.hook_resid_pre"].float(), hidden[layer].float()
        worst = max(worst, float((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-12)))
    return worst


def expected_tensor(
    method: str,
    base: torch.Tensor,
    layout: str,
    is_bias: bool,
    s: torch.Tensor,
    *,
    alpha: float = ALPHA,
    read: torch.Tensor | None = None,
) -> torch.Tensor:
    """The edit of one stored tensor from the formulas in float64; a leading expert axis (a fused
    ``[n_experts, ...]`` tensor) is edited one expert at a time.

    ``rosi``: ``W + alpha s w_bar^T`` (``w_bar`` the mean of the ``d_model`` rows);
    ``conditional_rosi``: ``(I + alpha s g^T) W``; ``orthogonalize``: ``(I - s s^T) W``.
    """
    w = base.to(torch.float64)
    if w.ndim == (2 if is_bias else 3) and layout != "embedding":
        return torch.stack(
            [expected_tensor(method, part, layout, is_bias, s, alpha=alpha, read=read) for part in w]
        )
    rows = layout in ("conv1d", "embedding")
    writes = w.unsqueeze(-1) if is_bias else (w.T if rows else w)  # [d_model, n_writes]
    if method == "rosi":
        new = writes + alpha * torch.outer(s, writes.mean(0))
    elif method == "conditional_rosi":
        assert read is not None
        new = writes + alpha * torch.outer(s, read @ writes)
    else:
        new = writes - torch.outer(s, s @ writes)
    return new.squeeze(-1) if is_bias else (new.T if rows else new)


def check_formula(
    model: Any,
    out: Path,
    method: str,
    s: torch.Tensor,
    *,
    alpha: float = ALPHA,
    read: torch.Tensor | None = None,
) -> float:
    """Largest relative error ``|dW - dW_formula| / |dW_formula|`` over the exported tensors an edit
    changed; raises if an edited tensor is missing, a writer tensor of a targeted kind was not
    edited, or any other stored tensor changed at all (compared tensor by tensor, bitwise)."""
    record = json.loads((out / "edit.json").read_text())
    edited = set(record["edited_parameters"])
    kinds = DEFAULT_TARGETS[method]
    tensors = {t.key: (w, t) for w in checkpoint_writers(model) for t in w.tensors}
    expected_keys = {k for k, (w, _) in tensors.items() if w.kind in kinds}
    if edited != expected_keys:
        raise AssertionError(f"edited {sorted(edited ^ expected_keys)[:3]} differ from the targeted writers")
    base, new = stored_state(model.hf_path), stored_state(out)
    added = set(new) - set(base)
    if set(base) - set(new) or (added and not record["untied"]) or len(added) > 1:
        raise AssertionError(f"the export's tensor names differ: {sorted(set(base) ^ set(new))[:3]}")
    worst = 0.0
    for name, tensor in base.items():
        if name not in edited:
            if not torch.equal(new[name], tensor):
                raise AssertionError(f"{name} changed but is not an edited parameter")
            continue
        _, info = tensors[name]
        expected = expected_tensor(method, tensor, info.layout, info.is_bias, s, alpha=alpha, read=read)
        delta = expected - tensor.to(torch.float64)
        got = new[name].to(torch.float64) - tensor.to(torch.float64)
        worst = max(worst, float((got - delta).norm() / delta.norm().clamp_min(1e-30)))
    return worst


def check_complete(out: Path, s: torch.Tensor, ids: torch.Tensor, n_layers: int) -> float:
    """Largest ``|s^T h| / |h|`` of the residual entering each block of an abliterated export."""
    with torch.inference_mode():
        hidden = vanilla(out, torch.float64)(ids, output_hidden_states=True).hidden_states
    return max(
        float(((hidden[layer][0] @ s).abs() / hidden[layer][0].norm(dim=-1).clamp_min(1e-30)).max())
        for layer in range(n_layers)
    )


def check_edits(model: Any, root: Path, ids: torch.Tensor) -> str:
    """Export ROSI and abliteration and check both (formula, untouched tensors, completeness);
    returns a note, raises AssertionError on a failure."""
    s = torch.randn(model.d_model, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    s = s / s.norm()
    export_edit(model, rosi(s, ALPHA), root / "rosi")
    if (err := check_formula(model, root / "rosi", "rosi", s)) >= 1e-3:
        raise AssertionError(f"ROSI export differs from the formula by {err:.2g} (relative)")
    try:
        export_edit(model, orthogonalize(s), root / "ablated")
    except LensSafetyError as exc:
        if "post-norm" not in str(exc):
            raise
        return "abliteration refused (writers pass through a post-norm); ROSI exact"
    if (err := check_formula(model, root / "ablated", "orthogonalize", s)) >= 1e-3:
        raise AssertionError(f"abliterated export differs from the formula by {err:.2g} (relative)")
    if (leak := check_complete(root / "ablated", s, ids, model.n_layers)) > 1e-6:
        raise AssertionError(
            f"abliterated residual keeps {leak:.2g} of its norm along s (a writer was missed)"
        )
    return "ROSI and abliteration exact"
