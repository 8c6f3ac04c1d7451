"""What lies between the embedding and block 0, found by the probe in
:mod:`lens_safety.architecture.embedding`: NanoChat normalises its embedding inside its forward
(with no module the bridge's adapter names), so abliterating the embedding is refused while ROSI
stays exact; a constant scale (RecurrentGemma, Granite) is not a norm; a projection of another width is
refused at load."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from lens_safety.arch_matrix.checks import check_formula, vanilla
from lens_safety.arch_matrix.configs import build_tiny
from lens_safety.architecture.embedding import embedding_path
from lens_safety.architecture.writers import hf_names, original
from lens_safety.edits import orthogonalize, rosi
from lens_safety.errors import LensSafetyError
from lens_safety.export import export_edit
from lens_safety.models import load_model


@pytest.fixture(scope="module")
def nanochat_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    return build_tiny("nanochat", tmp_path_factory.mktemp("nanochat") / "base", smollm2_dir)


def _unit(d_model: int) -> torch.Tensor:
    s = torch.randn(d_model, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return s / s.norm()


def test_nanochat_block_0_reads_its_embedding_through_a_weightless_rms_norm(nanochat_dir: Path) -> None:
    """The premise, from vanilla transformers in float64: block 0's input is ``e / rms(e)``
    (recomputed here by hand), not the embedding's write ``e``."""
    hf = vanilla(nanochat_dir, torch.float64)
    ids = torch.tensor([[5, 900, 4242]])
    seen: list[torch.Tensor] = []
    handle = hf.model.layers[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        hf(ids)
    handle.remove()
    e = hf.model.embed_tokens.weight.detach()[ids[0]]
    normed = e / (e.pow(2).mean(-1, keepdim=True) + hf.config.rms_norm_eps).sqrt()
    torch.testing.assert_close(seen[0][0], normed, rtol=1e-6, atol=1e-6)  # the norm runs in float32
    assert float((seen[0][0] - e).norm()) > 0.1 * float(e.detach().norm())


def test_nanochat_embedding_is_a_post_norm_writer(nanochat_dir: Path) -> None:
    model = load_model(nanochat_dir, device="cpu")
    (embed,) = model.arch.writers_of("embed")
    assert embed.post_norm is not None and embed.post_norm.startswith("model.norm,")
    assert not any(w.post_norm for w in model.arch.writers if w.layer is not None)


def test_nanochat_abliteration_is_refused_in_one_line_and_rosi_exports_exactly(
    nanochat_dir: Path, tmp_path: Path
) -> None:
    model = load_model(nanochat_dir, device="cpu")
    s = _unit(model.d_model)
    with pytest.raises(LensSafetyError) as refused:
        export_edit(model, orthogonalize(s), tmp_path / "ablated")
    message = str(refused.value)
    assert "\n" not in message and re.match(r"embed writes through a post-norm, so", message)
    assert "use inference-time ablate_direction" in message
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a staging directory
    result = export_edit(model, rosi(s, 5.0), tmp_path / "rosi")
    assert result.max_abs_logit_diff <= result.bound
    assert check_formula(model, tmp_path / "rosi", "rosi", s) < 1e-3  # float64 recomputation
    # the block writers alone are exact residual writers: abliterating them is allowed
    blocks = export_edit(model, orthogonalize(s, targets=["attn_out", "mlp_out"]), tmp_path / "blocks")
    assert blocks.max_abs_logit_diff <= blocks.bound


@pytest.mark.parametrize(
    ("model_type", "extra", "dtype", "expected"),
    [
        ("llama", {}, torch.float32, None),
        ("llama", {}, torch.bfloat16, None),
        ("gpt2", {}, torch.float32, None),  # token + position embedding, summed
        ("recurrent_gemma", {}, torch.float32, None),  # its forward scales the embedding by sqrt(d)
        ("granite", {"embedding_multiplier": 12.0}, torch.float32, None),  # and by a multiplier
        ("nanochat", {}, torch.bfloat16, "model.norm, between the embedding and block 0"),
    ],
)
def test_only_a_norm_between_embedding_and_block_0_makes_the_embedding_a_post_norm_writer(
    model_type: str,
    extra: dict[str, float],
    dtype: torch.dtype,
    expected: str | None,
    tmp_path: Path,
    smollm2_dir: Path,
) -> None:
    path = build_tiny(model_type, tmp_path / model_type, smollm2_dir, dtype=dtype, **extra)
    model = load_model(path, device="cpu", dtype="auto")
    assert model.dtype == dtype
    assert {w.post_norm for w in model.arch.writers if w.layer is None} == {expected}


def test_the_probe_finds_bloom_s_embedding_norm_without_the_adapter(
    tmp_path: Path, smollm2_dir: Path
) -> None:
    """Bloom's adapter names ``embed_ln``; the probe, given only the embedding and the blocks,
    finds the same norm."""
    model = load_model(build_tiny("bloom", tmp_path / "bloom", smollm2_dir), device="cpu")
    (embed,) = model.arch.writers_of("embed")
    assert embed.post_norm == "transformer.word_embeddings_layernorm"  # from the adapter
    bridge = model.bridge
    found = embedding_path(
        model.hf_model, hf_names(model.hf_model), [original(bridge.embed)], list(bridge.blocks)
    )
    assert found == "transformer.word_embeddings_layernorm, between the embedding and block 0"


def test_a_projection_between_embedding_and_block_0_is_refused_at_load(
    tmp_path: Path, smollm2_dir: Path
) -> None:
    """OPT with ``word_embed_proj_dim`` < ``hidden_size`` projects the embedding up before block 0
    (``project_in``): the embedding is not a residual writer, and the load says so in one line."""
    path = build_tiny("opt", tmp_path / "opt", smollm2_dir, word_embed_proj_dim=32)
    with pytest.raises(LensSafetyError, match=r"writes width 32 but block 0 reads shape \(64,\)") as refused:
        load_model(path, device="cpu")
    assert "\n" not in str(refused.value)
