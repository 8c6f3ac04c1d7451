"""MkDocs hooks for the lens-safety site (loaded through ``hooks:`` in ``mkdocs.yml``).

* ``notebooks/*.ipynb`` (outside ``docs/``) are added to the site under ``notebooks/`` before
  mkdocs-jupyter converts them (they are rendered as committed: no outputs, never executed here).
* ``pymdownx.snippets`` resolves paths from the repository root, whatever the working directory.
* The benchmarks page's ``<!-- bench-results -->`` marker becomes one section per ``bench/*.py``
  script: its recorded ``bench/results/<name>.txt`` (included with a snippet) when it exists, else
  the command that records it. The page therefore builds before any benchmark has been run.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

BENCH_MARKER = "<!-- bench-results -->"


def _root(config: Any) -> Path:
    return Path(config["config_file_path"]).resolve().parent


def on_config(config: Any) -> Any:
    snippets = config["mdx_configs"].setdefault("pymdownx.snippets", {})
    snippets["base_path"] = [str(_root(config))]
    return config


@event_priority(100)  # before mkdocs-jupyter's on_files, which converts the notebooks
def on_files(files: Files, config: Any) -> Files:
    root = _root(config)
    for notebook in sorted((root / "notebooks").glob("*.ipynb")):
        files.append(
            File(
                f"notebooks/{notebook.name}",
                str(root),
                config["site_dir"],
                config["use_directory_urls"],
            )
        )
    return files


def _summary(script: Path) -> str:
    """First line of the script's module docstring (empty if none)."""
    try:
        doc = ast.get_docstring(ast.parse(script.read_text(encoding="utf-8"))) or ""
    except SyntaxError:
        return ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def bench_sections(root: Path) -> str:
    """Markdown for every ``bench/*.py`` script except the recorder itself."""
    blocks: list[str] = []
    for script in sorted((root / "bench").glob("*.py")):
        if script.name == "record.py":
            continue
        name = script.stem
        result = root / "bench" / "results" / f"{name}.txt"
        blocks.append(f"## `{name}`\n")
        summary = _summary(script)
        if summary:
            blocks.append(f"{summary}\n")
        if result.is_file():
            blocks.append(f"Recorded output (`bench/results/{name}.txt`):\n")
            blocks.append(f'```text\n--8<-- "bench/results/{name}.txt"\n```\n')
        else:
            blocks.append(
                f"Not recorded yet. Record it with:\n\n```bash\npython bench/record.py {name}\n```\n"
            )
    if not blocks:
        return "No benchmark scripts yet.\n"
    return "\n".join(blocks)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    if BENCH_MARKER in markdown:
        return markdown.replace(BENCH_MARKER, bench_sections(_root(config)))
    return markdown
