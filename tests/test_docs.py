"""The documentation site builds with ``mkdocs build --strict`` and the README links resolve to its pages."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
sys.path.insert(0, str(DOCS / "_hooks"))

_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _relative_links(markdown: str) -> list[str]:
    return [t for t in _LINK.findall(markdown) if not re.match(r"^[a-z]+:", t) and not t.startswith("#")]


def _documentation_section(readme: str) -> str:
    assert "\n## Documentation\n" in readme, "README.md has no '## Documentation' section"
    return readme.split("\n## Documentation\n", 1)[1]


def test_readme_documentation_links_resolve_to_docs_pages() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = _relative_links(_documentation_section(readme))
    assert len(targets) >= 10, targets
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for target in targets:
        path = (ROOT / target.split("#", 1)[0]).resolve()
        assert path.is_file(), f"README links to missing {target}"
        assert path.is_relative_to(DOCS), f"README link {target} is not a docs page"
        assert str(path.relative_to(DOCS)) in nav, f"{target} is not in the mkdocs nav"
    for page in ("getting-started.md", "concepts/rosi.md", "how-to/exporting.md", "notebooks/index.md"):
        assert f"docs/{page}" in targets


def test_getting_started_repeats_the_readme_commands_verbatim() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    page = (DOCS / "getting-started.md").read_text(encoding="utf-8")
    commands = [line for line in readme.splitlines() if line.startswith("pip install torch")]
    assert len(commands) == 2
    for command in commands:
        assert command in page.splitlines()


def test_ci_runs_the_readme_test_command_in_a_fresh_venv_with_the_constraints() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    test_command = next(
        line for line in readme.splitlines() if line.startswith("pip install torch") and "pytest" in line
    )
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert test_command in ci
    assert any(line.startswith("python3 -m venv") for line in ci[: ci.index(test_command)])
    assert "-c constraints.txt" in test_command and (ROOT / "constraints.txt").is_file()


def test_every_nav_entry_exists() -> None:
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8").split("\nnav:\n", 1)[1]
    entries = re.findall(r":\s*(\S+\.(?:md|ipynb))\s*$|^\s*-\s*(\S+\.(?:md|ipynb))\s*$", nav, re.MULTILINE)
    paths = [a or b for a, b in entries]
    assert len(paths) > 20
    for path in paths:
        where = ROOT / path if path.startswith("notebooks/") and path.endswith(".ipynb") else DOCS / path
        assert where.is_file(), f"nav entry {path} does not exist"


def test_bench_sections_include_recorded_results_and_name_the_command_for_others(tmp_path: Path) -> None:
    from site_hooks import bench_sections

    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "alpha.py").write_text('"""Alpha: speed of a thing."""\n')
    (tmp_path / "bench" / "beta.py").write_text("print(1)\n")
    (tmp_path / "bench" / "record.py").write_text("")
    (tmp_path / "bench" / "results" / "alpha.txt").write_text("ratio 1.1\n")
    text = bench_sections(tmp_path)
    assert '--8<-- "bench/results/alpha.txt"' in text
    assert "Alpha: speed of a thing." in text
    assert "python bench/record.py beta" in text and "bench/results/beta.txt" not in text
    assert "## `record`" not in text and text.index("## `alpha`") < text.index("## `beta`")


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="mkdocs is not installed (dev extra)")
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    site = tmp_path / "site"
    # no -q: quiet mode raises the log level above WARNING, so --strict would count no warning
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for page in (
        "index.html",
        "getting-started/index.html",
        "concepts/rosi/index.html",
        "benchmarks/index.html",
    ):
        assert (site / page).is_file(), page
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        assert (site / "notebooks" / notebook.stem / "index.html").is_file(), notebook.name
    assert (site / "api" / "export" / "index.html").read_text(encoding="utf-8").count("export_edit") > 0
