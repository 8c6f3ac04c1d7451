"""Build ``notebooks/*.ipynb`` from the percent-format sources in ``notebooks/source/*.py``.

Run: ``python notebooks/build.py`` (write) or ``python notebooks/build.py --check`` (exit 1 when a
notebook is missing or differs from its source). Edit the sources, never the notebooks.

Source format (the "percent" format that Jupytext, VS Code and Spyder understand):

* ``# %% [markdown]`` starts a markdown cell; its lines lose their leading ``# `` (or ``#``);
* ``# %%`` starts a code cell; ``# %% tags=["solution", "hide-input"]`` gives it tags (a JSON list);
* lines before the first marker (e.g. a ``# ruff: noqa`` header) are dropped.

Cells tagged ``solution`` are also collapsed in Jupyter (``metadata.jupyter.source_hidden``); the
docs site hides the input of cells tagged ``hide-input``. Notebooks are written without outputs,
with kernel ``python3`` and deterministic cell ids, so rebuilding is byte-for-byte reproducible.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import nbformat

NOTEBOOK_DIR = Path(__file__).resolve().parent
SOURCE_DIR = NOTEBOOK_DIR / "source"
_MARKER = re.compile(r"^# %%(?P<markdown> \[markdown\])?(?: tags=(?P<tags>\[.*\]))?\s*$")


def _trim(lines: list[str]) -> str:
    while lines and not lines[0].strip():
        lines.pop(0)
    while lines and not lines[-1].strip():
        lines.pop()
    return "\n".join(lines)


def _markdown_line(line: str) -> str:
    if line.startswith("# "):
        return line[2:]
    return line[1:] if line.startswith("#") else line


def parse_cells(text: str) -> list[nbformat.NotebookNode]:
    """Split a percent-format source into notebook cells (see the module docstring)."""
    cells: list[nbformat.NotebookNode] = []
    kind: str | None = None
    tags: list[str] = []
    body: list[str] = []

    def flush() -> None:
        if kind is None:
            return
        source = _trim(body)
        if kind == "markdown":
            cell = nbformat.v4.new_markdown_cell(source)
        else:
            cell = nbformat.v4.new_code_cell(source)
        if tags:
            cell.metadata["tags"] = list(tags)
        if "solution" in tags:
            cell.metadata["jupyter"] = {"source_hidden": True}
        cell["id"] = f"cell-{len(cells):03d}"
        cells.append(cell)

    for line in text.splitlines():
        match = _MARKER.match(line)
        if match:
            flush()
            kind = "markdown" if match.group("markdown") else "code"
            tags = json.loads(match.group("tags")) if match.group("tags") else []
            body = []
        elif kind is not None:
            body.append(_markdown_line(line) if kind == "markdown" else line)
    flush()
    return cells


def build_notebook(source: Path) -> str:
    """The notebook JSON text for one source file."""
    notebook = nbformat.v4.new_notebook()
    notebook.cells = parse_cells(source.read_text(encoding="utf-8"))
    notebook.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    nbformat.validate(notebook)
    return nbformat.writes(notebook) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the notebooks are up to date")
    args = parser.parse_args(argv)
    stale = []
    for source in sorted(SOURCE_DIR.glob("*.py")):
        target = NOTEBOOK_DIR / f"{source.stem}.ipynb"
        text = build_notebook(source)
        if args.check:
            if not target.is_file() or target.read_text(encoding="utf-8") != text:
                stale.append(target.name)
        else:
            target.write_text(text, encoding="utf-8")
            print(f"wrote notebooks/{target.name}")
    if stale:
        print(f"out of date: {', '.join(stale)}; run python notebooks/build.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
