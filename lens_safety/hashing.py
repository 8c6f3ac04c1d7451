"""Content hashes used for provenance (prompt sets, weights, adapters)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from lens_safety.checkpoint_files import weight_files

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


def sha256_vector(values: Iterable[float]) -> str:
    """Hex SHA-256 of a vector's values written exactly (``%.17g``: float64 round-trips)."""
    return sha256_texts(f"{float(x):.17g}" for x in values)


def weights_fingerprint(model_dir: str | Path) -> str:
    """SHA-256 over the model's weight files (:func:`~lens_safety.checkpoint_files.weight_files`),
    in name order."""
    digest = hashlib.sha256()
    for file in sorted(weight_files(model_dir), key=lambda path: path.name):
        digest.update(file.name.encode())
        digest.update(sha256_file(file).encode())
    return digest.hexdigest()
