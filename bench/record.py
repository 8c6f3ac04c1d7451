"""Record every benchmark: run each ``bench/<name>.py`` and write its stdout to ``bench/results/<name>.txt``.

Run: ``python bench/record.py [NAME ...]`` (default: every script in ``bench/`` except this one).
Each script runs in its own process with the current interpreter; a script that fails leaves its
previous result untouched (the new output is written to a temporary file and moved into place
only on success) and makes this command exit with status 1 after the others have run. The docs'
benchmarks page includes whatever is in ``bench/results/``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"


def bench_scripts() -> dict[str, Path]:
    """Benchmark scripts by name (file stem), this recorder excluded."""
    return {p.stem: p for p in sorted(BENCH_DIR.glob("*.py")) if p.name != Path(__file__).name}


def record(script: Path, results_dir: Path = RESULTS_DIR) -> bool:
    """Run one script; on success write its stdout to ``results_dir/<name>.txt``. Returns success."""
    results_dir.mkdir(parents=True, exist_ok=True)
    completed = subprocess.run(
        [sys.executable, str(script)],
        cwd=BENCH_DIR.parent,
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        sys.stderr.write(f"error: bench/{script.name} exited with {completed.returncode}\n")
        sys.stderr.write(completed.stderr[-2000:])
        return False
    handle, temporary = tempfile.mkstemp(prefix=f".{script.stem}-", suffix=".txt", dir=results_dir)
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        out.write(completed.stdout)
    Path(temporary).replace(results_dir / f"{script.stem}.txt")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="benchmark names (file stems); default: all")
    args = parser.parse_args(argv)
    scripts = bench_scripts()
    unknown = [n for n in args.names if n not in scripts]
    if unknown:
        sys.stderr.write(
            f"error: no benchmark named {', '.join(unknown)}; choose from {', '.join(scripts)}\n"
        )
        return 2
    failed = []
    for name in args.names or list(scripts):
        print(f"recording bench/{name}.py -> bench/results/{name}.txt", flush=True)
        if not record(scripts[name]):
            failed.append(name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
