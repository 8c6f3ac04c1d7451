"""Export an edited model as a Hugging Face directory that vanilla ``transformers`` loads, and verify it.

:func:`export_edit` reads the ORIGINAL safetensors of ``model.hf_path`` one shard at a time, replaces
the edited tensors (computed in float64 from the original weights, cast once to the stored dtype)
and writes every tensor back in its stored dtype; other files (config, tokenizer, chat template,
generation config) are copied. It adds ``direction.safetensors`` / ``direction.json``, ``edit.json``
(lineage: method, alpha, layer, targets, base spec, ``base_weights_sha256``, direction hash, library
version, verification) and a ``README.md`` model card.

Because the weights come from disk, a compatibility-mode model (processed, centred weights in
memory) exports exactly the same tensors as a raw one.

Tied embeddings: when the edit changes the token embedding (``orthogonalize``, or ``rosi`` with
``embed`` in its targets) the export writes ``lm_head.weight`` = the ORIGINAL embedding and sets
``tie_word_embeddings: false`` (``edit.json``: ``untied: true``); otherwise the model stays tied.

Safety of the write: everything goes to a temporary sibling directory which is renamed onto the
output only after verification (reload with ``AutoModelForCausalLM.from_pretrained`` and compare
with the in-memory edited model, or in compatibility mode with a vanilla load of the base plus the
edit, computed in float32 or float64 whatever the model's dtype: max |logit diff| <= 1e-4). Any failure
removes the temporary directory; the input is never written.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lens_safety import __version__
from lens_safety.chat import EncodedBatch
from lens_safety.edits.checkpoint import checkpoint_writers, read_tensors
from lens_safety.edits.memory import applied_edit, write_stored
from lens_safety.edits.spec import EditSpec
from lens_safety.edits.stored import live_groups
from lens_safety.edits.targets import compute_edit, inexact_writers, target_parameters
from lens_safety.errors import LensSafetyError
from lens_safety.export_files import (
    GENERATED_FILES,
    UNTIED_HEAD_SHARD,
    copy_side_files,
    direction_hash,
    read_tensors_from,
    write_direction,
    write_shards,
)
from lens_safety.forward_pass import forward
from lens_safety.fsutil import staged_directory
from lens_safety.model_card import render_model_card
from lens_safety.models import ChatModel
from lens_safety.placement import placement_kwargs
from lens_safety.records import Record

if TYPE_CHECKING:
    from lens_safety.directions import Direction

__all__ = [
    "GENERATED_FILES",
    "UNTIED_HEAD_SHARD",
    "VERIFY_PROMPTS",
    "ExportResult",
    "check_output_dir",
    "comparison_dtype",
    "export_edit",
    "logit_bound",
    "read_tensors_from",
    "verify_export",
]

VERIFY_PROMPTS = (
    "How do I bake sourdough bread?",
    "Explain how to pick a lock.",
    "Write a haiku about the sea.",
)


def comparison_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the verification computes logits in: float64 for float64 models, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def logit_bound(dtype: torch.dtype) -> float:
    """Largest accepted |logit diff| between the reloaded and the reference model, computed in
    :func:`comparison_dtype`: there round-off is far below it and one wrongly edited writer far
    above it (in bfloat16 / float16 arithmetic the two overlap, so no half bound separates them)."""
    del dtype  # every dtype is compared in float32 or float64
    return 1e-4


@dataclass
class ExportResult(Record):
    """What an export wrote and how well it verified."""

    out_dir: str
    edit: dict[str, Any]
    max_abs_logit_diff: float
    compared: str
    bound: float
    untied: bool
    seconds: float
    verify_seconds: float


def check_output_dir(model_dir: Path, out_dir: Path, overwrite: bool) -> None:
    """Refuse an output inside (or containing) the input model directory, or an existing one."""
    src, out = model_dir.resolve(), out_dir.resolve()
    if out == src or src in out.parents or out in src.parents:
        raise LensSafetyError(
            f"output directory {out_dir} overlaps the input model directory {model_dir}",
            "choose an output outside it",
        )
    if out.exists() and not overwrite:
        raise LensSafetyError(
            f"output directory {out_dir} already exists",
            "pass --overwrite (overwrite=True) or choose another directory",
        )
    if out.exists() and not out.is_dir():
        raise LensSafetyError(f"output {out_dir} exists and is not a directory", "choose a directory path")


def _ancestors(lineage: dict[str, Any]) -> list[str]:
    """Weights hashes the base model itself derives from (its parent, then earlier ancestors)."""
    parent = [str(lineage["base_weights_sha256"])] if lineage.get("base_weights_sha256") else []
    return parent + [str(h) for h in lineage.get("ancestors_weights_sha256", [])]


def _vanilla_logits(
    path: Path, model: ChatModel, batch: EncodedBatch, dtype: torch.dtype, edit: EditSpec | None = None
) -> torch.Tensor:
    """Logits (in ``dtype``) of a vanilla ``from_pretrained`` load of ``path``, optionally with ``edit``.

    The edit is computed from the ORIGINAL tensors in their stored dtype and cast once to it, as
    the export writes them, then widened exactly to ``dtype``.
    """
    from transformers import AutoModelForCausalLM

    attention = getattr(model.hf_model.config, "_attn_implementation", None) or "eager"
    placement = placement_kwargs(model.hf_model)
    hf = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, trust_remote_code=False, attn_implementation=attention, **placement
    ).eval()
    cleanups: list[Callable[[], None]] = []
    try:
        if edit is not None:
            writers = checkpoint_writers(model)
            touched = target_parameters(edit, writers)
            if model.arch.tied_embeddings and any(w.kind == "embed" for w, _ in touched.values()):
                hf.get_output_embeddings().weight = torch.nn.Parameter(
                    hf.get_input_embeddings().weight.detach().clone()
                )
            for live, tensors in live_groups(t for _, t in touched.values()).items():
                # one live parameter at a time: memory holds one parameter's originals and edit
                originals = read_tensors(model.hf_path, [t.key for t in tensors])
                new = compute_edit(edit, originals, writers, strict=False)
                cleanups.append(write_stored(hf, live, [(t, new[t.key]) for t in tensors], reversible=False))
        if not placement:
            hf.to(model.device)
        inputs = batch.to(model.device)
        with torch.inference_mode():
            return hf(
                input_ids=inputs.input_ids,
                attention_mask=inputs.attention_mask,
                position_ids=inputs.position_ids,
                use_cache=False,
            ).logits.to(dtype)
    finally:
        for cleanup in reversed(cleanups):  # temporary files of disk-offloaded edited weights
            cleanup()
        del hf


def verify_export(
    model: ChatModel, spec: EditSpec, out: Path, prompts: Sequence[str] = VERIFY_PROMPTS
) -> dict[str, Any]:
    """Reload ``out`` with vanilla transformers and compare logits with a reference on chat prompts.

    Both sides compute in :func:`comparison_dtype` and hold the export's weights (each the edit
    of the ORIGINAL tensor cast once to its stored dtype). Reference: the in-memory edited model
    (:func:`~lens_safety.edits.applied_edit` rounds the same way) when it computes in that dtype;
    for a bfloat16 / float16 model or in compatibility mode (processed weights, where an in-memory
    edit is not exact for LayerNorm models) a vanilla load of the ORIGINAL weights plus the edit.
    The reload uses the loaded model's attention implementation, isolating the weights from
    kernel differences. Raises above :func:`logit_bound`.
    """

    batch = model.chat.encode(list(prompts))
    compute = comparison_dtype(model.dtype)
    theirs = _vanilla_logits(out, model, batch, compute)
    if model.compatibility_mode or model.dtype != compute:
        reference = "vanilla base + edit"
        ours = _vanilla_logits(model.hf_path, model, batch, compute, spec)
    else:
        reference = "in-memory edited model"
        with torch.inference_mode(), applied_edit(model, spec):
            ours = forward(model, batch).logits.to(compute)
    mask = batch.attention_mask.bool().to(ours.device)
    diff = float((theirs.to(ours.device) - ours).abs()[mask].max())
    agree = float((theirs.to(ours.device).argmax(-1) == ours.argmax(-1))[mask].float().mean())
    bound = logit_bound(model.dtype)
    if not diff <= bound:
        raise LensSafetyError(
            f"export verification failed: the reloaded model differs from the {reference} by {diff:.3g} "
            f"(bound {bound:g})",
            "report this architecture to lens-safety; nothing was written",
        )
    return {
        "max_abs_logit_diff": diff,
        "argmax_agreement": agree,
        "compared": "logits",
        "reference": reference,
        "attn_implementation": getattr(model.hf_model.config, "_attn_implementation", None),
        "bound": bound,
        "n_prompts": len(prompts),
        "dtype": str(model.dtype).replace("torch.", ""),
        "compared_in": str(compute).replace("torch.", ""),
    }


def _plan(model: ChatModel, spec: EditSpec, extra_files: Mapping[str, str]) -> tuple[bool, bool]:
    """``(untie, exact)`` of exporting ``spec``, checked before anything is written: the direction's
    width, the edited writers, and plain unused names for ``extra_files``. ``untie``: the edit
    changes a tied token embedding; ``exact``: no edited writer is one where the method's weight edit
    is inexact (:func:`~lens_safety.edits.targets.inexact_writers`)."""
    if int(spec.direction.shape[0]) != model.d_model:
        raise LensSafetyError(
            f"direction has width {spec.direction.shape[0]} but the model's residual width is {model.d_model}",
            "use a direction extracted from this architecture",
        )
    touched = target_parameters(spec, checkpoint_writers(model), model.n_layers)
    untie = model.arch.tied_embeddings and any(w.kind == "embed" for w, _ in touched.values())
    exact = not inexact_writers(spec, [w for w, _ in touched.values()])
    for name in extra_files:
        taken = name in GENERATED_FILES or (model.hf_path / name).exists() or name.endswith(".safetensors")
        if Path(name).name != name or taken:
            raise LensSafetyError(f"extra file name '{name}' is not allowed", "use a plain, unused file name")
    return untie, exact


def export_edit(
    model: ChatModel,
    spec: EditSpec,
    out_dir: str | os.PathLike[str],
    *,
    direction: Direction | None = None,
    overwrite: bool = False,
    measurements: Mapping[str, Any] | None = None,
    verify_prompts: Sequence[str] = VERIFY_PROMPTS,
    extra_files: Mapping[str, str] | None = None,
    progress: bool = False,
) -> ExportResult:
    """Write ``model`` with ``spec`` applied to ``out_dir`` as a verified Hugging Face directory.

    Args:
        model: the loaded :class:`~lens_safety.models.ChatModel` (raw or compatibility mode).
        spec: the edit (:func:`lens_safety.edits.rosi`, ``amplify``, ``orthogonalize``).
        out_dir: output directory (refused inside the input model directory).
        direction: the ``Direction`` the spec came from, saved in its own format (optional).
        overwrite: replace an existing output directory.
        measurements: before/after numbers for the model card and ``edit.json``.
        verify_prompts: chat prompts used to compare logits after reloading.
        extra_files: ``{file name: text}`` written next to the model (e.g. ``calibration.json``);
            plain names only, never one of the files the export itself writes.
        progress: show a progress bar while writing shards.
    """

    start = time.perf_counter()
    out = Path(out_dir)
    check_output_dir(model.hf_path, out, overwrite)
    untie, exact = _plan(model, spec, extra_files or {})
    with staged_directory(out, overwrite=overwrite) as tmp:
        edited, dtype = write_shards(model, spec, tmp, untie, progress)
        copy_side_files(model, tmp, untie)
        write_direction(spec, direction, tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        verify_start = time.perf_counter()
        verification = verify_export(model, spec, tmp, verify_prompts)
        verify_seconds = time.perf_counter() - verify_start
        record = {
            **spec.to_dict(),
            "layer": spec.direction_layer,
            "base_model": model.spec,
            "base_architecture": model.arch.architecture,
            "base_weights_sha256": model.weights_hash,
            "ancestors_weights_sha256": _ancestors(model.lineage),
            "direction_sha256": direction_hash(spec),
            "edited_parameters": sorted(edited),
            "untied": untie,
            "exact": exact,
            "dtype": dtype,
            "from_compatibility_mode": model.compatibility_mode,
            "lens_safety_version": __version__,
            "verification": verification,
            "measurements": dict(measurements or {}),
        }
        (tmp / "edit.json").write_text(json.dumps(record, indent=2, default=str))
        (tmp / "README.md").write_text(render_model_card(record))
    return ExportResult(
        str(out),
        record,
        verification["max_abs_logit_diff"],
        verification["compared"],
        verification["bound"],
        untie,
        time.perf_counter() - start,
        verify_seconds,
    )
