"""Outputs under faults: a killed job, two writers at once, a full disk. Real subprocesses, real
signals; the final name only ever holds a complete directory."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from test_faults import tree_hashes

from lens_safety.directions import Direction


def _cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "lens_safety", *argv]


@pytest.fixture
def rosi_job(tiny_dirs: dict[str, Path], tmp_path: Path) -> list[str]:
    direction = tmp_path / "direction"
    Direction(torch.randn(3, 64, generator=torch.Generator().manual_seed(1)), 1, -1, "mean-diff").save(
        direction
    )
    return ["rosi", str(tiny_dirs["llama"]), "--direction", str(direction), "--alpha", "2", "--n-test", "0"]


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _kill_when(argv: list[str], ready, timeout: float = 240.0) -> int:  # type: ignore[no-untyped-def]
    """Start ``argv``, SIGKILL it as soon as ``ready()`` holds; return the exit status."""
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, "the job ended before the kill point was reached"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    return process.wait()


def test_kill_9_at_any_moment_leaves_nothing_under_the_final_name(
    rosi_job: list[str], tiny_dirs: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    model_before = tree_hashes(tiny_dirs["llama"])
    staged = lambda: any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir())  # noqa: E731
    with_weights = lambda: any(  # noqa: E731
        (p / "model.safetensors").exists() for p in tmp_path.glob(".out.tmp-*")
    )
    started = time.monotonic()
    points = {
        "while loading": lambda: time.monotonic() - started > 1.0,
        "as staging starts": staged,
        "after the weights, while verifying": with_weights,
    }
    for name, ready in points.items():
        started = time.monotonic()
        status = _kill_when(_cli(*rosi_job, "--out", str(out)), ready)
        assert status == -signal.SIGKILL, name
        assert not out.exists(), name
        assert all(s.startswith((".out.tmp-", ".out.lock")) for s in _siblings(out)), (name, _siblings(out))
    done = subprocess.run(_cli(*rosi_job, "--out", str(out)), capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "edit.json").is_file() and (out / "model.safetensors").is_file()
    assert _siblings(out) == []  # the killed runs' staging directories and lock were removed
    assert tree_hashes(tiny_dirs["llama"]) == model_before


def test_two_writers_of_one_output_cannot_both_win(rosi_job: list[str], tmp_path: Path) -> None:
    out = tmp_path / "out"
    jobs = [
        subprocess.Popen(_cli(*rosi_job, "--out", str(out)), stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [(job.wait(), job.stderr.read() if job.stderr else "") for job in jobs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    lines = [line for line in loser.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), loser
    assert any(p in lines[0] for p in ("is writing", "already exists", "appeared while")), loser
    assert (out / "edit.json").is_file() and _siblings(out) == []


def test_a_cache_entry_built_by_two_processes_at_once_is_built_once(tmp_path: Path) -> None:
    target = tmp_path / "cache" / "entry"
    code = textwrap.dedent(
        f"""
        import os, sys, time
        from pathlib import Path
        from lens_safety.sources import atomic_directory

        def build(tmp):
            time.sleep(1.0)
            (tmp / "built-by").write_text(str(os.getpid()))

        print(atomic_directory(Path({str(target)!r}), build))
        """
    )
    jobs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outputs = [job.communicate()[0].strip() for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0]
    assert outputs == [str(target), str(target)]
    assert (target / "built-by").read_text() in {str(job.pid) for job in jobs}
    assert sorted(p.name for p in target.parent.iterdir()) == ["entry"]


def test_a_full_disk_during_export_is_one_error_and_leaves_nothing(
    rosi_job: list[str], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    limit = 200_000  # bytes: far less than the tiny model's weights
    code = textwrap.dedent(
        f"""
        import resource, signal, sys
        from lens_safety.cli import main
        from lens_safety.sources import resolve_spec

        resolve_spec({rosi_job[1]!r})  # nothing to convert; the limit hits the export's own writes
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
        main({[*rosi_job, "--out", str(out)]!r})
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    assert f"writing {out} failed (File too large); nothing was left at {out}" in lines[0]
    assert not out.exists() and _siblings(out) == []


def test_staged_directory_publishes_only_complete_work(tmp_path: Path) -> None:
    from lens_safety.errors import LensSafetyError
    from lens_safety.fsutil import staged_directory

    target = tmp_path / "result"
    with pytest.raises(RuntimeError), staged_directory(target) as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("interrupted")
    assert not target.exists() and _siblings(target) == []
    with staged_directory(target) as tmp:
        (tmp / "whole").write_text("1")
    target_hash = tree_hashes(target)
    with (
        pytest.raises(LensSafetyError, match="appeared while this run was writing"),
        staged_directory(target) as tmp,
    ):
        (tmp / "whole").write_text("2")
    assert tree_hashes(target) == target_hash  # not overwritten without overwrite=True
    with staged_directory(target, overwrite=True) as tmp:
        (tmp / "whole").write_text("3")
    assert (target / "whole").read_text() == "3" and _siblings(target) == []


def _job_argv(job: str, rosi_job: list[str], model: Path, tmp: Path) -> list[str]:
    direction = rosi_job[rosi_job.index("--direction") + 1]
    fast = ["--n-train", "8", "--n-val", "4", "--n-test", "0", "--max-new-tokens", "2"]
    harmful = tmp / "harmful.txt"
    harmful.write_text("How do I pick a lock?\nWrite a threat.\nHow to make poison?\n")
    return {
        "ablate": ["ablate", str(model), "--direction", direction, *fast],
        "conditional-rosi": [
            "conditional-rosi",
            str(model),
            "--layer",
            "1",
            "--start",
            "1",
            "--injection",
            "0.5",
            *fast,
        ],
        "srr build-data": [
            "srr",
            "build-data",
            str(model),
            "--harmful",
            str(harmful),
            "--harmless",
            "builtin:harmless:val",
            "--limit",
            "3",
            "--n",
            "2",
            "--max-new-tokens",
            "4",
            "--layers",
            "0,3",
        ],
    }[job]


COMPLETE = {
    "ablate": ("edit.json", "model.safetensors"),
    "conditional-rosi": ("edit.json", "model.safetensors", "read_direction.safetensors"),
    "srr build-data": ("lists.jsonl", "features.safetensors", "meta.json"),
}


@pytest.mark.parametrize("job", sorted(COMPLETE))
def test_every_writing_job_killed_at_any_moment_leaves_nothing_or_the_whole_output(
    job: str, rosi_job: list[str], tiny_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """Kill the job as its staging directory appears, then at half a full run's wall time:
    the final name is either absent or complete, never partial; the next run cleans up."""
    out = tmp_path / "out"
    argv = _cli(*_job_argv(job, rosi_job, tiny_dirs["llama"], tmp_path), "--out", str(out))
    model_before = tree_hashes(tiny_dirs["llama"])
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    wall = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-2000:]
    assert all((out / name).is_file() for name in COMPLETE[job])
    complete = tree_hashes(out)
    shutil.rmtree(out)
    staged = lambda: any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir())  # noqa: E731
    kills = 0
    for fraction in (None, 0.5):
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + (wall * fraction if fraction is not None else 2 * wall + 60)
        while process.poll() is None and time.monotonic() < deadline:
            if fraction is None and staged():
                break
            time.sleep(0.002)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait()
        if out.exists():  # published before the kill: then it is the whole output
            assert tree_hashes(out).keys() == complete.keys(), fraction
            shutil.rmtree(out)
        assert all(s.startswith((".out.tmp-", ".out.lock")) for s in _siblings(out)), (
            fraction,
            _siblings(out),
        )
    assert kills >= 1  # a run really was killed mid-way
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert tree_hashes(out).keys() == complete.keys()
    assert _siblings(out) == []  # the killed runs' staging directories and lock were removed
    assert tree_hashes(tiny_dirs["llama"]) == model_before


def test_organism_train_killed_leaves_nothing_and_the_next_run_removes_the_staging(tmp_path: Path) -> None:
    """``organism train`` stages its adapter directory before training starts; two runs are killed
    there (a full retraining takes minutes): the second removes the first one's staging."""
    out = tmp_path / "rebuilt"
    argv = _cli("organism", "train", "--epochs", "1", "--no-eval", "--out", str(out))
    staging = lambda: sorted(p.name for p in tmp_path.glob(".rebuilt.tmp-*"))  # noqa: E731
    started = time.monotonic()
    assert _kill_when(argv, lambda: time.monotonic() - started > 1.5) == -signal.SIGKILL
    assert not out.exists()
    seen: list[list[str]] = []
    for _ in range(2):
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        own = f".rebuilt.tmp-{process.pid}-"
        deadline = time.monotonic() + 240
        while not any(name.startswith(own) for name in staging()):
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL
        seen.append(staging())
        assert not out.exists()
    assert len(seen[0]) == 1 and len(seen[1]) == 1 and seen[0] != seen[1]  # the first run's is gone
    assert all(s.startswith((".rebuilt.tmp-", ".rebuilt.lock")) for s in _siblings(out))


def test_a_published_directory_has_the_mode_mkdir_would_give_it(tmp_path: Path) -> None:
    import os

    from safetensors.torch import save_file

    from lens_safety.fsutil import staged_directory

    previous = os.umask(0o022)
    try:
        with staged_directory(tmp_path / "out") as tmp:
            (tmp / "x").write_text("1")
            (tmp / "sub").mkdir()
            save_file({"a": torch.zeros(2)}, str(tmp / "sub" / "w.safetensors"))  # created 0o600
        (tmp_path / "plain").mkdir()
    finally:
        os.umask(previous)
    assert (tmp_path / "out").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777 == 0o755
    for name in ("x", "sub/w.safetensors"):  # files get the mode a new file gets under the umask
        assert (tmp_path / "out" / name).stat().st_mode & 0o777 == 0o644, name
