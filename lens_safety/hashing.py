"""Content hashes used for provenance (prompt sets, weights, adapters)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_texts(texts: Iterable[str]) -> str:
    """Hex SHA-256 of a sequence of strings (order matters, boundaries are unambiguous)."""
    return hashlib.sha256(json.dumps(list(texts), ensure_ascii=False).encode("utf-8")).hexdigest()


def weights_fingerprint(model_dir: str | Path) -> str:
    """SHA-256 over every ``*.safetensors`` file of a Hugging Face directory, in name order.

    The result is cached next to nothing: callers that need it repeatedly keep it.
    """
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        digest.update(sha256_file(file).encode())
    return digest.hexdigest()
