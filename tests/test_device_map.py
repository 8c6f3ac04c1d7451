"""A model split across devices by accelerate (``load_model(..., device_map="auto", max_memory=...)``)
reads, intervenes, edits in memory, generates and exports exactly as the same model on one device.

On a CPU-only machine the split is the real multi-placement path: the first blocks stay in CPU memory
and the rest are offloaded to disk (``meta`` placeholders materialised from the checkpoint by
accelerate's hooks at every call). The budget is derived from the model's own tensor sizes and the
test first asserts that the realised map really has blocks in both places.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lens_safety.activations import collect_activations
from lens_safety.edits import applied_edit, orthogonalize, rosi
from lens_safety.errors import LensSafetyError
from lens_safety.evaluation.generation import generate
from lens_safety.export import export_edit
from lens_safety.forward_pass import forward
from lens_safety.interventions import ablate_direction, add_direction
from lens_safety.models import ChatModel, load_model
from lens_safety.selfcheck import check_generation
from lens_safety.testing import make_tiny_model

PROMPTS = ["How do I bake bread at home?", "Tell me a joke about cats.", "Why is the sky blue?"]


def _cpu_budget(model_dir: Path, blocks_on_cpu: int) -> int:
    """A ``max_memory["cpu"]`` under which accelerate keeps the embedding and ``blocks_on_cpu``
    blocks in memory and offloads the rest to disk: it reserves room for the largest module (the
    embedding or unembedding), then fills the device in module order."""
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as handle:
        sizes = {key: handle.get_slice(key).get_shape() for key in handle.keys()}  # noqa: SIM118
    nbytes = {key: 4 * torch.Size(shape).numel() for key, shape in sizes.items()}
    embed = nbytes["model.embed_tokens.weight"]
    block = sum(n for key, n in nbytes.items() if key.startswith("model.layers.0."))
    return 2 * embed + blocks_on_cpu * block + block // 2


def _digest(directory: Path) -> dict[str, str]:
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.glob("*.safetensors"))
    }


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("dm") / "llama", smollm2_dir)


@pytest.fixture(scope="module")
def pair(llama_dir: Path) -> tuple[ChatModel, ChatModel]:
    """The tiny llama on one device, and split: embedding + 2 blocks in CPU memory, the rest on disk."""
    one = load_model(llama_dir, device="cpu")
    split = load_model(llama_dir, device_map="auto", max_memory={"cpu": _cpu_budget(llama_dir, 2)})
    return one, split


def test_the_split_really_places_blocks_in_memory_and_on_disk(pair: tuple[ChatModel, ChatModel]) -> None:
    _, split = pair
    placement = split.device_map
    assert placement is not None
    assert placement["model.layers.0"] == "cpu" and placement["model.layers.2"] == "disk", placement
    offloaded = [n for n, p in split.hf_model.named_parameters() if p.device.type == "meta"]
    assert any("layers.2" in n for n in offloaded) and not any("layers.0" in n for n in offloaded)
    assert split.device == torch.device("cpu") and split.devices == (torch.device("cpu"),)
    assert pair[0].device_map is None


def test_residuals_interventions_and_generation_equal_the_single_device_run(
    pair: tuple[ChatModel, ChatModel],
) -> None:
    one, split = pair
    a = collect_activations(one, PROMPTS, positions=(-1, -3), batch_size=2)
    b = collect_activations(split, PROMPTS, positions=(-1, -3), batch_size=2)
    # same kernels on the same CPU: equal up to float round-off (measured: bitwise equal)
    torch.testing.assert_close(b.tensor, a.tensor, rtol=0, atol=1e-6)
    r = torch.randn(one.d_model, generator=torch.Generator().manual_seed(0))
    for model_a, model_b in ((one, split),):
        with add_direction(model_a, r, layer=2, coeff=4.0):
            ga = generate(model_a, PROMPTS, max_new_tokens=8, batch_size=2)
        with add_direction(model_b, r, layer=2, coeff=4.0):
            gb = generate(model_b, PROMPTS, max_new_tokens=8, batch_size=2)
        assert ga.token_ids == gb.token_ids
        with ablate_direction(model_a, r):
            ga = generate(model_a, PROMPTS, max_new_tokens=8)
        with ablate_direction(model_b, r):
            gb = generate(model_b, PROMPTS, max_new_tokens=8)
        assert ga.token_ids == gb.token_ids
    plain = generate(one, PROMPTS, max_new_tokens=8)
    assert plain.token_ids == generate(split, PROMPTS, max_new_tokens=8).token_ids
    assert plain.token_ids != ga.token_ids  # the intervention did change the completions


def test_a_split_model_passes_the_vanilla_self_check(pair: tuple[ChatModel, ChatModel]) -> None:
    check = check_generation(pair[1], reference="vanilla")
    assert check.ok and check.tokens == check.expected


def test_in_memory_edits_reach_offloaded_weights_and_are_undone(
    pair: tuple[ChatModel, ChatModel], llama_dir: Path
) -> None:
    one, split = pair
    before = _digest(llama_dir)
    batch = one.chat.encode(PROMPTS)
    r = torch.randn(one.d_model, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        base = forward(split, batch).logits
    for spec in (rosi(r, 6.0), orthogonalize(r)):
        with torch.inference_mode(), applied_edit(one, spec):
            want = forward(one, batch).logits
            want_tokens = generate(one, PROMPTS, max_new_tokens=6).token_ids
        with torch.inference_mode(), applied_edit(split, spec) as deltas:
            got = forward(split, batch).logits
            got_tokens = generate(split, PROMPTS, max_new_tokens=6).token_ids
        assert any("layers.2" in name for name in deltas)  # an offloaded block was edited
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        assert got_tokens == want_tokens
        assert (want - base).abs().max() > 1e-2  # the edit changes the logits
        with torch.inference_mode():
            assert torch.equal(forward(split, batch).logits, base)  # undone on exit
    assert _digest(llama_dir) == before  # the offloaded weights' checkpoint is never written


def test_edited_weights_offloaded_to_disk_stay_on_disk(
    pair: tuple[ChatModel, ChatModel], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An edit of a disk-offloaded block keeps its edited weights in temporary files (one per
    parameter, removed on exit), not in host memory; blocks held in CPU memory are edited in place."""
    one, split = pair
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    spec = rosi(torch.randn(one.d_model, generator=torch.Generator().manual_seed(3)), 4.0)
    batch = one.chat.encode(PROMPTS)
    with torch.inference_mode(), applied_edit(one, spec):
        want = forward(one, batch).logits
    with torch.inference_mode(), applied_edit(split, spec) as deltas:
        spilled = sorted(tmp_path.glob("lens-safety-edit-*.safetensors"))
        on_disk = [n for n in deltas if n.startswith("model.layers.") and int(n.split(".")[2]) >= 2]
        assert on_disk and len(spilled) == len(on_disk)  # one file per edited disk-offloaded weight
        got = forward(split, batch).logits
    assert torch.equal(got, want)
    assert not list(tmp_path.glob("lens-safety-edit-*"))  # the files are removed on exit


def test_cpu_offloaded_replacements_stay_in_memory() -> None:
    """accelerate keeps a CPU-offloaded weight in its loader's state_dict and a disk-offloaded one in
    its index: only the latter is spilled to a file."""
    from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset

    from lens_safety.placement import _offloaded_to_disk

    in_memory = PrefixedDataset(OffloadedWeightsLoader(state_dict={"m.weight": torch.ones(2)}), "m.")
    on_disk = PrefixedDataset(OffloadedWeightsLoader(index={"m.weight": {"dtype": "float32"}}), "m.")
    assert not _offloaded_to_disk(in_memory, "weight")
    assert _offloaded_to_disk(on_disk, "weight")


def test_export_of_a_split_model_is_byte_identical_and_verified(
    pair: tuple[ChatModel, ChatModel], tmp_path: Path
) -> None:
    one, split = pair
    spec = rosi(torch.randn(one.d_model, generator=torch.Generator().manual_seed(2)), 5.0)
    a = export_edit(one, spec, tmp_path / "one")
    b = export_edit(split, spec, tmp_path / "split")
    assert _digest(tmp_path / "one") == _digest(tmp_path / "split")
    assert b.edit["verification"]["reference"] == "in-memory edited model"
    assert a.max_abs_logit_diff <= a.bound and b.max_abs_logit_diff <= b.bound


def test_half_precision_split_with_tied_embedding_on_disk(
    tmp_path_factory: pytest.TempPathFactory,
    smollm2_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bfloat16 Gemma 2 (tied embedding, post-norms) entirely offloaded to disk: orthogonalising
    edits the offloaded embedding and unties the head; export verifies against vanilla + edit (whose
    edited weights are spilled to temporary files, all removed afterwards)."""
    spill = tmp_path_factory.mktemp("spill")
    monkeypatch.setattr(tempfile, "tempdir", str(spill))
    path = make_tiny_model("gemma2", tmp_path_factory.mktemp("dm") / "gemma2", smollm2_dir, dtype="bfloat16")
    one = load_model(path, device="cpu", dtype="bfloat16")
    split = load_model(path, device_map={"": "disk"}, dtype="bfloat16")
    assert all(p.device.type == "meta" for p in split.hf_model.parameters())
    spec = orthogonalize(
        torch.randn(one.d_model, generator=torch.Generator().manual_seed(4)), approximate=True
    )
    batch = one.chat.encode(PROMPTS)
    with torch.inference_mode(), applied_edit(one, spec):
        want = forward(one, batch).logits
    with torch.inference_mode(), applied_edit(split, spec):
        got = forward(split, batch).logits
    assert torch.equal(got, want)
    a = export_edit(one, spec, tmp_path / "one")
    b = export_edit(split, spec, tmp_path / "split")
    assert a.untied and b.untied
    assert _digest(tmp_path / "one") == _digest(tmp_path / "split")
    assert b.edit["verification"]["reference"] == "vanilla base + edit"
    assert not list(spill.glob("lens-safety-edit-*"))


def test_placement_arguments_are_checked(llama_dir: Path) -> None:
    with pytest.raises(LensSafetyError, match="mutually exclusive"):
        load_model(llama_dir, device="cpu", device_map="auto")
    with pytest.raises(LensSafetyError, match="only apply to a split model"):
        load_model(llama_dir, max_memory={"cpu": "1GiB"})
    with pytest.raises(LensSafetyError, match="compatibility mode"):
        load_model(llama_dir, device_map="auto", compatibility_mode=True)


def test_device_auto_is_the_auto_device_map(
    llama_dir: Path, pair: tuple[ChatModel, ChatModel], capsys: pytest.CaptureFixture[str]
) -> None:
    """``device="auto"`` (the CLI's ``--device auto``) is ``device_map="auto"``: on a machine without
    GPUs accelerate keeps the whole model in CPU memory (no map is realised), so it equals the
    one-device model; ``info`` reports the map (``null`` here)."""
    import json

    from cli_runner import run_cli

    from lens_safety.models import _placement

    for strategy in ("auto", "balanced", "balanced_low_0", "sequential"):
        assert _placement(strategy, None, None, None) == {"device_map": strategy}
    assert _placement("cpu", None, None, None) == {"device": "cpu"}
    auto = load_model(llama_dir, device="auto")
    assert auto.device.type == "cpu" and (auto.device_map is None or set(auto.device_map.values()) == {"cpu"})
    batch = auto.chat.encode(PROMPTS)
    with torch.inference_mode():
        torch.testing.assert_close(
            forward(auto, batch).logits, forward(pair[0], batch).logits, rtol=0, atol=0
        )
    code, out, err = run_cli(["info", str(llama_dir), "--device", "auto", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["device_map"] == auto.device_map
    code, out, err = run_cli(["info", str(llama_dir), "--device", "cpu", "--json"], capsys)
    assert code == 0 and json.loads(out)["device_map"] is None
