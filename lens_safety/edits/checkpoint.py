"""Read the ORIGINAL Hugging Face weights of a model directory, shard by shard (safetensors only)."""

from __future__ import annotations

import math
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from lens_safety.architecture import ResidualWriter
from lens_safety.checkpoint_files import read_header, weight_files
from lens_safety.edits.spec import require_finite
from lens_safety.edits.stored import locate_writer_tensors
from lens_safety.errors import LensSafetyError, first_of
from lens_safety.models import ChatModel


def weight_shards(hf_path: Path) -> list[Path]:
    """The model's safetensors weight files (:func:`~lens_safety.checkpoint_files.weight_files`);
    raises when there are none."""
    found = weight_files(hf_path)
    if not found:
        raise LensSafetyError(
            f"{hf_path} holds no *.safetensors weights", "convert the checkpoint to safetensors first"
        )
    return found


def shard_keys(shard: Path) -> list[str]:
    with safe_open(str(shard), framework="pt") as handle:
        return list(handle.keys())


def read_tensors(hf_path: Path, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Only the named original tensors (CPU, stored dtype); raises if one is absent."""
    wanted = set(names)
    out: dict[str, torch.Tensor] = {}
    for shard in weight_shards(hf_path):
        with safe_open(str(shard), framework="pt") as handle:
            for key in wanted.intersection(handle.keys()):
                out[key] = handle.get_tensor(key)
    missing = sorted(wanted - out.keys())
    if missing:
        raise LensSafetyError(
            f"parameter {first_of(missing)} is not in the checkpoint at {hf_path}",
            "the checkpoint's names differ from the model's modules; re-save it with save_pretrained",
        )
    return out


def checkpoint_shapes(hf_path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor name stored in the checkpoint at ``hf_path`` with its shape (reads headers only)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for shard in weight_shards(hf_path):
        _, header = read_header(shard)
        shapes.update({k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"})
    return shapes


def checkpoint_writers(model: ChatModel) -> tuple[ResidualWriter, ...]:
    """The model's residual writers with their tensors located in the checkpoint at ``model.hf_path``.

    ``ResidualWriter.hf_name`` is the state-dict module name on every dense architecture
    (``model.layers.3.self_attn.o_proj``, GPT-2's ``transformer.h.3.attn.c_proj``), so it names the
    saved tensors directly; fused expert tensors may be stored per expert or renamed
    (:mod:`lens_safety.edits.stored`). A writer tensor absent from the checkpoint is an error
    rather than a silent no-op edit.
    """
    return locate_writer_tensors(
        model.hf_model, model.arch.writers, checkpoint_shapes(model.hf_path), model.hf_path
    )


#: safetensors dtype codes of the floating dtypes a checkpoint may store
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
}


_TORCH_DTYPES = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}


def _copy_range(source: Any, sink: Any, offset: int, count: int) -> None:
    """Copy ``count`` bytes of ``source`` from ``offset`` to the current end of ``sink``, in-kernel
    (``os.copy_file_range``; a plain read/write loop where the platform lacks it)."""
    sink.flush()
    done = 0
    copy_range = getattr(os, "copy_file_range", None)
    while done < count:
        if copy_range is not None:
            sink_position = sink.tell()
            moved = copy_range(source.fileno(), sink.fileno(), count - done, offset + done, sink_position)
            sink.seek(sink_position + moved)
        else:  # pragma: no cover - non-Linux platforms
            source.seek(offset + done)
            chunk = source.read(min(count - done, 1 << 24))
            moved = sink.write(chunk)
        if moved <= 0:
            raise LensSafetyError("the checkpoint ended early while copying it", "re-download the checkpoint")
        done += moved


def stream_edit_shard(
    shard: Path,
    target: Path,
    edits: Mapping[str, Callable[[torch.Tensor], torch.Tensor]],
) -> list[str]:
    """Write ``shard`` to ``target`` with the named tensors rewritten through ``edits``, each byte once.

    The file is written front to back: every untouched byte range (header, unedited tensors) is
    copied in-kernel from the original, every edited tensor is written from memory. Each edit
    receives the ORIGINAL tensor as a float64 view of one reusable work buffer and returns the
    edited float64 tensor (it may work in place); the result is cast once to the stored dtype.
    Untouched tensors are never decoded, and no per-tensor memory is allocated (two buffers sized
    for the largest edited tensor).
    """
    if sys.byteorder != "little":  # pragma: no cover - safetensors data is little-endian
        raise LensSafetyError("exporting needs a little-endian machine", "export on x86-64 or arm64")
    start, header = read_header(shard)
    names = sorted(
        (name for name in edits if name in header), key=lambda name: header[name]["data_offsets"][0]
    )
    if not names:
        shutil.copyfile(shard, target)
        return []
    for name in names:
        if header[name]["dtype"] not in _TORCH_DTYPES:
            raise LensSafetyError(
                f"{name} is stored as {header[name]['dtype']}", "edit floating-point checkpoints only"
            )
    sizes = [math.prod(header[name]["shape"]) for name in names]
    work = torch.empty(max(sizes), dtype=torch.float64)
    raw = torch.empty(max(sizes) * 8, dtype=torch.uint8)
    total = shard.stat().st_size
    with open(shard, "rb") as source, open(target, "wb") as sink:
        position = 0  # bytes of the file written so far
        for name, size in zip(names, sizes, strict=True):
            entry = header[name]
            dtype = _TORCH_DTYPES[entry["dtype"]]
            first, last = (start + offset for offset in entry["data_offsets"])
            _copy_range(source, sink, position, first - position)
            stored = raw[: last - first]
            source.seek(first)
            if source.readinto(stored.numpy().data) != last - first:
                raise LensSafetyError(f"{shard.name} is truncated at {name}", "re-download the checkpoint")
            buffer = work[:size].view(entry["shape"])
            buffer.copy_(stored.view(dtype).view(entry["shape"]))
            original = stored.view(dtype).view(entry["shape"])
            edited = edits[name](buffer)
            require_finite(name, original, edited, dtype)
            original.copy_(edited)
            sink.write(stored.numpy().data)
            position = last
        _copy_range(source, sink, position, total - position)
    return names
