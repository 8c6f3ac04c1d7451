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

import functools
import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lens_safety import __version__
from lens_safety.activations import forward
from lens_safety.architecture import clean_hf_name
from lens_safety.checkpoint_files import INDEX_FILE, SINGLE_FILE, read_header
from lens_safety.edits.checkpoint import checkpoint_writers, read_tensors, stream_edit_shard, weight_shards
from lens_safety.edits.memory import applied_edit, write_stored
from lens_safety.edits.spec import EditSpec, edit_writes_inplace
from lens_safety.edits.stored import live_groups
from lens_safety.edits.targets import compute_edit, target_parameters
from lens_safety.errors import LensSafetyError
from lens_safety.fsutil import staged_directory
from lens_safety.hashing import sha256_vector
from lens_safety.model_card import render_model_card
from lens_safety.placement import placement_kwargs
from lens_safety.progress import track

GENERATED_FILES = {
    "edit.json",
    "README.md",
    "direction.safetensors",
    "direction.json",
    "read_direction.safetensors",
    INDEX_FILE,
}
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
class ExportResult:
    """What an export wrote and how well it verified."""

    out_dir: str
    edit: dict[str, Any]
    max_abs_logit_diff: float
    compared: str
    bound: float
    untied: bool
    seconds: float
    verify_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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


def _direction_hash(spec: EditSpec) -> str:
    return sha256_vector(spec.direction.tolist())


def _output_embedding_name(model: Any) -> str | None:
    out = model.hf_model.get_output_embeddings()
    for name, module in model.hf_model.named_modules():
        if module is out:
            return clean_hf_name(name) + ".weight"
    return None


_DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
UNTIED_HEAD_SHARD = "lm_head.safetensors"


def _write_shards(
    model: Any, spec: EditSpec, tmp: Path, untie: bool, progress: bool
) -> tuple[list[str], str]:
    """Copy every shard byte for byte, then overwrite only the edited tensors' bytes in the copy.

    Untouched tensors are never decoded or re-encoded (the copy is the kernel's), so the cost is one
    file copy plus the rank-one update of the edited tensors, computed in float64 from the ORIGINAL
    tensors in reusable buffers (:func:`~lens_safety.edits.checkpoint.stream_edit_shard`) and cast
    once to the stored dtype. An untied ``lm_head`` (the original embedding) goes
    to its own extra shard listed in a (new or updated) ``model.safetensors.index.json``. Returns
    the edited names and the stored dtype of the token embedding.
    """
    writers = checkpoint_writers(model)
    targets = target_parameters(spec, writers, model.n_layers)
    embed_key = next(w.tensors[0].key for w in writers if w.kind == "embed")
    head_key = _output_embedding_name(model) if untie else None
    edits = {
        name: functools.partial(edit_writes_inplace, spec, layout=tensor.layout, is_bias=tensor.is_bias)
        for name, (_, tensor) in targets.items()
    }
    edited: list[str] = []
    weight_map: dict[str, str] = {}
    dtype = "float32"
    shards = weight_shards(model.hf_path)
    for shard in track(shards, "writing shards", total=len(shards), enabled=progress):
        _, header = read_header(shard)
        keys = [key for key in header if key != "__metadata__"]
        weight_map.update(dict.fromkeys(keys, shard.name))
        if embed_key in header:
            dtype = _DTYPE_NAMES.get(header[embed_key]["dtype"], header[embed_key]["dtype"])
        edited += stream_edit_shard(shard, tmp / shard.name, edits)
    missing = sorted(set(targets) - set(edited))
    if missing:
        raise LensSafetyError(
            f"edited parameter {missing[0]} was not found in any shard", "the checkpoint is incomplete"
        )
    index = model.hf_path / INDEX_FILE
    record = json.loads(index.read_text()) if index.is_file() else None
    if head_key and head_key not in weight_map:
        embedding = read_tensors_from(model.hf_path / weight_map[embed_key], [embed_key])[embed_key]
        head_shard = UNTIED_HEAD_SHARD
        if record is None:  # one file becomes two shards + index (transformers prefers model.safetensors)
            first, head_shard = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
            os.replace(tmp / SINGLE_FILE, tmp / first)
            weight_map = dict.fromkeys(weight_map, first)
        save_file({head_key: embedding.contiguous()}, str(tmp / head_shard), metadata={"format": "pt"})
        weight_map[head_key] = head_shard
        if record is None:
            total = sum((tmp / name).stat().st_size for name in set(weight_map.values()))
            record = {"metadata": {"total_size": total}}
    if record is not None:
        record["weight_map"] = dict(sorted(weight_map.items()))
        (tmp / INDEX_FILE).write_text(json.dumps(record, indent=2))
    return edited, dtype


def read_tensors_from(shard: Path, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The named tensors of one safetensors file (CPU, stored dtype)."""
    with safe_open(str(shard), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in names}


def _copy_side_files(model: Any, tmp: Path, untie: bool) -> None:
    for item in model.hf_path.iterdir():
        if item.is_file() and item.suffix != ".safetensors" and item.name not in GENERATED_FILES:
            shutil.copy2(item, tmp / item.name)
    if untie:
        config = json.loads((tmp / "config.json").read_text())
        config["tie_word_embeddings"] = False
        if isinstance(config.get("text_config"), dict):
            config["text_config"]["tie_word_embeddings"] = False
        (tmp / "config.json").write_text(json.dumps(config, indent=2))


def _write_direction(spec: EditSpec, direction: Any, tmp: Path) -> None:
    """``direction.safetensors`` + ``direction.json``: the Direction's own format when it has ``save``.

    A ``conditional_rosi`` edit also writes its read direction ``g`` to ``read_direction.safetensors``
    (key ``read``, float64: the exact vector the edit used; ``edit.json`` holds its SHA-256).
    """
    if spec.read is not None:
        save_file({"read": spec.read.to(torch.float64).contiguous()}, str(tmp / "read_direction.safetensors"))
    if direction is not None and hasattr(direction, "save"):
        staging = tmp / ".direction"
        direction.save(staging)
        for item in staging.iterdir():
            os.replace(item, tmp / item.name)
        staging.rmdir()
        if (tmp / "direction.safetensors").is_file():
            return
    save_file(
        {"direction": spec.direction.to(torch.float32).contiguous()}, str(tmp / "direction.safetensors")
    )
    info = {
        "space": "raw_hf",
        "unit": True,
        "layer": spec.direction_layer,
        "d_model": int(spec.direction.shape[0]),
        "sha256": _direction_hash(spec),
    }
    (tmp / "direction.json").write_text(json.dumps(info, indent=2))


def _vanilla_logits(
    path: Path, model: Any, batch: Any, dtype: torch.dtype, edit: EditSpec | None = None
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
                write_stored(hf, live, [(t, new[t.key]) for t in tensors], reversible=False)
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
        del hf


def verify_export(
    model: Any, spec: EditSpec, out: Path, prompts: Sequence[str] = VERIFY_PROMPTS
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


def export_edit(
    model: Any,
    spec: EditSpec,
    out_dir: str | os.PathLike[str],
    *,
    direction: Any = None,
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
    if int(spec.direction.shape[0]) != model.d_model:
        raise LensSafetyError(
            f"direction has width {spec.direction.shape[0]} but the model's residual width is {model.d_model}",
            "use a direction extracted from this architecture",
        )
    writers = checkpoint_writers(model)
    touched = target_parameters(spec, writers, model.n_layers)
    untie = model.arch.tied_embeddings and any(w.kind == "embed" for w, _ in touched.values())
    exact = (
        not any(w.post_norm or w.fixed_with for w, _ in touched.values()) or spec.method != "orthogonalize"
    )
    for name in extra_files or {}:
        taken = name in GENERATED_FILES or (model.hf_path / name).exists() or name.endswith(".safetensors")
        if Path(name).name != name or taken:
            raise LensSafetyError(f"extra file name '{name}' is not allowed", "use a plain, unused file name")
    with staged_directory(out, overwrite=overwrite) as tmp:
        edited, dtype = _write_shards(model, spec, tmp, untie, progress)
        _copy_side_files(model, tmp, untie)
        _write_direction(spec, direction, tmp)
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
            "direction_sha256": _direction_hash(spec),
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
