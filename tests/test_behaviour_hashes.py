"""Behaviour pinned across refactors: for fixed inputs, the saved direction tensors and the exported
safetensors are bitwise identical to what main produced before the jobs moved into the library.

The SHA-256 digests below were recorded on the pinned environment of ``constraints.txt`` (torch
2.13.0 CPU) by running these exact jobs; float kernels differ between torch builds and devices,
so the comparison runs only there and says so otherwise. A digest changes only when a tensor
changes: an intended change of behaviour must say why in its commit and record the new digest.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli

RECORDED_TORCH = "2.13.0+cpu"
FAST = ["--n-train", "16", "--n-val", "4", "--n-test", "4", "--max-new-tokens", "4"]

EXPECTED: dict[str, dict[str, str]] = {
    "directions": {
        "direction.safetensors": "f909833fc8aa55975d6ed53a54f012920a675a8975e463625289e76f68b6cff9",
    },
    "rosi-sweep": {
        "direction.safetensors": "34d4cdb323cfc69cae05e8bc61789c30827debcbbf46b34b21889dc09094ff61",
        "model.safetensors": "0cafa6b5779a4af204fa6776e3e6b550f4ecd0bd4bde7bd3ef0b0d96a4933b3e",
    },
    "rosi-fixed-layer": {
        "direction.safetensors": "34d4cdb323cfc69cae05e8bc61789c30827debcbbf46b34b21889dc09094ff61",
        "model.safetensors": "0910be4f84dd4aae0b8b913d97e96bd7f2f943dc482fc13f9a1d2ce9343510b5",
    },
    "ablate": {
        "direction.safetensors": "34d4cdb323cfc69cae05e8bc61789c30827debcbbf46b34b21889dc09094ff61",
        "model.safetensors": "7a41b4f3ab517e0a3b511e2814d2e6d53b97160ecf0fab44f093a5824c220f95",
    },
    "conditional-rosi": {
        "direction.safetensors": "34d4cdb323cfc69cae05e8bc61789c30827debcbbf46b34b21889dc09094ff61",
        "model.safetensors": "681556cd905a554c94dc97e97e0c2b464d006bcd226246805de3db9ff54faf34",
        "read_direction.safetensors": "d7fc770a25540ccfc728a376ebcc9cce2279be8e3ffdd1fdc248dce5208debff",
    },
}


def digests(out: Path) -> dict[str, str]:
    """SHA-256 of every ``*.safetensors`` file directly in ``out``."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.safetensors"))}


def jobs(model: Path, prompts: tuple[Path, Path], tmp: Path) -> dict[str, list[str]]:
    harmful, harmless = (str(p) for p in prompts)
    sets = ["--harmful", harmful, "--harmless", harmless]
    return {
        "directions": ["directions", str(model), *sets, "--n-val", "4", "--no-figures"],
        "rosi-sweep": ["rosi", str(model), *sets, "--alphas", "10,100", *FAST],
        "rosi-fixed-layer": ["rosi", str(model), *sets, "--layer", "1", "--alpha", "7.5", *FAST],
        "ablate": ["ablate", str(model), *sets, "--layer", "1", *FAST],
        "conditional-rosi": [
            "conditional-rosi",
            str(model),
            *sets,
            "--layer",
            "1",
            "--injections",
            "0.5,1",
            *FAST,
        ],
    }


@pytest.fixture
def prompt_files(tmp_path: Path) -> tuple[Path, Path]:
    from lens_safety.prompts import PromptSet

    harmful, harmless = tmp_path / "harmful.txt", tmp_path / "harmless.txt"
    harmful.write_text("\n".join(list(PromptSet.load("builtin:harmful"))[:28]) + "\n")
    harmless.write_text("\n".join(list(PromptSet.load("builtin:harmless"))[:28]) + "\n")
    return harmful, harmless


@pytest.mark.parametrize(
    "job", ["directions", "rosi-sweep", "rosi-fixed-layer", "ablate", "conditional-rosi"]
)
def test_job_outputs_are_bitwise_those_recorded_before_the_redesign(
    job: str,
    tiny_dirs: dict[str, Path],
    prompt_files: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if torch.__version__ != RECORDED_TORCH:
        pytest.skip(f"digests were recorded with torch {RECORDED_TORCH}; this is torch {torch.__version__}")
    out = tmp_path / "out"
    argv = jobs(tiny_dirs["llama"], prompt_files, tmp_path)[job]
    code, _, err = run_cli([*argv, "--out", str(out)], capsys)
    assert code == 0, err
    assert digests(out) == EXPECTED[job]
