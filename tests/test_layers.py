"""The package is read top-down: every module belongs to one layer and imports only from its own
layer or the layers below it (checked on the source, with ``ast``; imports under
``if TYPE_CHECKING:`` are annotations only and do not count).

Library modules import lens-safety modules at the top of the file: an import hidden inside a function
is how a cycle hides, so it is refused (the CLI is exempt: it defers every heavy import to the
command that needs it, so that ``--help`` stays fast).
"""

from __future__ import annotations

import ast
from pathlib import Path

import lens_safety

PACKAGE = Path(lens_safety.__file__).parent

# (layer name, module prefixes), lowest first. A module's layer is that of its longest prefix.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "core",
        (
            "lens_safety.errors",
            "lens_safety.records",
            "lens_safety.lazy",
            "lens_safety.hashing",
            "lens_safety.fsutil",
            "lens_safety.progress",
            "lens_safety.checkpoint_files",
            "lens_safety.sources",
            "lens_safety.architecture",
            "lens_safety.placement",
            "lens_safety.bridge_cache",
            "lens_safety.residual_check",
            "lens_safety.models",
            "lens_safety.chat",
            "lens_safety.prompts",
            "lens_safety.external_prompts",
            "lens_safety.splits",
            "lens_safety.vectors",
        ),
    ),
    (
        "reads",
        (
            "lens_safety.forward_pass",
            "lens_safety.activations",
            "lens_safety.interventions",
            "lens_safety.evaluation.generation",
            "lens_safety.evaluation.vllm_engine",
            "lens_safety.selfcheck",
        ),
    ),
    ("measurement", ("lens_safety.evaluation",)),
    (
        "directions and edits",
        (
            "lens_safety.directions",
            "lens_safety.selection",
            "lens_safety.selection_rule",
            "lens_safety.probing",
            "lens_safety.edits",
            "lens_safety.export",
            "lens_safety.export_files",
            "lens_safety.model_card",
        ),
    ),
    ("calibration", ("lens_safety.calibration",)),
    ("viz", ("lens_safety.viz",)),
    (
        "jobs",
        (
            "lens_safety.pipelines",
            "lens_safety.organism",
            "lens_safety.srr",
            "lens_safety.serving",
            "lens_safety.testing",
            "lens_safety.arch_matrix",
        ),
    ),
    ("cli", ("lens_safety.cli", "lens_safety.__main__")),
]
FACADES = {"lens_safety"}  # the package root re-exports lazily from every layer


def layer_of(module: str) -> int:
    best, depth = -1, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > depth:
                best, depth = index, len(prefix)
    return best


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def internal_imports(path: Path) -> list[tuple[str, int, bool]]:
    """``(imported lens_safety module, line, inside a function)`` for every import in ``path``."""
    found: list[tuple[str, int, bool]] = []
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other, in_function)
                continue
            nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                if base.startswith("lens_safety"):
                    found.append((base, child.lineno, in_function))
            elif isinstance(child, ast.Import):
                found.extend(
                    (a.name, child.lineno, in_function)
                    for a in child.names
                    if a.name.startswith("lens_safety")
                )
            visit(child, nested)

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return found


def violations() -> tuple[list[str], list[str]]:
    upward, hidden = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        if module in FACADES:
            continue
        own = layer_of(module)
        assert own >= 0, f"{module} belongs to no layer: add it to LAYERS"
        for target, line, in_function in internal_imports(path):
            where = f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}"
            theirs = layer_of(target)
            if target not in FACADES and theirs > own:
                upward.append(f"{where} ({LAYERS[own][0]} -> {LAYERS[theirs][0]})")
            if in_function and LAYERS[own][0] != "cli" and target != "lens_safety.lazy":
                hidden.append(where)
    return upward, hidden


def test_no_module_imports_a_layer_above_its_own() -> None:
    upward, _ = violations()
    assert upward == [], "\n".join(upward)


def test_library_modules_import_lens_safety_at_the_top_only() -> None:
    _, hidden = violations()
    assert hidden == [], "\n".join(hidden)


def test_the_layer_check_sees_a_violation() -> None:
    """The checker itself: layers are ordered, and an import inside a function is found (the CLI
    has them by design; the same import in a library module would be reported)."""
    assert layer_of("lens_safety.evaluation.generation") < layer_of("lens_safety.evaluation.metrics")
    assert layer_of("lens_safety.cli.edit") == len(LAYERS) - 1
    deferred = [t for t, _, inside in internal_imports(PACKAGE / "cli" / "edit.py") if inside]
    assert "lens_safety.pipelines" in deferred
    assert layer_of("lens_safety.pipelines") > layer_of("lens_safety.models")  # upward if models imported it
    assert all(not inside for _, _, inside in internal_imports(PACKAGE / "errors.py"))
