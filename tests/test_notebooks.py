"""Every notebook in ``notebooks/`` executes top to bottom without an error (nbclient, kernel python3).

The notebooks are generated from ``notebooks/source/*.py`` by ``notebooks/build.py``; a test checks
that each committed notebook matches its source and carries no outputs. Set
``LENS_SAFETY_NOTEBOOK_OUT=DIR`` to keep the executed copies (with outputs) for inspection.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 600
#: notebooks that load the refusal organism (``smollm2-refusal``), which needs the shipped adapter
NEEDS_ORGANISM = {"03_rosi_end_to_end", "04_srr"}


def _organism_installed() -> bool:
    from lens_safety.organism.adapter import shipped_adapter_dir
    from lens_safety.organism.build import ADAPTER_FILE

    return (shipped_adapter_dir() / ADAPTER_FILE).is_file()


def test_organism_notebooks_are_the_ones_loading_the_organism() -> None:
    loading = {p.stem for p in NOTEBOOKS if "smollm2-refusal" in p.read_text(encoding="utf-8")}
    assert loading == NEEDS_ORGANISM


def test_notebooks_exist_and_match_their_sources() -> None:
    sources = sorted(p.stem for p in (NOTEBOOK_DIR / "source").glob("*.py"))
    assert sources, "no notebook sources in notebooks/source"
    assert [p.stem for p in NOTEBOOKS] == sources
    result = subprocess.run(
        [sys.executable, str(NOTEBOOK_DIR / "build.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_has_no_outputs_and_a_question_per_section(path: Path) -> None:
    notebook = json.loads(path.read_text(encoding="utf-8"))
    code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code)
    markdown = ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "markdown"]
    sections = [m for m in markdown if m.lstrip().startswith("## ")]
    questions = sum(m.count("**Question for the reader") for m in markdown)
    assert sections, f"{path.name} has no sections"
    assert questions >= len(sections), f"{path.name}: {len(sections)} sections, {questions} questions"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path: Path, tmp_path: Path) -> None:
    if path.stem in NEEDS_ORGANISM and not _organism_installed():
        pytest.skip(
            "the refusal organism adapter is not installed in this checkout (lens-safety organism train)"
        )
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(tmp_path)}},  # the notebook's working directory
    )
    start, cpu_start = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    client.execute()  # raises CellExecutionError on the first failing cell
    elapsed = time.perf_counter() - start
    cpu_end = resource.getrusage(resource.RUSAGE_CHILDREN)  # the kernel is a reaped child process
    cpu = (cpu_end.ru_utime + cpu_end.ru_stime) - (cpu_start.ru_utime + cpu_start.ru_stime)
    keep = os.environ.get("LENS_SAFETY_NOTEBOOK_OUT")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        nbformat.write(notebook, Path(keep) / path.name)
    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]
    assert not errors
    print(f"{path.name}: {elapsed:.0f} s wall, {cpu:.0f} s kernel CPU")
