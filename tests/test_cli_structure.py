"""The command line's shape: each command module stands on the shared modules only, stays small,
and parses option values through the one set of helpers in ``cli/common.py``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import lens_safety.cli
from lens_safety.cli import COMMAND_MODULES
from lens_safety.cli.common import parse_auto_int, parse_layer, parse_list
from lens_safety.errors import LensSafetyError

CLI = Path(lens_safety.cli.__file__).parent
#: what a command module may take from the CLI package itself: the app, its groups, the options
PACKAGE_NAMES = {"app", "judge_app", "organism_app", "srr_app", "options"}
SHARED = {"lens_safety.cli.common", "lens_safety.cli.options"}


def _cli_imports(path: Path) -> list[tuple[str, list[str]]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lens_safety.cli"):
            found.append((node.module or "", [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((a.name, []) for a in node.names if a.name.startswith("lens_safety.cli"))
    return found


def test_every_command_module_is_registered_and_imports_only_the_shared_modules() -> None:
    modules = {p.stem for p in CLI.glob("*.py")} - {"__init__", "common", "options"}
    assert modules == set(COMMAND_MODULES)
    wrong = []
    for name in sorted(modules | {"common", "options"}):
        for module, names in _cli_imports(CLI / f"{name}.py"):
            if module == "lens_safety.cli" and set(names) <= PACKAGE_NAMES:
                continue
            if module in SHARED and module != f"lens_safety.cli.{name}":
                continue
            wrong.append(f"cli/{name}.py imports {module} {names}")
    assert wrong == [], "\n".join(wrong)


def test_package_files_and_functions_stay_small() -> None:
    """No module of the package over 400 lines, no function over 80 (decorators included)."""
    too_long = []
    for path in sorted(CLI.parent.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        if len(source.splitlines()) > 400:
            too_long.append(f"{path.relative_to(CLI.parent)}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                length = (node.end_lineno or node.lineno) - start + 1
                if length > 80:
                    too_long.append(f"{path.relative_to(CLI.parent)}:{node.name}: {length} lines")
    assert too_long == [], "\n".join(too_long)


def test_the_shared_parsers_accept_their_forms_and_name_the_option_when_they_refuse() -> None:
    assert parse_auto_int("auto", "--position") == "auto"
    assert parse_auto_int("-2", "--position") == -2
    assert parse_layer("12") == 12
    assert parse_list("0, 6,12", "--layers", int, "0,6,12") == [0, 6, 12]
    assert parse_list("0.9,0.95", "--bars", float, "0.9,0.95,0.9") == [0.9, 0.95]
    with pytest.raises(LensSafetyError, match=r"--position must be 'auto' or an integer, got 'x'"):
        parse_auto_int("x", "--position")
    with pytest.raises(LensSafetyError, match=r"cannot parse --widths 'wide'.*comma-separated ints"):
        parse_list("wide", "--widths", int, "64,256")
    with pytest.raises(LensSafetyError, match=r"cannot parse --bars '0.9,high'.*comma-separated floats"):
        parse_list("0.9,high", "--bars", float, "0.9,0.95,0.9")


def test_every_typer_option_is_declared_once() -> None:
    """An option with the same type, flag and help is one alias (shared ones in ``cli/options.py``),
    not a copy per module or per command."""
    places: dict[str, list[str]] = {}
    for path in sorted(CLI.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Subscript) and getattr(node.value, "id", None) == "Annotated":
                places.setdefault(ast.dump(node), []).append(f"{path.name}:{node.lineno}")
    assert len(places) > 100  # the walk sees the declarations
    copies = [", ".join(where) for where in places.values() if len(where) > 1]
    assert copies == [], "\n".join(copies)
