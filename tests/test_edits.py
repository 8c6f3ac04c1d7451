"""Edit formulas against dense float64 references, input checks, and orthogonalisation == ablation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lens_safety.edits import (
    amplify,
    applied_edit,
    edit_deltas,
    edit_writes,
    live_parameters,
    orthogonalize,
    rosi,
)
from lens_safety.edits.checkpoint import checkpoint_writers
from lens_safety.errors import LensSafetyError
from lens_safety.forward_pass import forward
from lens_safety.interventions import ablate_direction
from lens_safety.models import load_model

D, D_IN, VOCAB = 16, 24, 40
PROMPTS = ["How do I bake bread?", "Tell me a short story about a cat, please."]


@pytest.fixture(scope="module")
def tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {
        "s": torch.randn(D, dtype=torch.float64, generator=gen),
        "linear": torch.randn(D, D_IN, dtype=torch.float64, generator=gen),
        "bias": torch.randn(D, dtype=torch.float64, generator=gen),
        "embed": torch.randn(VOCAB, D, dtype=torch.float64, generator=gen),
    }


def test_rosi_is_the_papers_formula(tensors: dict[str, torch.Tensor]) -> None:
    s_hat = tensors["s"] / tensors["s"].norm()
    w, alpha = tensors["linear"], 7.5
    w_bar = w.mean(dim=0)  # mean over the d_model rows
    expected = w + alpha * s_hat[:, None] * w_bar[None, :]
    spec = rosi(tensors["s"], alpha)
    assert torch.allclose(edit_writes(spec, w, "linear"), expected, rtol=0, atol=1e-12)
    # GPT-2 Conv1D stores W^T: the edit is the transpose of the Linear one
    assert torch.allclose(edit_writes(spec, w.T.contiguous(), "conv1d"), expected.T, rtol=0, atol=1e-12)
    b = tensors["bias"]
    assert torch.allclose(
        edit_writes(spec, b, "linear", is_bias=True), b + alpha * s_hat * b.mean(), atol=1e-12
    )
    e = tensors["embed"]  # rows are writes: each row gains alpha * s_hat * mean(row)
    assert torch.allclose(
        edit_writes(spec, e, "embedding"), e + alpha * e.mean(1, keepdim=True) * s_hat, atol=1e-12
    )
    # ROSI is not the projection amplification
    assert not torch.allclose(edit_writes(amplify(tensors["s"], alpha), w, "linear"), expected)


def test_amplify_and_orthogonalize_match_dense_projectors(tensors: dict[str, torch.Tensor]) -> None:
    s_hat = tensors["s"] / tensors["s"].norm()
    eye, outer = torch.eye(D, dtype=torch.float64), torch.outer(s_hat, s_hat)
    w, e = tensors["linear"], tensors["embed"]
    assert torch.allclose(
        edit_writes(amplify(tensors["s"], 0.3), w, "linear"), (eye + 0.3 * outer) @ w, atol=1e-12
    )
    ortho = orthogonalize(tensors["s"])
    assert torch.allclose(edit_writes(ortho, w, "linear"), (eye - outer) @ w, atol=1e-12)
    assert torch.allclose(edit_writes(ortho, e, "embedding"), e @ (eye - outer), atol=1e-12)
    assert (s_hat @ edit_writes(ortho, w, "linear")).abs().max() < 1e-12


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda s: rosi(s, float("nan")), "finite"),
        (lambda s: rosi(s, -1.0), ">= 0"),
        (lambda s: amplify(s, -2.0), ">= -1"),
        (lambda s: orthogonalize(s, alpha=3.0), "no strength"),
        (lambda s: rosi(torch.zeros_like(s), 1.0), "zero"),
        (lambda s: rosi(torch.full_like(s, float("inf")), 1.0), "NaN or inf"),
        (lambda s: rosi(s, 1.0, d_model=s.shape[0] + 1), "width"),
    ],
)
def test_bad_edit_input(tensors: dict[str, torch.Tensor], make, message: str) -> None:
    with pytest.raises(LensSafetyError, match=message):
        make(tensors["s"])


@pytest.fixture(scope="module")
def tiny_models(tiny_dirs: dict[str, Path]) -> dict[str, object]:
    return {arch: load_model(path, device="cpu") for arch, path in tiny_dirs.items()}


def test_unknown_target_and_wrong_width(tiny_models: dict[str, object]) -> None:
    model = tiny_models["llama"]
    s = torch.randn(model.d_model)
    with pytest.raises(LensSafetyError, match="unknown edit target"):
        edit_deltas(model, rosi(s, 1.0, targets=["blocks.0.attn.q"]))
    with pytest.raises(LensSafetyError, match="width"):
        edit_deltas(model, rosi(torch.randn(model.d_model + 3), 1.0))
    with pytest.raises(LensSafetyError, match="out of range"):
        edit_deltas(model, rosi(s, 1.0, layers=[7]))


def _logits(model, edit=None, ablate=None) -> torch.Tensor:
    """Logits at the real (non-padding) positions of a left-padded batch, ``[n_tokens, vocab]``."""
    batch = model.chat.encode(PROMPTS)
    mask = batch.attention_mask.bool()
    with torch.inference_mode():
        if edit is not None:
            with applied_edit(model, edit):
                return forward(model, batch).logits[mask]
        if ablate is not None:
            with ablate_direction(model, ablate):
                return forward(model, batch).logits[mask]
        return forward(model, batch).logits[mask]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "mistral", "phi3"])
def test_orthogonalisation_equals_ablation_on_tiny(tiny_models: dict[str, object], arch: str) -> None:
    model = tiny_models[arch]
    s = torch.randn(model.d_model, generator=torch.Generator().manual_seed(3))
    base = _logits(model)
    ablated = _logits(model, ablate=s)
    edited = _logits(model, edit=orthogonalize(s))
    assert (ablated - base).abs().max() > 1e-2  # the intervention does something
    assert (edited - ablated).abs().max() < 1e-4
    assert torch.equal(_logits(model), base)  # the edit was reverted exactly


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_post_norm_writers_are_refused_or_labelled(tiny_models: dict[str, object], arch: str) -> None:
    model = tiny_models[arch]
    s = torch.randn(model.d_model, generator=torch.Generator().manual_seed(3))
    with pytest.raises(LensSafetyError, match="post-norm"):
        edit_deltas(model, orthogonalize(s))
    ablated = _logits(model, ablate=s)
    approx = _logits(model, edit=orthogonalize(s, approximate=True))
    assert (approx - ablated).abs().max() > 1e-4  # inexact by construction, hence the refusal


def test_applied_edit_restores_and_keeps_tying(tiny_models: dict[str, object]) -> None:
    model = tiny_models["gpt2"]  # tied embeddings, Conv1D, biases
    hf = model.hf_model
    before = {k: v.detach().clone() for k, v in live_parameters(hf).items()}
    s = torch.randn(model.d_model)
    with applied_edit(model, orthogonalize(s)):
        assert hf.get_output_embeddings().weight is not hf.get_input_embeddings().weight
        assert torch.equal(hf.get_output_embeddings().weight, before["transformer.wte.weight"])
    assert hf.get_output_embeddings().weight is hf.get_input_embeddings().weight
    after = live_parameters(hf)
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_w_bar_is_zero_after_centring_so_rosi_reads_disk(tiny_dirs: dict[str, Path]) -> None:
    """TransformerLens centres GPT-2's writers in compatibility mode: w_bar of the live weights is 0."""
    model = load_model(tiny_dirs["gpt2"], device="cpu", compatibility_mode=True)
    writers = checkpoint_writers(model)
    params = live_parameters(model.hf_model)
    conv = next(w for w in writers if w.kind == "mlp_out")
    live_weight = params[f"{conv.hf_name}.weight"].detach().double()  # (d_in, d_model)
    assert live_weight.mean(dim=1).abs().max() < 1e-6  # centred: ROSI on it would do nothing
    deltas = edit_deltas(model, rosi(torch.randn(model.d_model), 10.0))
    assert deltas[f"{conv.hf_name}.weight"].abs().max() > 1e-3  # computed from the disk weights


def test_orthogonalisation_equals_ablation_on_smollm2() -> None:
    model = load_model("smollm2", device="cpu")  # own copy: the edit is applied in place
    s = torch.randn(model.d_model, generator=torch.Generator().manual_seed(5))
    ablated = _logits(model, ablate=s)
    edited = _logits(model, edit=orthogonalize(s))
    assert (ablated - _logits(model)).abs().max() > 1e-2
    assert (edited - ablated).abs().max() < 1e-4


def test_add_bias_equals_activation_addition_on_gpt2(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    """Exported bias edit == add_direction at resid_pre of the layer (logits within 1e-4), vanilla reload."""
    from transformers import AutoModelForCausalLM

    from lens_safety.edits import add_bias
    from lens_safety.export import export_edit
    from lens_safety.interventions import add_direction

    model = load_model(tiny_dirs["gpt2"], device="cpu")
    r = torch.randn(model.d_model, generator=torch.Generator().manual_seed(9)) * 3.0
    spec = add_bias(r, 2.5, layer=2)
    assert spec.layers == (1,) and spec.alpha == pytest.approx(2.5 * float(r.norm()))
    batch = model.chat.encode(["How do I bake bread?", "Name a colour."])
    with torch.inference_mode():
        plain = forward(model, batch).logits
        with add_direction(model, r, layer=2, coeff=2.5):
            added = forward(model, batch).logits
        with applied_edit(model, spec):
            in_memory = forward(model, batch).logits
    assert (added - plain).abs().max() > 1e-2
    assert (in_memory - added).abs().max() < 1e-4
    result = export_edit(model, spec, tmp_path / "out")
    assert result.edit["edited_parameters"] == ["transformer.h.1.mlp.c_proj.bias"]
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32)
    with torch.inference_mode():
        exported = reloaded(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
        ).logits
    mask = batch.attention_mask.bool()
    assert (exported - added)[mask].abs().max() < 1e-4


def test_add_bias_is_refused_where_there_is_no_bias(tiny_dirs: dict[str, Path]) -> None:
    from lens_safety.edits import add_bias, edit_deltas

    llama = load_model(tiny_dirs["llama"], device="cpu")
    with pytest.raises(LensSafetyError, match="has no bias"):
        edit_deltas(llama, add_bias(torch.randn(64), 1.0, layer=2))
    with pytest.raises(LensSafetyError, match="layer >= 1"):
        add_bias(torch.randn(64), 1.0, layer=0)
    with pytest.raises(LensSafetyError, match="finite"):
        add_bias(torch.randn(64), float("nan"), layer=1)
