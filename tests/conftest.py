"""Shared fixtures: the embedded default model and tiny random models of seven architectures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from lens_safety.testing import TINY_ARCHITECTURES, make_tiny_model


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """Local HF directory of the embedded default (converted once from the shipped GGUF)."""
    from lens_safety.sources import resolve_spec

    return resolve_spec("smollm2")[0]


@pytest.fixture(scope="session")
def smollm2(smollm2_dir: Path):
    """The embedded default loaded once per session. Tests must not edit its weights in place."""
    from lens_safety.models import load_model

    return load_model("smollm2", device="cpu")


@pytest.fixture(scope="session")
def organism():
    """The shipped refusal organism (merged once, cached), loaded once per session. Do not edit it."""
    from lens_safety.models import load_model

    return load_model("smollm2-refusal", device="cpu")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> dict[str, Path]:
    """Tiny random models (3 layers, width 64) of every test architecture, built offline."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_model(arch, root / arch, smollm2_dir) for arch in TINY_ARCHITECTURES}


@pytest.fixture(params=TINY_ARCHITECTURES)
def tiny_arch(request: pytest.FixtureRequest) -> str:
    return str(request.param)
