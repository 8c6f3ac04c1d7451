"""The registry of edit methods is the one source of per-method behaviour: every method round-trips
through make_spec / EditSpec.to_dict / the model card, alpha ranges and the unknown-method error come
from it, and the ``exact`` an export records equals the registry's answer on a post-norm model."""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import pytest
import torch

from lens_safety.architecture import ResidualWriter
from lens_safety.calibration import DEFAULT_ALPHAS, calibrate_alpha
from lens_safety.edits import (
    DEFAULT_TARGETS,
    EDIT_METHODS,
    METHODS,
    add_bias,
    edit_method,
    edit_writes,
    make_spec,
)
from lens_safety.edits.checkpoint import checkpoint_writers
from lens_safety.edits.methods import MethodName
from lens_safety.edits.spec import EditSpec
from lens_safety.edits.targets import inexact_writers, select_writers
from lens_safety.errors import LensSafetyError
from lens_safety.export import export_edit
from lens_safety.model_card import render_model_card
from lens_safety.models import ChatModel, load_model
from lens_safety.pipelines import EDIT_METHODS as JOB_METHODS
from lens_safety.pipelines import EditSettings
from lens_safety.testing import make_tiny_model

D = 16


def _spec(name: str, s: torch.Tensor, alpha: float | None = 0.5, **kwargs: typing.Any) -> EditSpec:
    """A spec of method ``name`` (with a read direction where the method needs one)."""
    if edit_method(name).needs_read:
        kwargs["read"] = torch.randn(
            s.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(2)
        )
    return make_spec(name, s, alpha=alpha if edit_method(name).has_strength else None, **kwargs)


def _s(d: int = D) -> torch.Tensor:
    return torch.randn(d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def test_every_name_is_a_view_of_the_registry() -> None:
    assert typing.get_args(MethodName) == tuple(EDIT_METHODS) == METHODS
    assert "add_bias" in METHODS  # the registry's rule: every method, add_bias included
    assert {name: m.default_targets for name, m in EDIT_METHODS.items()} == DEFAULT_TARGETS
    assert DEFAULT_ALPHAS == {"rosi": (3.0, 10.0, 30.0, 100.0), "amplify": (0.03, 0.1, 0.3, 1.0)}
    assert JOB_METHODS == ("rosi", "amplify", "orthogonalize")
    assert typing.get_args(typing.get_type_hints(EditSettings)["method"]) == JOB_METHODS
    with pytest.raises(TypeError):
        EDIT_METHODS["sharpen"] = EDIT_METHODS["rosi"]  # type: ignore[index]


def test_unknown_method_is_one_line_naming_every_method(gpt2: ChatModel) -> None:
    for call in (lambda: edit_method("sharpen"), lambda: make_spec("sharpen", _s())):
        with pytest.raises(LensSafetyError) as info:
            call()
        assert "\n" not in str(info.value) and "unknown edit method 'sharpen'" in str(info.value)
        assert all(name in str(info.value) for name in METHODS)
    with pytest.raises(LensSafetyError, match=r"use one of rosi, amplify, orthogonalize$"):
        EditSettings(method="add_bias")  # type: ignore[arg-type]
    with pytest.raises(LensSafetyError, match="unknown edit method"):
        calibrate_alpha(gpt2, torch.randn(gpt2.d_model), ["a"], ["b"], method="sharpen")


@pytest.mark.parametrize("name", list(EDIT_METHODS))
def test_method_round_trips_through_spec_dict_and_card(name: str) -> None:
    kind = EDIT_METHODS[name]
    spec = _spec(name, _s(), layers=[1], approximate=True)
    record = spec.to_dict()
    assert record["method"] == name and tuple(record["targets"]) == kind.default_targets
    again = make_spec(
        record["method"],
        _s(),
        alpha=record["alpha"],
        targets=record["targets"],
        layers=record["layers"],
        approximate=record["approximate"],
        read=spec.read,
    )
    assert again.to_dict() == record
    card = render_model_card({**record, "exact": False})
    assert f"# {name} edit" in card and f"Formula: `{kind.formula}`" in card and "APPROXIMATE" in card
    assert "APPROXIMATE" not in render_model_card({**record, "exact": True})


@pytest.mark.parametrize("name", list(EDIT_METHODS))
def test_alpha_range_comes_from_the_registry(name: str) -> None:
    kind, s = EDIT_METHODS[name], _s()
    if not kind.has_strength:
        assert _spec(name, s).alpha == 1.0
        with pytest.raises(LensSafetyError, match="takes no strength"):
            make_spec(name, s, alpha=2.0)
        return
    assert kind.min_alpha is not None
    for bad in (float("nan"), float("inf")):
        with pytest.raises(LensSafetyError, match="finite"):
            _spec(name, s, alpha=bad)
    if kind.min_alpha > -float("inf"):
        assert _spec(name, s, alpha=kind.min_alpha).alpha == kind.min_alpha
        with pytest.raises(LensSafetyError, match=f">= {kind.min_alpha:g}, got"):
            _spec(name, s, alpha=kind.min_alpha - 0.5)
    else:
        assert _spec(name, s, alpha=-1e6).alpha == -1e6
    sweep = kind.check_sweep([1.0, 0.5, 1.0])
    assert sweep == (0.5, 1.0)


def test_a_calibration_sweep_takes_only_strengths_that_add_refusal() -> None:
    """Calibration looks for the least edit that reaches the refusal target: 0 is the baseline
    and a negative ROSI or amplify alpha weakens refusal, so no sweep may contain either (a fixed
    negative amplify alpha stays allowed)."""
    calibrated = [m for m in EDIT_METHODS.values() if m.default_alphas is not None]
    assert [m.name for m in calibrated] == ["rosi", "amplify"]
    for kind in calibrated:
        assert kind.check_sweep(kind.default_alphas or ()) == kind.default_alphas
        for bad in ([-0.5, 0.3], [0.0, 1.0]):
            with pytest.raises(LensSafetyError, match="> 0"):
                kind.check_sweep(bad)
    assert _spec("amplify", _s(), alpha=-0.5).alpha == -0.5


def test_add_bias_via_make_spec_is_add_bias() -> None:
    """``make_spec("add_bias", r, alpha=coeff |r|, layers=(layer - 1,))`` edits a bias bit for bit as
    :func:`add_bias` ``(r, coeff, layer)`` does: ``b + coeff * r``."""
    r, coeff, bias = 3.0 * _s(), 0.7, torch.randn(D, dtype=torch.float64)
    direct = add_bias(r, coeff, 2)
    spec = make_spec("add_bias", r, alpha=coeff * float(r.norm()), layers=(1,))
    assert (spec.targets, spec.layers) == (direct.targets, direct.layers)
    assert torch.equal(edit_writes(spec, bias, "linear", True), edit_writes(direct, bias, "linear", True))
    assert torch.allclose(edit_writes(spec, bias, "linear", True), bias + coeff * r, atol=1e-12)


def _tiny(arch: str, smollm2_dir: Path, factory: pytest.TempPathFactory) -> ChatModel:
    return load_model(make_tiny_model(arch, factory.mktemp(arch), smollm2_dir), device="cpu")


@pytest.fixture(scope="module")
def gpt2(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ChatModel:
    """A tiny GPT-2: output biases, no post-norm writer."""
    return _tiny("gpt2", smollm2_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def gemma2(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ChatModel:
    """A tiny Gemma 2: post-norm attention / MLP writers, a plain (not post-norm) embedding."""
    return _tiny("gemma2", smollm2_dir, tmp_path_factory)


@pytest.mark.parametrize("name", [n for n, m in EDIT_METHODS.items() if not m.biases_only])
def test_exported_exact_is_the_registrys_answer(gemma2: ChatModel, tmp_path: Path, name: str) -> None:
    """Per writer kind: ``exact`` in ``edit.json`` is ``exact_on_post_norm`` on a post-norm writer,
    true on the embedding; a non-approximate spec on a post-norm writer is refused exactly when the
    registry says the method is inexact there."""
    kind, s = EDIT_METHODS[name], _s(gemma2.d_model)
    writers = {w.kind: w for w in checkpoint_writers(gemma2)}
    assert writers["attn_out"].post_norm and writers["mlp_out"].post_norm and not writers["embed"].post_norm
    for target in ("attn_out", "embed"):
        spec = _spec(name, s, targets=[target], approximate=True)
        record = export_edit(gemma2, spec, tmp_path / target).edit
        assert record["exact"] == (kind.exact_on_post_norm or not writers[target].post_norm), target
        saved = json.loads((tmp_path / target / "edit.json").read_text())
        assert saved["exact"] == record["exact"]
        readme = (tmp_path / target / "README.md").read_text()
        assert ("APPROXIMATE" in readme) == (not record["exact"]) and kind.formula in readme
    strict = _spec(name, s, targets=["mlp_out"])
    if kind.exact_on_post_norm:
        assert select_writers(strict, checkpoint_writers(gemma2))
    else:
        with pytest.raises(LensSafetyError, match=f"post-norm, so .*{kind.exact_twin}"):
            select_writers(strict, checkpoint_writers(gemma2))


def test_add_bias_exactness_follows_the_registry(gpt2: ChatModel, tmp_path: Path) -> None:
    """``add_bias`` is inexact through a post-norm as ``orthogonalize`` is (the rule the export
    now shares with target selection); no tiny architecture has a post-norm writer with a bias,
    so that case is checked on the selection of a gpt2 writer given a post-norm."""
    spec = add_bias(_s(gpt2.d_model), 0.5, 2)
    assert export_edit(gpt2, spec, tmp_path / "bias").edit["exact"] is True
    plain = [w for w in checkpoint_writers(gpt2) if w.kind == "mlp_out"]
    normed: list[ResidualWriter] = [dataclasses.replace(w, post_norm="norm") for w in plain]
    assert not inexact_writers(spec, plain)
    assert inexact_writers(spec, normed) == normed
    with pytest.raises(LensSafetyError, match=r"post-norm, so adding to its bias .*add_direction"):
        select_writers(spec, normed)
    assert select_writers(dataclasses.replace(spec, approximate=True), normed)
    assert not inexact_writers(dataclasses.replace(spec, method="rosi"), normed)
