"""Which files of a Hugging Face directory are the model's weights, and are they whole?

One rule for every caller (hashing, reading original tensors, export, the organism merge):

* with ``model.safetensors.index.json``: the shards its ``weight_map`` names, in index order;
* else ``model.safetensors``;
* else every ``*.safetensors`` file except the ones lens-safety or peft write next to a model
  (:data:`SIDECAR_FILES`: a saved direction, a read direction, a LoRA adapter).

:func:`check_checkpoint` validates a directory before anything loads it, reading headers only
(bytes read: 8 + header length per file): ``config.json`` parses and names a ``model_type`` that
transformers knows (or, with ``trust_remote_code``, one the directory's own code defines); the
weights exist, every shard the index names is present; every safetensors header is valid JSON that
fits in the file and the tensor data it describes ends exactly at the end of the file (a truncated
download fails here); pickle-only checkpoints (``pytorch_model.bin``, ``*.pt``) are refused unless
``allow_pickle`` (lens-safety never unpickles them itself: it only says how to convert them).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from lens_safety.errors import LensSafetyError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
#: safetensors files that live next to a model but are not its weights
SIDECAR_FILES = frozenset(
    {"direction.safetensors", "read_direction.safetensors", "adapter_model.safetensors"}
)
PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt")
#: any one of these makes a directory's tokenizer loadable by AutoTokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer.tiktoken", "spiece.model")
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit on a header


def weight_files(model_dir: str | Path) -> list[Path]:
    """The model's safetensors weight files (see the module docstring); ``[]`` when there are none."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise LensSafetyError(
                f"{index} is not a valid safetensors index (no weight_map)",
                "re-download the checkpoint or re-save it with save_pretrained",
            ) from None
        return [model_dir / name for name in dict.fromkeys(weight_map.values())]
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE]
    return sorted(p for p in model_dir.glob("*.safetensors") if p.name not in SIDECAR_FILES)


def read_header(shard: Path) -> tuple[int, dict[str, Any]]:
    """``(byte offset where tensor data starts, JSON header)`` of a safetensors file, validated.

    A header that is cut off, is not JSON, or describes more (or less) data than the file holds
    raises :class:`LensSafetyError` naming the file: the usual sign of an interrupted download.
    """
    size = shard.stat().st_size
    with open(shard, "rb") as handle:
        head = handle.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < length <= min(_MAX_HEADER, size - 8):
            raise _damaged(shard, f"its header length field says {length} bytes of {size}")
        try:
            header: dict[str, Any] = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _damaged(shard, "its header is not valid JSON") from None
    ends = [
        int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
    ]
    if 8 + length + max(ends, default=0) != size:
        raise _damaged(
            shard, f"its tensors need {8 + length + max(ends, default=0)} bytes, the file has {size}"
        )
    return 8 + length, header


def _damaged(shard: Path, detail: str) -> LensSafetyError:
    return LensSafetyError(
        f"weight file {shard} is truncated or corrupted ({detail})",
        "re-download or re-copy the checkpoint (an interrupted download leaves such files)",
    )


def _check_config(model_dir: Path, trust_remote_code: bool) -> None:
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise LensSafetyError(
            f"{model_dir / 'config.json'} is not valid JSON", "re-download or re-save the checkpoint"
        ) from None
    if not isinstance(config, dict) or not config.get("model_type"):
        raise LensSafetyError(
            f"{model_dir / 'config.json'} names no model_type", "use a config saved by transformers"
        )
    from transformers import CONFIG_MAPPING, __version__

    model_type = str(config["model_type"])
    if model_type in CONFIG_MAPPING or (config.get("auto_map") and trust_remote_code):
        return
    if config.get("auto_map"):
        raise LensSafetyError(
            f"{model_dir} needs its own model code (model_type '{model_type}' with an auto_map), "
            "and trust_remote_code is off",
            "pass trust_remote_code=True to load_model only if you trust the code in that directory",
        )
    raise LensSafetyError(
        f"model_type '{model_type}' in {model_dir / 'config.json'} is unknown to transformers {__version__}",
        "check config.json, or use a transformers version that knows the architecture",
    )


def check_checkpoint(
    model_dir: str | Path, *, allow_pickle: bool = False, trust_remote_code: bool = False
) -> list[Path]:
    """Validate a model directory (see the module docstring); return its weight files."""
    model_dir = Path(model_dir)
    _check_config(model_dir, trust_remote_code)
    files = weight_files(model_dir)
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise LensSafetyError(
            f"{model_dir / INDEX_FILE} names {len(missing)} shard(s) that are missing, e.g. {missing[0]}",
            "finish the download or copy every shard the index lists",
        )
    if not files:
        pickles = sorted({p.name for pattern in PICKLE_PATTERNS for p in model_dir.glob(pattern)})
        if pickles and not allow_pickle:
            raise LensSafetyError(
                f"{model_dir} holds only pickle weights ({', '.join(pickles)}), which can run code when loaded",
                "convert them to safetensors once, in a trusted environment (load with transformers, then "
                "save_pretrained), or pass load_model(..., allow_pickle=True) if you trust the file",
            )
        if not pickles:
            raise LensSafetyError(
                f"{model_dir} has a config.json but no weight files (*.safetensors)",
                "copy the model's weights into the directory or point to a complete checkpoint",
            )
    for file in files:
        read_header(file)
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise LensSafetyError(
            f"{model_dir} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, …)",
            "copy the tokenizer files of the model it was fine-tuned from into the directory",
        )
    return files
