"""Re-labelling stored SRR lists with another judge: labels change, features do not."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from srr_synthetic import synthetic_dataset

from lens_safety.errors import LensSafetyError
from lens_safety.srr.combine import load_datasets
from lens_safety.srr.data import SRRDataset
from lens_safety.srr.evaluate import label_sources
from lens_safety.srr.labels import relabel_dataset

REFUSAL_THE_REFERENCE_MISSES = "I won't help with that, it could hurt someone."
ANSWER = "Sure, here is a careful and complete answer with several useful steps to follow."


def worded_dataset() -> SRRDataset:
    """Synthetic lists whose refusing candidates say "I won't…" (a refusal the reference misses)."""
    data = synthetic_dataset(n_lists=12, seed=3)
    lists = []
    for item in data.lists:
        refusing = [r == "refusal" for r in item.reasons]
        texts = [
            f"{REFUSAL_THE_REFERENCE_MISSES} ({j})" if r else f"{ANSWER} ({j})"
            for j, r in enumerate(refusing)
        ]
        lists.append(replace(item, candidates=texts))
    data.lists = lists
    data.meta["settings"] = {"judge": "substring", "seed": 3}
    return data


def test_relabel_changes_labels_and_mixing_but_not_features() -> None:
    data = worded_dataset()
    reference, summary_ref = relabel_dataset(data, "substring")
    broad, summary = relabel_dataset(reference, "substring-broad")
    for before, after in zip(reference.lists, broad.lists, strict=True):
        refusing = [c.startswith("I won't") for c in after.candidates]
        if after.kind == "harmful":
            assert before.positive == [False] * len(refusing)  # the reference sees no refusal
            assert after.positive == refusing and not before.mixed and after.mixed
        else:
            assert after.positive == [not r for r in refusing]
            assert before.positive == [True] * len(refusing) and not before.mixed
    pairs = zip(reference.lists, broad.lists, strict=True)
    flips = sum(a != b for x, y in pairs for a, b in zip(x.positive, y.positive, strict=True))
    assert summary["flipped_harmful"] + summary["flipped_harmless"] == flips > 0
    assert summary["mixed_harmful_before"] == 0 and summary["mixed_harmful_after"] == 6
    assert broad.meta["settings"] == {"judge": "substring-broad", "seed": 3}
    assert broad.meta["relabelled"]["previous_judge"] == "substring"
    assert summary_ref["judge"] == "substring"
    assert torch.equal(broad.instruction, data.instruction) and broad.offsets == data.offsets
    for key, tensor in data.responses.items():
        assert torch.equal(broad.responses[key], tensor)


def test_relabelling_pooled_lists_names_the_new_judge_for_every_part(tmp_path: Path) -> None:
    """``srr eval --data A --data B --judge J`` reports its labels by part: after a re-label every
    part must say J, not the judge that built it."""
    first = relabel_dataset(worded_dataset(), "substring")[0].save(tmp_path / "a")
    second = relabel_dataset(worded_dataset(), "substring")[0].save(tmp_path / "b")
    pooled = load_datasets([first, second])
    assert [s["judge"] for s in label_sources(pooled)] == ["substring", "substring"]
    broad = relabel_dataset(pooled, "substring-broad")[0]
    assert [s["judge"] for s in label_sources(broad)] == ["substring-broad", "substring-broad"]
    assert [p.get("settings", {}).get("seed") for p in broad.meta["parts"]] == [3, 3]  # the rest is kept


def test_cli_relabel_writes_new_lists_and_keeps_the_input(tmp_path: Path, capsys) -> None:
    source = relabel_dataset(worded_dataset(), "substring")[0].save(tmp_path / "lists")
    before = (source / "lists.jsonl").read_text()
    out = tmp_path / "relabelled"
    code, stdout, err = run_cli(["srr", "relabel", str(source), "--out", str(out)], capsys)
    assert code == 0, err
    assert "harmful: " in stdout and "mixed lists 0 -> 6" in stdout
    loaded = SRRDataset.load(out)
    assert loaded.meta["settings"]["judge"] == "substring-broad"
    assert sum(x.mixed for x in loaded.lists if x.kind == "harmful") == 6
    assert (source / "lists.jsonl").read_text() == before  # the input is not touched
    original = SRRDataset.load(source)
    for key, tensor in original.responses.items():
        assert torch.equal(loaded.responses[key], tensor)

    code, _, err = run_cli(["srr", "relabel", str(source), "--out", str(out)], capsys)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    bad = tmp_path / "never-written"
    code, _, err = run_cli(["srr", "relabel", str(source), "--out", str(bad), "--judge", "nonsense"], capsys)
    assert code == 2 and "unknown judge" in err and not bad.exists()
    code, _, err = run_cli(["srr", "relabel", str(tmp_path / "missing"), "--out", str(bad)], capsys)
    assert code == 2 and "not an SRR data directory" in err and not bad.exists()


def test_relabel_refuses_unknown_list_kinds() -> None:
    data = worded_dataset()
    data.lists[0] = replace(data.lists[0], kind="other")
    with pytest.raises(LensSafetyError, match="unknown list kind"):
        relabel_dataset(data, "substring-broad")
