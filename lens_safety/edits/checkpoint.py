"""Read the ORIGINAL Hugging Face weights of a model directory, shard by shard (safetensors only)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from lens_safety.architecture import ResidualWriter
from lens_safety.errors import LensSafetyError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def weight_shards(hf_path: Path) -> list[Path]:
    """The safetensors files of a HF directory, in index order (one file when unsharded)."""
    index = hf_path / INDEX_FILE
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        return [hf_path / name for name in dict.fromkeys(weight_map.values())]
    single = hf_path / SINGLE_FILE
    if single.is_file():
        return [single]
    found = sorted(hf_path.glob("*.safetensors"))
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
            f"parameter {missing[0]} (and {len(missing) - 1} more) is not in the checkpoint at {hf_path}",
            "the checkpoint's names differ from the model's modules; re-save it with save_pretrained",
        )
    return out


def _adapter_path(bridge: Any, writer_name: str) -> str | None:
    """HF module path of a TransformerLens component, joined from the adapter's ``.name`` of each part."""
    node: Any = bridge
    parts: list[str] = []
    for piece in writer_name.split("."):
        node = node[int(piece)] if piece.isdigit() else getattr(node, piece, None)
        if node is None:
            return None
        name = getattr(node, "name", None)  # containers (the block list) carry no name
        if isinstance(name, str) and name:
            parts.append(name)
    return ".".join(parts)


def checkpoint_writers(model: Any) -> tuple[tuple[ResidualWriter, ...], dict[str, str]]:
    """Writers renamed to their checkpoint (state-dict) module names, and ``{checkpoint: live}`` names.

    The bridge can move HF modules (GPT-2's ``attn.c_proj`` lives at ``attn.o`` inside the booted
    model), so a writer's live module path is not always its name in the saved checkpoint. The
    adapter records each component's original HF name; the result is checked against the keys of
    the checkpoint at ``model.hf_path``.
    """
    keys = {key for shard in weight_shards(model.hf_path) for key in shard_keys(shard)}
    writers: list[ResidualWriter] = []
    live: dict[str, str] = {}
    for writer in model.arch.writers:
        candidates = [writer.hf_name, _adapter_path(model.bridge, writer.name)]
        found = next((c for c in candidates if c and f"{c}.weight" in keys), None)
        if found is None:
            raise LensSafetyError(
                f"writer {writer.name} ({writer.hf_name}) has no weight in the checkpoint at {model.hf_path}",
                "re-save the checkpoint with save_pretrained, or report this architecture to lens-safety",
            )
        writers.append(replace(writer, hf_name=found))
        live[found] = writer.hf_name
    return tuple(writers), live
