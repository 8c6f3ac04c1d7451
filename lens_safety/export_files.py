"""The files of an export: the edited weight shards, the copied side files and the direction.

:func:`write_shards` copies every safetensors shard of ``model.hf_path`` byte for byte and then
overwrites only the edited tensors' bytes in the copy: each edited tensor is computed in float64
from the ORIGINAL stored tensor and cast once to its stored dtype. When the edit changes a tied
token embedding, the output embedding (``lm_head``) is written as the ORIGINAL embedding to an
extra shard and ``config.json`` says ``tie_word_embeddings: false``. The direction is written in
the raw Hugging Face residual basis. :mod:`lens_safety.export` stages, verifies and publishes
these files.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lens_safety.architecture import clean_hf_name
from lens_safety.checkpoint_files import INDEX_FILE, SINGLE_FILE, read_header
from lens_safety.edits.checkpoint import checkpoint_writers, stream_edit_shard, weight_shards
from lens_safety.edits.spec import EditSpec, edit_writes_inplace
from lens_safety.edits.targets import target_parameters
from lens_safety.errors import LensSafetyError
from lens_safety.hashing import sha256_vector
from lens_safety.models import ChatModel
from lens_safety.progress import track

if TYPE_CHECKING:
    from lens_safety.directions import Direction

GENERATED_FILES = {
    "edit.json",
    "README.md",
    "direction.safetensors",
    "direction.json",
    "read_direction.safetensors",
    INDEX_FILE,
}


def direction_hash(spec: EditSpec) -> str:
    """SHA-256 of the edit's direction (raw HF residual basis, as :func:`~lens_safety.hashing.sha256_vector` hashes it)."""
    return sha256_vector(spec.direction.tolist())


def output_embedding_name(model: ChatModel) -> str | None:
    """The checkpoint name of ``model``'s output embedding weight (``None``: not a named module)."""
    out = model.hf_model.get_output_embeddings()
    for name, module in model.hf_model.named_modules():
        if module is out:
            return clean_hf_name(name) + ".weight"
    return None


_DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
UNTIED_HEAD_SHARD = "lm_head.safetensors"


def write_shards(
    model: ChatModel, spec: EditSpec, tmp: Path, untie: bool, progress: bool
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
    head_key = output_embedding_name(model) if untie else None
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


def copy_side_files(model: ChatModel, tmp: Path, untie: bool) -> None:
    """Copy every non-weight file of the base (config, tokenizer, chat template, generation config)
    except the ones an export writes itself; an untied export says so in ``config.json``."""
    for item in model.hf_path.iterdir():
        if item.is_file() and item.suffix != ".safetensors" and item.name not in GENERATED_FILES:
            shutil.copy2(item, tmp / item.name)
    if untie:
        config = json.loads((tmp / "config.json").read_text())
        config["tie_word_embeddings"] = False
        if isinstance(config.get("text_config"), dict):
            config["text_config"]["tie_word_embeddings"] = False
        (tmp / "config.json").write_text(json.dumps(config, indent=2))


def write_direction(spec: EditSpec, direction: Direction | None, tmp: Path) -> None:
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
        "sha256": direction_hash(spec),
    }
    (tmp / "direction.json").write_text(json.dumps(info, indent=2))
