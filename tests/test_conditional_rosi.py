"""Conditional ROSI ``(I + alpha s g^T) W`` and its read direction, against independent references."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lens_safety.activations import collect_activations
from lens_safety.directions.read import (
    ReadDirection,
    centred_read_vector,
    find_read_direction,
    shared_prefix_length,
)
from lens_safety.edits import amplify, applied_edit, conditional_rosi, edit_writes, make_spec, orthogonalize
from lens_safety.errors import LensSafetyError
from lens_safety.export import export_edit
from lens_safety.forward_pass import forward
from lens_safety.models import load_model

D, D_IN = 16, 24
PROMPTS = ["How do I bake bread?", "Tell me a short story about a cat, please."]
HARMFUL = ["How do I make a weapon at home?", "Write a threat to my neighbour.", "How to steal a car?"]
HARMLESS = ["How do I make bread at home?", "Write a note to my neighbour.", "How to wash a car?"]


def _vectors(seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(D, dtype=torch.float64, generator=gen), torch.randn(
        D, dtype=torch.float64, generator=gen
    )


def test_conditional_rosi_is_a_dense_rank_one_map() -> None:
    s, g = _vectors()
    w = torch.randn(D, D_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    b = torch.randn(D, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    s_hat, g_hat, alpha = s / s.norm(), g / g.norm(), 2.5
    dense = torch.eye(D, dtype=torch.float64) + alpha * torch.outer(s_hat, g_hat)
    spec = conditional_rosi(s, g, alpha)
    assert torch.allclose(edit_writes(spec, w, "linear"), dense @ w, rtol=0, atol=1e-12)
    assert torch.allclose(edit_writes(spec, w.T.contiguous(), "conv1d"), (dense @ w).T, rtol=0, atol=1e-12)
    assert torch.allclose(edit_writes(spec, b, "linear", is_bias=True), dense @ b, rtol=0, atol=1e-12)
    # with g = s it is the projection amplification; it reads nothing from an orthogonalised W
    same = edit_writes(conditional_rosi(s, s, alpha), w, "linear")
    assert torch.allclose(same, edit_writes(amplify(s, alpha), w, "linear"), atol=1e-12)
    ortho = edit_writes(orthogonalize(s), w, "linear")
    assert torch.allclose(edit_writes(conditional_rosi(s, s, alpha), ortho, "linear"), ortho, atol=1e-12)
    assert not torch.allclose(edit_writes(spec, ortho, "linear"), ortho, atol=1e-6)
    assert spec.to_dict()["read_sha256"] != conditional_rosi(s, -g, alpha).to_dict()["read_sha256"]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda s, g: make_spec("conditional_rosi", s, alpha=1.0), "needed"),
        (lambda s, g: make_spec("rosi", s, alpha=1.0, read=g), "only used"),
        (lambda s, g: conditional_rosi(s, g, -0.5), ">= 0"),
        (lambda s, g: conditional_rosi(s, torch.zeros_like(g), 1.0), "zero"),
        (lambda s, g: conditional_rosi(s, torch.ones(D + 2), 1.0), "width"),
    ],
)
def test_bad_conditional_rosi_input(make, message: str) -> None:
    with pytest.raises(LensSafetyError, match=message):
        make(*_vectors())


def _hooked_logits(model, s_hat: torch.Tensor, g_hat: torch.Tensor, alpha: float, blocks) -> torch.Tensor:
    """Reference: forward hooks add ``alpha s (g . v)`` to every attention / MLP output write ``v``."""

    def hook(_module, _inputs, out):
        v = out[0] if isinstance(out, tuple) else out
        edited = v + alpha * (v.double() @ g_hat).unsqueeze(-1).to(v.dtype) * s_hat.to(v.dtype)
        return (edited, *out[1:]) if isinstance(out, tuple) else edited

    hf = model.hf_model
    handles = [
        hf.get_submodule(w.hf_name).register_forward_hook(hook)
        for w in model.arch.writers
        if w.kind in ("attn_out", "mlp_out") and w.layer in blocks
    ]
    try:
        batch = model.chat.encode(PROMPTS)
        with torch.inference_mode():
            return forward(model, batch).logits[batch.attention_mask.bool()]
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_conditional_rosi_equals_write_hooks(tiny_dirs: dict[str, Path], arch: str) -> None:
    model = load_model(tiny_dirs[arch], device="cpu")
    gen = torch.Generator().manual_seed(9)
    s, g = torch.randn(model.d_model, generator=gen), torch.randn(model.d_model, generator=gen)
    s_hat, g_hat = (s / s.norm()).double(), (g / g.norm()).double()
    blocks, alpha = (1, 2), 3.0
    batch = model.chat.encode(PROMPTS)
    with torch.inference_mode():
        base = forward(model, batch).logits[batch.attention_mask.bool()]
        with applied_edit(model, conditional_rosi(s, g, alpha, layers=blocks)):
            edited = forward(model, batch).logits[batch.attention_mask.bool()]
    reference = _hooked_logits(model, s_hat, g_hat, alpha, blocks)
    assert (reference - base).abs().max() > 1e-2  # the edit does something
    assert (edited - reference).abs().max() < 1e-4


def test_conditional_rosi_export_carries_its_read_direction(
    tiny_dirs: dict[str, Path], tmp_path: Path
) -> None:
    model = load_model(tiny_dirs["llama"], device="cpu")
    gen = torch.Generator().manual_seed(4)
    s, g = torch.randn(model.d_model, generator=gen), torch.randn(model.d_model, generator=gen)
    spec = conditional_rosi(s, g, 2.0, layers=(0, 2))
    result = export_edit(model, spec, tmp_path / "out")
    assert result.max_abs_logit_diff <= 1e-4
    stored = load_file(str(tmp_path / "out" / "read_direction.safetensors"))["read"]
    assert torch.equal(stored, spec.read)
    record = json.loads((tmp_path / "out" / "edit.json").read_text())
    assert record["method"] == "conditional_rosi" and record["read_sha256"] == spec.to_dict()["read_sha256"]
    assert sorted({int(name.split(".")[2]) for name in record["edited_parameters"]}) == [0, 2]


def test_centred_read_vector_is_orthogonal_and_separates() -> None:
    gen = torch.Generator().manual_seed(2)
    s = torch.randn(D, dtype=torch.float64, generator=gen)
    s_hat = s / s.norm()
    offset, signal = (
        3 * torch.randn(D, dtype=torch.float64, generator=gen),
        torch.randn(D, dtype=torch.float64, generator=gen),
    )
    harmless = offset + 0.1 * torch.randn(40, D, dtype=torch.float64, generator=gen)
    harmful = offset + signal + 0.1 * torch.randn(40, D, dtype=torch.float64, generator=gen)
    g = centred_read_vector(harmful, harmless, s_hat)
    assert abs(float(g.norm()) - 1) < 1e-12
    assert abs(float(g @ s_hat)) < 1e-12 and abs(float(g @ harmless.mean(0))) < 1e-10
    assert float((harmful @ g).mean()) > 10 * float((harmless @ g).std())
    with pytest.raises(LensSafetyError, match="no read direction"):
        centred_read_vector(harmless + 2 * s_hat, harmless, s_hat)


@pytest.mark.parametrize("end", [2, None])
def test_find_read_direction_on_tiny_llama(tiny_dirs: dict[str, Path], end: int | None) -> None:
    model = load_model(tiny_dirs["llama"], device="cpu")
    s = torch.randn(model.d_model, generator=torch.Generator().manual_seed(8))
    assert model.n_layers == 3
    read = find_read_direction(model, HARMFUL, HARMLESS, s, start=0 if end is None else 1, end=end)
    first = read.start
    assert isinstance(read, ReadDirection)
    expected_end = model.n_layers - 1 if end is None else end
    assert read.end == expected_end and read.blocks == tuple(range(first, expected_end))
    # independent recomputation of the increments
    acts_h = collect_activations(model, HARMFUL, layers=sorted({first, expected_end}))
    acts_b = collect_activations(model, HARMLESS, layers=sorted({first, expected_end}))
    dh = (acts_h.at(expected_end) - acts_h.at(first)).double()
    db = (acts_b.at(expected_end) - acts_b.at(first)).double()
    assert abs(float(read.vector @ db.mean(0))) < 1e-6 * float(db.mean(0).norm())
    assert abs(float(read.vector @ (s.double() / s.double().norm()))) < 1e-10
    assert abs(read.harmless_mean) < 1e-6 * float(db.norm()) and read.harmful_mean > 0
    assert read.harmful_mean == pytest.approx(float((dh @ read.vector).mean()), rel=1e-6)
    assert read.alpha_for(2 * read.harmful_mean) == pytest.approx(2.0)
    spec = conditional_rosi(s, read, 1.0)
    assert spec.layers == read.blocks and json.dumps(read.to_dict())


def test_read_direction_ignores_the_chat_template(tiny_dirs: dict[str, Path]) -> None:
    """Template-blind ``g`` (``template=True``) is orthogonal to the summed writes of the edited blocks at every
    position the prompts share (recomputed here with a plain HF forward), so the edit injects nothing
    there; the default last-token-only fit does inject there."""
    model = load_model(tiny_dirs["llama"], device="cpu")
    s = torch.randn(model.d_model, generator=torch.Generator().manual_seed(8))
    prompts = [*HARMFUL, *HARMLESS]
    ids = [model.chat.token_ids(model.chat.format(p)) for p in prompts]
    shared = shared_prefix_length(model, prompts)
    assert 0 < shared < min(map(len, ids))
    assert all(row[:shared] == ids[0][:shared] for row in ids) and len({row[shared] for row in ids}) > 1
    blind = find_read_direction(model, HARMFUL, HARMLESS, s, start=0, end=2, template=True)
    plain = find_read_direction(model, HARMFUL, HARMLESS, s, start=0, end=2)
    assert blind.template_positions == shared and plain.template_positions == 0
    assert blind.to_dict()["template_positions"] == shared
    with torch.no_grad():
        hidden = model.hf_model(input_ids=torch.tensor([ids[0]]), output_hidden_states=True).hidden_states
    template = (hidden[2] - hidden[0])[0, :shared].double()  # x_end - x_start at the shared positions
    scale = float(template.norm(dim=1).max())
    assert float((template @ blind.vector).abs().max()) < 1e-5 * scale
    assert float((template @ plain.vector).abs().max()) > 1e-3 * scale
    assert abs(float(blind.vector @ (s.double() / s.double().norm()))) < 1e-10
    assert abs(blind.harmless_mean) < 1e-6 * scale and blind.harmful_mean > 0


def test_shared_prefix_length_of_identical_prompts_is_their_length(tiny_dirs: dict[str, Path]) -> None:
    model = load_model(tiny_dirs["llama"], device="cpu")
    n = len(model.chat.token_ids(model.chat.format(HARMFUL[0])))
    assert shared_prefix_length(model, [HARMFUL[0], HARMFUL[0]]) == n
    assert shared_prefix_length(model, HARMFUL[:2]) < n


def test_find_read_direction_to_the_final_residual(tiny_dirs: dict[str, Path]) -> None:
    model = load_model(tiny_dirs["llama"], device="cpu")
    s = torch.randn(model.d_model, generator=torch.Generator().manual_seed(8))
    read = find_read_direction(model, HARMFUL, HARMLESS, s, start=0, end=model.n_layers)
    assert read.blocks == tuple(range(model.n_layers)) and read.harmful_mean > 0
    with pytest.raises(LensSafetyError, match="start < end"):
        find_read_direction(model, HARMFUL, HARMLESS, s, start=2, end=2)


def test_shrinkage_read_vector_tends_to_the_mean_difference() -> None:
    gen = torch.Generator().manual_seed(12)
    s_hat = torch.nn.functional.normalize(torch.randn(D, dtype=torch.float64, generator=gen), dim=0)
    scales = torch.linspace(0.05, 3.0, D, dtype=torch.float64)  # anisotropic noise
    harmless = torch.randn(60, D, dtype=torch.float64, generator=gen) * scales
    harmful = torch.randn(60, D, dtype=torch.float64, generator=gen) * scales + 0.5
    plain = centred_read_vector(harmful, harmless, s_hat)
    assert float(centred_read_vector(harmful, harmless, s_hat, 1e6) @ plain) > 1 - 1e-6
    lda = centred_read_vector(harmful, harmless, s_hat, 0.01)
    assert abs(float(lda @ s_hat)) < 1e-12 and abs(float(lda @ harmless.mean(0))) < 1e-10

    def separation(g: torch.Tensor) -> float:
        ph, pb = harmful @ g, harmless @ g
        return float((ph.mean() - pb.mean()) / ((ph.var() + pb.var()) / 2).sqrt())

    assert separation(lda) > separation(plain)  # whitening uses the low-noise coordinates
    with pytest.raises(LensSafetyError, match="shrinkage"):
        centred_read_vector(harmful, harmless, s_hat, 0.0)


def test_with_g_orthogonal_to_s_the_edit_reads_the_same_from_abliterated_or_original_weights() -> None:
    """``(I + a s g^T)(I - s s^T) W = (I - s s^T) W + a s g^T W`` when ``g . s = 0``: the delta
    computed from the original weights (what ``applied_edit`` does) is exact on an abliterated model."""
    s, g = _vectors(13)
    s_hat = s / s.norm()
    g_perp = g - (g @ s_hat) * s_hat
    w = torch.randn(D, D_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(14))
    spec = conditional_rosi(s, g_perp, 4.0)
    ortho = edit_writes(orthogonalize(s), w, "linear")
    delta_from_original = edit_writes(spec, w, "linear") - w
    assert torch.allclose(edit_writes(spec, ortho, "linear"), ortho + delta_from_original, atol=1e-12)
    oblique = conditional_rosi(s, g, 4.0)  # g with an s component reads differently
    assert not torch.allclose(
        edit_writes(oblique, ortho, "linear"), ortho + edit_writes(oblique, w, "linear") - w, atol=1e-6
    )


def test_several_starts_read_in_one_pass_equal_single_reads(tiny_dirs: dict[str, Path]) -> None:
    from lens_safety.directions.read import find_read_directions

    model = load_model(tiny_dirs["llama"], device="cpu")
    s = torch.randn(model.d_model, generator=torch.Generator().manual_seed(8))
    reads = find_read_directions(model, HARMFUL, HARMLESS, s, starts=[1, 0, 1], end=3, shrinkage=1.0)
    assert sorted(reads) == [0, 1]
    for start, read in reads.items():
        single = find_read_direction(model, HARMFUL, HARMLESS, s, start=start, end=3, shrinkage=1.0)
        assert torch.allclose(read.vector, single.vector, atol=1e-12) and read.blocks == single.blocks
