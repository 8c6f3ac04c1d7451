"""Benchmark: CPU time of ``lens-safety --help`` and of every ``COMMAND --help``.

The baseline is ``python -c "import typer"`` measured in the same run: each command runs in its own
subprocess, ``--repeats`` times interleaved with the baseline, and the median user + system CPU
seconds of the child are compared. Heavy libraries (torch, transformers) must not be imported for a
help screen; the target is under 1 s of CPU for every help, printed with the ratio to the baseline
and whether torch was imported (checked with ``-X importtime``).

    python bench/cli_startup.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

TARGET_CPU_S = 1.0


def _cpu_seconds(argv: list[str]) -> float:
    """User + system CPU seconds of one child process running ``argv``."""
    before = os.times()
    subprocess.run(argv, check=True, capture_output=True, text=True)
    after = os.times()
    return (after.children_user - before.children_user) + (after.children_system - before.children_system)


def _imports_torch(argv_tail: list[str]) -> bool:
    code = "import sys; from lens_safety.cli import main; sys.argv=['lens-safety', *sys.argv[1:]]; main()"
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code, *argv_tail],
        capture_output=True,
        text=True,
        check=False,
    )
    return any(line.rstrip().endswith("| torch") for line in done.stderr.splitlines())


def _commands() -> list[list[str]]:
    from lens_safety.cli import _register, app

    _register()
    import typer.main

    group = typer.main.get_command(app)
    out: list[list[str]] = [[]]
    for name, command in sorted(group.commands.items()):  # type: ignore[attr-defined]
        sub = getattr(command, "commands", None)
        out.extend([[name, child] for child in sorted(sub)] if sub else [[name]])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cli = [sys.executable, "-m", "lens_safety"]
    baseline_argv = [sys.executable, "-c", "import typer"]
    rows = []
    for tail in _commands():
        times, base = [], []
        for _ in range(args.repeats):
            base.append(_cpu_seconds(baseline_argv))
            times.append(_cpu_seconds([*cli, *tail, "--help"]))
        rows.append(
            (
                " ".join(["lens-safety", *tail, "--help"]),
                statistics.median(times),
                statistics.median(base),
                tail,
            )
        )
    print(f"{'command':<44} {'cpu s':>7} {'typer s':>8} {'ratio':>6}  torch  <{TARGET_CPU_S:g} s")
    worst = 0.0
    for name, cpu, base, tail in rows:
        worst = max(worst, cpu)
        torch_loaded = "yes" if _imports_torch([*tail, "--help"]) else "no"
        ok = "ok" if cpu < TARGET_CPU_S else "MISS"
        print(f"{name:<44} {cpu:7.3f} {base:8.3f} {cpu / base:6.1f}  {torch_loaded:>5}  {ok}")
    print(f"slowest help: {worst:.3f} s CPU (target < {TARGET_CPU_S:g} s); repeats {args.repeats}, medians")


if __name__ == "__main__":
    main()
