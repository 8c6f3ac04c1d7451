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
from lens_safety.edits.methods import edit_method
from lens_safety.errors import LensSafetyError
from lens_safety.export import export_edit
from lens_safety.forward_pass import forward
from lens_safety.interventions import ablation_hook_points
from lens_safety.models import ChatModel

ALPHA = 5.0


def vanilla(path: Path, dtype: torch.dtype, attention: str = "eager") -> Any:
    """A plain ``from_pretrained`` load (eager attention and experts: grouped expert kernels take
    no float64), for reference computations."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, attn_implementation=attention, experts_implementation="eager"
    ).eval()


def stored_state(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint at ``path`` by its stored name, in its stored dtype."""
    state: dict[str, torch.Tensor] = {}
    for shard in weight_shards(path):
        state.update(load_file(str(shard)))
    return state


def check_residuals(model: ChatModel, ids: torch.Tensor) -> float:
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
    model: ChatModel,
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
    kinds = edit_method(method).default_targets
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
        try:
            hidden = vanilla(out, torch.float64)(ids, output_hidden_states=True).hidden_states
        except RuntimeError:  # XGLM's eager attention fills a default-dtype scalar with float64's min
            default = torch.get_default_dtype()
            torch.set_default_dtype(torch.float64)
            try:
                hidden = vanilla(out, torch.float64)(ids, output_hidden_states=True).hidden_states
            finally:
                torch.set_default_dtype(default)
    return max(
        float(((hidden[layer][0] @ s).abs() / hidden[layer][0].norm(dim=-1).clamp_min(1e-30)).max())
        for layer in range(n_layers)
    )


def _fireable(model: ChatModel, names: list[str], ids: torch.Tensor) -> list[str]:
    """The hook points among ``names`` the bridge has and accepts a hook on (parallel-attention
    blocks have no ``hook_resid_mid``)."""
    out = []
    for name in names:
        if name not in model.bridge.hook_dict:
            continue
        try:
            with torch.inference_mode(), model.bridge.hooks(fwd_hooks=[(name, lambda x, hook: x)]):
                model.bridge(ids[:, :2])
        except Exception:
            continue
        out.append(name)
    return out


def _sublayer(hf_name: str, layer: int) -> str:
    """The decoder-layer child a writer belongs to (``model.layers.3.mlp.experts`` -> ``mlp``)."""
    return hf_name.split(f".{layer}.", 1)[-1].split(".", 1)[0]


def check_ablation(model: ChatModel, out: Path, s: torch.Tensor, batch: Any) -> float | None:
    """Largest ``|logit|`` difference between a vanilla reload of the abliterated export and
    inference-time directional ablation ``x - s (s^T x)`` of the base model at every block's
    ``resid_pre`` / ``resid_mid`` / ``resid_post`` (parallel attention + MLP blocks and
    single-mixer blocks have no ``resid_mid``): equal when exactly the residual writers were projected (a missed writer, or an
    edited tensor that is not one, makes them differ). ``None`` where the bridge lacks the hook
    points to ablate every read of the residual."""
    names = _fireable(model, ablation_hook_points(model.n_layers), batch.input_ids)
    parallel = bool(getattr(model.bridge.cfg, "parallel_attn_mlp", False))
    for layer in range(model.n_layers):
        count = len({_sublayer(w.hf_name, layer) for w in model.arch.writers if w.layer == layer})
        hooked = all(f"blocks.{layer}.hook_resid_{p}" in names for p in ("pre", "post"))
        if not hooked or (count > 1 and not parallel and f"blocks.{layer}.hook_resid_mid" not in names):
            return None  # a sequential block without resid_mid: its second sub-layer would read s
    unit = s.to(torch.float32)

    def ablate(x: torch.Tensor, hook: Any) -> torch.Tensor:
        u = unit.to(x.device, x.dtype)
        return x - (x @ u).unsqueeze(-1) * u

    with torch.inference_mode(), model.bridge.hooks(fwd_hooks=[(name, ablate) for name in names]):
        ablated = forward(model, batch).logits.float()
    with torch.inference_mode():
        edited = vanilla(out, torch.float32)(batch.input_ids).logits.float()
    return float((edited - ablated).abs().max())


def check_edits(model: ChatModel, root: Path, batch: Any) -> str:
    """Export ROSI and abliteration and check both (formula, untouched tensors, completeness,
    equality with directional ablation); returns a note, raises AssertionError on a failure."""
    s = torch.randn(model.d_model, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    s = s / s.norm()
    export_edit(model, rosi(s, ALPHA), root / "rosi")
    if (err := check_formula(model, root / "rosi", "rosi", s)) >= 1e-3:
        raise AssertionError(f"ROSI export differs from the formula by {err:.2g} (relative)")
    try:
        export_edit(model, orthogonalize(s), root / "ablated")
    except LensSafetyError as exc:
        if "post-norm" in str(exc):
            return "abliteration refused (writers pass through a post-norm); ROSI exact"
        if "joined by" in str(exc):
            return "abliteration refused (a weightless position embedding); ROSI exact"
        raise
    if (err := check_formula(model, root / "ablated", "orthogonalize", s)) >= 1e-3:
        raise AssertionError(f"abliterated export differs from the formula by {err:.2g} (relative)")
    if (leak := check_complete(root / "ablated", s, batch.input_ids, model.n_layers)) > 1e-6:
        raise AssertionError(
            f"abliterated residual keeps {leak:.2g} of its norm along s (a writer was missed)"
        )
    if (gap := check_ablation(model, root / "ablated", s, batch)) is None:
        return "ROSI and abliteration exact (no ablation hooks to compare with)"
    if gap > 1e-4:
        raise AssertionError(f"abliterated export differs from directional ablation by {gap:.2g} in logits")
    return "ROSI and abliteration exact"
