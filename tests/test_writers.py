"""Residual writers are found through the bridge's adapter, for every tiny architecture."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors import safe_open

from lens_safety.edits.checkpoint import checkpoint_writers
from lens_safety.edits.memory import live_parameters
from lens_safety.models import load_model

EXPECTED_MODULES = {  # checkpoint module of block 0's writers, per architecture (HF naming)
    "llama": ("model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"),
    "mistral": ("model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"),
    "qwen2": ("model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"),
    "gemma2": ("model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"),
    "gemma3": ("model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"),
    "phi3": ("model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"),
    "gpt2": ("transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj"),
}


def test_writers_match_checkpoint(tiny_dirs: dict[str, Path], tiny_arch: str) -> None:
    model = load_model(tiny_dirs[tiny_arch], device="cpu")
    writers = checkpoint_writers(model)
    kinds = [w.kind for w in writers]
    assert kinds.count("embed") == 1
    assert kinds.count("pos_embed") == (1 if tiny_arch == "gpt2" else 0)
    assert kinds.count("attn_out") == kinds.count("mlp_out") == model.n_layers == 3
    block0 = [w.hf_name for w in writers if w.layer == 0]
    assert tuple(block0) == EXPECTED_MODULES[tiny_arch]
    with safe_open(str(tiny_dirs[tiny_arch] / "model.safetensors"), framework="pt") as handle:
        for writer in writers:
            weight = handle.get_tensor(f"{writer.hf_name}.weight")
            if writer.layout == "linear":
                assert weight.shape[0] == model.d_model
            else:  # conv1d (d_in, d_model) and embedding (vocab, d_model): rows are writes
                assert weight.shape[-1] == model.d_model
            assert (f"{writer.hf_name}.bias" in handle.keys()) == writer.has_bias  # noqa: SIM118
    live = live_parameters(model.hf_model)  # the loaded model uses the same names
    for writer in writers:
        assert f"{writer.hf_name}.weight" in live
    layouts = {w.layout for w in writers if w.kind in ("attn_out", "mlp_out")}
    assert layouts == ({"conv1d"} if tiny_arch == "gpt2" else {"linear"})
    has_post_norm = all(w.post_norm for w in writers if w.layer is not None)
    assert has_post_norm == (tiny_arch in {"gemma2", "gemma3"})
    if tiny_arch == "gpt2":
        assert all(w.has_bias for w in writers if w.layer is not None)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_writer_names_are_checkpoint_names_even_where_the_bridge_aliases_modules(
    tiny_dirs: dict[str, Path], arch: str
) -> None:
    """GPT-2's c_proj is also reachable as the bridge alias attn.o; the writer keeps the HF name."""
    model = load_model(tiny_dirs[arch], device="cpu")
    writers = checkpoint_writers(model)
    assert [w.hf_name for w in writers] == [w.hf_name for w in model.arch.writers]
    expected = "transformer.h.0.attn.c_proj" if arch == "gpt2" else "model.layers.0.self_attn.o_proj"
    assert model.arch.writers_of("attn_out")[0].hf_name == expected


def test_a_writer_missing_from_the_checkpoint_is_an_error(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    """A checkpoint without a writer's tensor is refused (an edit would otherwise silently skip it)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from lens_safety.errors import LensSafetyError

    copy = tmp_path / "llama"
    shutil.copytree(tiny_dirs["llama"], copy)
    state = load_file(str(copy / "model.safetensors"))
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, str(copy / "model.safetensors"), metadata={"format": "pt"})
    model = load_model(tiny_dirs["llama"], device="cpu")
    model.hf_path = copy
    with pytest.raises(LensSafetyError, match=r"down_proj\.weight"):
        checkpoint_writers(model)
