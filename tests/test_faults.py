"""Damaged model directories: one ``error:`` line naming the problem and the fix, exit 2, no
traceback, and the directory byte-identical afterwards (nothing loaded by pickle, nothing written)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli


def tree_hashes(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root`` (relative path -> hex digest)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def truncate_body(model: Path) -> None:
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) * 2 // 3])  # an interrupted download


def corrupt_header_length(model: Path) -> None:
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[:8] = struct.pack("<Q", 1 << 40)
    weights.write_bytes(bytes(data))


def corrupt_header_json(model: Path) -> None:
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:16] = b"\xff\xfe{[}]!!"
    weights.write_bytes(bytes(data))


def only_config(model: Path) -> None:
    for p in model.iterdir():
        if p.name != "config.json":
            p.unlink()


def config_not_json(model: Path) -> None:
    (model / "config.json").write_text('{"model_type": "llama", ')


def unknown_model_type(model: Path) -> None:
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="zorblax", architectures=["ZorblaxForCausalLM"])
    (model / "config.json").write_text(json.dumps(config))


def needs_remote_code(model: Path) -> None:
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="zorblax", auto_map={"AutoModelForCausalLM": "modeling_zorblax.ZorblaxModel"})
    (model / "config.json").write_text(json.dumps(config))


def no_tokenizer(model: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        (model / name).unlink(missing_ok=True)


class _Trap:
    """Unpickling this writes a marker file: proof that a loader ran pickle code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.write_text, (self.marker, "unpickled"))


def pickle_only(model: Path) -> None:
    import pickle

    (model / "model.safetensors").unlink()
    with open(model / "pytorch_model.bin", "wb") as handle:
        pickle.dump(_Trap(model.parent / "UNPICKLED"), handle)


DAMAGES: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    "only-config": (only_config, ("no weight files", "copy the model's weights")),
    "config-not-json": (config_not_json, ("config.json is not valid JSON", "re-download")),
    "truncated-body": (truncate_body, ("truncated or corrupted", "tensors need", "re-download")),
    "header-length": (corrupt_header_length, ("truncated or corrupted", "header length", "re-download")),
    "header-json": (corrupt_header_json, ("truncated or corrupted", "not valid JSON", "re-download")),
    "unknown-model-type": (unknown_model_type, ("model_type 'zorblax'", "unknown to transformers")),
    "needs-remote-code": (needs_remote_code, ("needs its own model code", "trust_remote_code is off")),
    "no-tokenizer": (no_tokenizer, ("no tokenizer files", "copy the tokenizer files")),
    "pickle-only": (pickle_only, ("only pickle weights (pytorch_model.bin)", "convert them to safetensors")),
}


@pytest.mark.parametrize("case", sorted(DAMAGES))
def test_damaged_model_directory_is_one_clear_error_and_stays_untouched(
    case: str, tiny_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    damage, phrases = DAMAGES[case]
    model = tmp_path / "model"
    shutil.copytree(tiny_dirs["llama"], model)
    damage(model)
    before = tree_hashes(tmp_path)
    for argv in (["info", str(model)], ["rosi", str(model), "--alpha", "1", "--out", str(tmp_path / "out")]):
        code, out, err = run_cli(argv, capsys)
        assert code == 2, (case, out, err)
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
        for phrase in phrases:
            assert phrase in err, (phrase, err)
    assert tree_hashes(tmp_path) == before  # nothing written, nothing unpickled, nothing changed
    assert not (tmp_path / "out").exists()


def test_a_shard_missing_from_the_index_is_named(
    tiny_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoModelForCausalLM

    model = tmp_path / "sharded"
    shutil.copytree(tiny_dirs["llama"], model)
    (model / "model.safetensors").unlink()
    AutoModelForCausalLM.from_pretrained(str(tiny_dirs["llama"])).save_pretrained(
        model, max_shard_size="100KB"
    )
    index = json.loads((model / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    code, _, err = run_cli(["info", str(model), "--json"], capsys)
    assert code == 0, err  # the complete sharded checkpoint loads
    os.remove(model / shards[1])
    before = tree_hashes(model)
    code, _, err = run_cli(["info", str(model)], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"e.g. {shards[1]}" in err and "copy every shard the index lists" in err
    assert tree_hashes(model) == before


def test_pickle_only_checkpoint_passes_only_when_allowed(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    from lens_safety.checkpoint_files import check_checkpoint
    from lens_safety.errors import LensSafetyError

    model = tmp_path / "model"
    shutil.copytree(tiny_dirs["llama"], model)
    pickle_only(model)
    with pytest.raises(LensSafetyError, match="only pickle weights"):
        check_checkpoint(model)
    assert check_checkpoint(model, allow_pickle=True) == []
    assert not (tmp_path / "UNPICKLED").exists()


# ------------------------------------------------------------------ prompt files

PROMPT_FILES: dict[str, tuple[str, bytes, tuple[str, ...]]] = {
    "empty": ("p.txt", b"\n\n", ("is empty",)),
    "comments-only": ("p.txt", b"# one\n  # two\n", ("is empty",)),
    "not-utf8": ("p.txt", b"How do I bake bread?\nWhat \xff is this?\n", ("not UTF-8", "0xff", "line 2")),
    "jsonl-bad-line": (
        "p.jsonl",
        b'{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": c}\n',
        ("p.jsonl:3 is not a JSON object", "one JSON object per line"),
    ),
    "jsonl-not-object": ("p.jsonl", b'{"prompt": "a"}\n"just text"\n', ("p.jsonl:2 is not a JSON object",)),
    "csv-no-column": ("p.csv", b"text,category\nhello,x\n", ("has no column 'prompt'", "--column")),
}


@pytest.mark.parametrize("case", sorted(PROMPT_FILES))
def test_bad_prompt_file_is_one_clear_error(
    case: str, tiny_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name, data, phrases = PROMPT_FILES[case]
    prompts = tmp_path / name
    prompts.write_bytes(data)
    code, _, err = run_cli(["eval", str(tiny_dirs["llama"]), "--harmful", str(prompts)], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for phrase in phrases:
        assert phrase in err, (phrase, err)
    assert prompts.read_bytes() == data


def test_duplicate_prompts_are_kept_with_a_warning(
    tiny_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = tmp_path / "dup.txt"
    prompts.write_text("Name a fruit.\nName a colour.\nName a fruit.\nName a fruit.\n")
    code, out, err = run_cli(
        ["eval", str(tiny_dirs["llama"]), "--harmful", str(prompts), "--max-new-tokens", "1", "--json"],
        capsys,
    )
    assert code == 0, err
    assert "warning: " in err and "has 2 duplicate prompt(s) (prompt 3 repeats prompt 1)" in err
    assert json.loads(out)["harmful_refusal_rate"]["n"] == 4


def test_a_prompt_longer_than_the_context_is_refused_not_crashed(
    tiny_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lens_safety.models import context_length

    for arch in ("gpt2", "llama"):
        context = context_length(json.loads((tiny_dirs[arch] / "config.json").read_text()))
        assert context is not None
        prompts = tmp_path / f"long-{arch}.txt"
        prompts.write_text("Name a fruit.\n" + "word " * (context + 10) + "\n")
        code, _, err = run_cli(["eval", str(tiny_dirs[arch]), "--harmful", str(prompts)], capsys)
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert f"prompt 2 of {prompts} has" in err and f"more than the model's context of {context}" in err
        # a prompt that fits, but not with the new tokens asked for
        prompts.write_text("word " * (context - 40) + "\n")
        code, _, err = run_cli(["eval", str(tiny_dirs[arch]), "--harmful", str(prompts)], capsys)
        assert code == 2 and "+ 48 new tokens" in err and "generate fewer new tokens" in err, err


# ------------------------------------------------------------------ edit strength


def test_an_absurd_alpha_that_overflows_the_weights_is_refused(
    tiny_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lens_safety.directions import Direction

    direction = tmp_path / "direction"
    Direction(torch.randn(3, 64), layer=1, position=-1, method="mean-diff").save(direction)
    out = tmp_path / "out"
    argv = [
        "rosi",
        str(tiny_dirs["llama"]),
        "--direction",
        str(direction),
        "--n-test",
        "0",
        "--out",
        str(out),
    ]
    code, _, err = run_cli([*argv, "--alpha", "1e300"], capsys)
    lines = [line for line in err.splitlines() if line.strip()]  # a finished progress bar leaves a blank line
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert "not finite" in err and "smaller --alpha" in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["direction"]


def _one_error_line(code: int, err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]  # a finished progress bar leaves a blank line
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_a_tokenizer_without_a_chat_template_is_one_clear_error(
    tiny_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_dirs["llama"], model)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    before = tree_hashes(tmp_path)
    for argv in (
        ["eval", str(model), "--limit", "2", "--max-new-tokens", "2"],
        ["rosi", str(model), "--layer", "1", "--alpha", "2", "--n-test", "0", "--out", str(tmp_path / "out")],
    ):
        message = _one_error_line(*run_cli(argv, capsys)[::2])
        assert "has no chat template" in message and "--no-chat-template" in message, message
    assert tree_hashes(tmp_path) == before
    # the fix the message names works
    code, _, err = run_cli(
        ["eval", str(model), "--limit", "2", "--max-new-tokens", "2", "--no-chat-template"], capsys
    )
    assert code == 0, err


# ------------------------------------------------------------------ directions


def _tamper(direction: Path, how: str) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(direction / "direction.safetensors"))
    if how == "wrong-width":
        tensors = {k: v[..., :48].contiguous() for k, v in tensors.items()}
    else:
        value = {"zero": 0.0, "nan": float("nan"), "inf": float("inf")}[how]
        tensors = {k: torch.full_like(v, value) for k, v in tensors.items()}
    save_file(tensors, str(direction / "direction.safetensors"))


DIRECTION_FAULTS: dict[str, tuple[str, ...]] = {
    "wrong-width": ("direction has width 48", "d_model 64", "extract a direction from this architecture"),
    "zero": ("zero or not finite (a damaged or hand-edited file)", "re-extract it"),
    "nan": ("zero or not finite (a damaged or hand-edited file)", "re-extract it"),
    "inf": ("zero or not finite (a damaged or hand-edited file)", "re-extract it"),
}


@pytest.mark.parametrize("case", sorted(DIRECTION_FAULTS))
def test_a_damaged_direction_file_is_one_clear_error(
    case: str, tiny_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lens_safety.directions import Direction

    direction = tmp_path / "direction"
    Direction(torch.randn(3, 64), layer=1, position=-1, method="mean-diff").save(direction)
    _tamper(direction, case)
    before, model_before = tree_hashes(tmp_path), tree_hashes(tiny_dirs["llama"])
    for method in ("rosi", "ablate"):
        argv = [method, str(tiny_dirs["llama"]), "--direction", str(direction), "--n-test", "0"]
        argv += ["--alpha", "2"] if method == "rosi" else []
        message = _one_error_line(*run_cli([*argv, "--out", str(tmp_path / "out")], capsys)[::2])
        for phrase in DIRECTION_FAULTS[case]:
            assert phrase in message, (phrase, message)
    assert tree_hashes(tmp_path) == before and tree_hashes(tiny_dirs["llama"]) == model_before


@pytest.mark.parametrize("alpha", ["-3", "-inf", "inf", "nan", "1e300"])
def test_a_negative_infinite_or_absurd_alpha_is_one_clear_error(
    alpha: str, tiny_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lens_safety.directions import Direction

    direction = tmp_path / "direction"
    Direction(torch.randn(3, 64), layer=1, position=-1, method="mean-diff").save(direction)
    before = tree_hashes(tmp_path)
    argv = ["rosi", str(tiny_dirs["llama"]), "--direction", str(direction), "--n-test", "0"]
    message = _one_error_line(
        *run_cli([*argv, "--alpha", alpha, "--out", str(tmp_path / "out")], capsys)[::2]
    )
    expected = "not finite" if alpha == "1e300" else "--alpha must be a finite number >= 0"
    assert expected in message and "--alpha" in message.split(";", 1)[1], message
    assert tree_hashes(tmp_path) == before


def test_a_direction_fitted_on_another_checkpoint_is_warned_and_the_job_goes_on(
    tiny_dirs: dict[str, Path], tmp_path: Path, smollm2_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lens_safety.testing import make_tiny_model

    sibling = make_tiny_model("llama", tmp_path / "sibling", smollm2_dir, seed=1)
    code, _, err = run_cli(
        [
            "directions",
            str(tiny_dirs["llama"]),
            "--layer",
            "1",
            "--position",
            "-1",
            "--n-val",
            "4",
            "--no-figures",
            "--out",
            str(tmp_path / "d"),
        ],
        capsys,
    )
    assert code == 0, err
    code, _, err = run_cli(
        [
            "rosi",
            str(sibling),
            "--direction",
            str(tmp_path / "d"),
            "--alpha",
            "2",
            "--n-test",
            "0",
            "--out",
            str(tmp_path / "out"),
        ],
        capsys,
    )
    assert code == 0, err
    warnings_seen = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings_seen) == 1, err
    assert f"extracted from {tiny_dirs['llama']}" in err and f"applied to {sibling}" in err, err
    assert "another checkpoint of the same architecture" in err
    assert (tmp_path / "out" / "model.safetensors").is_file()


# ------------------------------------------------------------------ outputs


def test_a_read_only_parent_is_one_clear_error_and_leaves_nothing(
    tiny_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """``--out`` inside a directory nobody may write. Root ignores permission bits, so as root the
    parent is a read-only tmpfs mounted in a private mount namespace of the job alone."""
    import subprocess
    import sys

    readonly = tmp_path / "readonly"
    readonly.mkdir()
    out = readonly / "out"
    job = [sys.executable, "-m", "lens_safety", "rosi", str(tiny_dirs["llama"]), "--layer", "1"]
    job += ["--alpha", "2", "--n-train", "8", "--n-val", "4", "--n-test", "0", "--out", str(out)]
    if os.geteuid() == 0:
        probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, check=False)
        if probe.returncode != 0:
            pytest.skip(
                "as root this needs a private mount namespace (unshare -m), which is not permitted here"
            )
        mount = f'mount -t tmpfs -o ro,size=1m tmpfs {readonly} && exec "$@"'
        argv, reason = ["unshare", "-m", "sh", "-c", mount, "sh", *job], "Read-only file system"
    else:
        readonly.chmod(0o555)
        argv, reason = job, "Permission denied"
    before = tree_hashes(tiny_dirs["llama"])
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
    finally:
        readonly.chmod(0o755)
    message = _one_error_line(done.returncode, done.stderr)
    assert f"writing {out} failed ({reason}); nothing was left at {out}" in message, message
    assert "check free disk space and permissions" in message
    assert sorted(p.name for p in readonly.iterdir()) == [] and tree_hashes(tiny_dirs["llama"]) == before
