"""First run: the README's main job, ``lens-safety organism demo --quick``, timed end to end.

    python bench/first_run.py [--threads N] [--layer 25]

Prints the machine (CPU cores, load average before and after: other work on the machine slows
the run), the wall-clock seconds and the CPU seconds (user + system) of the whole command, then
its own output: the before -> after table of the organism, its abliterated child and the two
repairs, and where the verified exports went (``DIR``: a temporary directory here, removed
afterwards).
The README's budget is 10 minutes of wall-clock time on a fresh 2-core machine.

``--threads N`` sets ``OMP_NUM_THREADS`` (torch's threads). On a machine other jobs load, one
thread keeps the CPU seconds free of the time idle threads spend spinning at synchronisation
points, so they measure the work; a one-thread run's CPU seconds bound the wall time of the same
work on an idle machine from above (more threads only make it faster there).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMAND = ["organism", "demo", "--quick"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the command")
    parser.add_argument("--layer", default=None, help="pass --layer to the command (skips selection)")
    args = parser.parse_args()
    env = dict(os.environ)
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = str(args.threads)
    command = COMMAND + ([] if args.layer is None else ["--layer", str(args.layer)])
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as root:
        out = Path(root) / "safer-organism"
        argv = [sys.executable, "-m", "lens_safety", *command, "--out", str(out)]
        started = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
        wall = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_after = os.getloadavg()
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-3000:])
        return done.returncode
    print(f"command: lens-safety {' '.join(command)} --out DIR")
    print(f"OMP_NUM_THREADS={env.get('OMP_NUM_THREADS', 'unset')}")
    print(
        f"cpu cores: {os.cpu_count()}; load average (1, 5, 15 min) before {load_before}, after {load_after}"
    )
    print(f"wall {wall:.0f} s, cpu (user + system) {usage.ru_utime + usage.ru_stime:.0f} s")
    print()
    print(done.stdout.rstrip().replace(str(out), "DIR"))  # the temporary directory, by its role
    return 0


if __name__ == "__main__":
    sys.exit(main())
