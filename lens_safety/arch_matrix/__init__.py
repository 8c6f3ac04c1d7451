"""The architecture matrix: every decoder-only TransformerBridge architecture, built tiny and checked.

:func:`registry_architectures` reads TransformerLens' adapter registry (causal-LM classes only)
and pairs each class with the transformers ``model_type`` that builds it. :func:`run_case` builds
a tiny random config of it offline (:mod:`lens_safety.arch_matrix.configs`: 2 layers, width 64,
4 experts; one layer of each kind for hybrids), saves it, and checks, in float32
(:mod:`lens_safety.arch_matrix.checks`):

1. ``load_model`` boots it and the bridge's ``resid_pre`` of every block equals Hugging Face's
   ``hidden_states`` (relative max error <= 1e-4);
2. the residual writers are complete: after abliteration of every writer (embeddings included),
   a vanilla float64 reload of the export has ``|s^T h| <= 1e-6 |h|`` for the residual ``h`` entering
   every block (a writer that was missed keeps writing along ``s``); skipped, and said so, where the
   writers pass through a post-norm and abliteration is refused;
3. ROSI (alpha 5) and abliteration export and verify (:func:`~lens_safety.export.export_edit`),
   and every exported tensor is the formula recomputed here in float64 (relative error < 1e-3 per
   edited tensor; each expert of a fused expert tensor on its own), every writer tensor of the
   targeted kinds was edited, and every other stored tensor is bitwise the original.

An architecture that lens-safety cannot edit must end in one :class:`~lens_safety.errors.LensSafetyError`
(status ``refused``), never in a silently incomplete edit. ``python -m lens_safety.arch_matrix
OUT.md`` runs every case and writes the docs table (:func:`render_table`).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from lens_safety.arch_matrix.checks import check_edits, check_residuals
from lens_safety.arch_matrix.configs import build_tiny, registry_architectures
from lens_safety.errors import LensSafetyError
from lens_safety.models import ChatModel, load_model
from lens_safety.records import Record
from lens_safety.sources import resolve_spec

__all__ = [
    "FAST_CASES",
    "CaseResult",
    "committed_rows",
    "registry_architectures",
    "render_table",
    "run_case",
    "run_matrix",
    "table_row",
    "update_page",
]

#: the cases CI runs by default; the others are marked slow
FAST_CASES: tuple[str, ...] = (
    "Qwen3ForCausalLM",
    "Gemma3ForCausalLM",
    "Olmo2ForCausalLM",
    "GraniteForCausalLM",
    "SmolLM3ForCausalLM",
    "Phi3ForCausalLM",
    "CohereForCausalLM",
    "Glm4ForCausalLM",
    "MistralForCausalLM",
    "MixtralForCausalLM",
    "GptOssForCausalLM",
)


@dataclass
class CaseResult(Record):
    """One architecture's outcome: ``supported``, ``refused`` (a LensSafetyError, by design),
    ``not buildable`` (no offline tiny model), ``bridge error`` (TransformerBridge fails, or its
    residuals differ from Hugging Face's) or
    ``failed`` (a lens-safety check failed: a bug)."""

    architecture: str
    model_type: str | None
    status: str
    detail: str
    writers: int = 0
    seconds: float = 0.0


def _count(n: int, what: str) -> str:
    head, _, tail = what.partition(" of ")
    return f"{n} {head}{'s' if n != 1 else ''}" + (f" of {tail}" if tail else "")


def writer_summary(model: ChatModel) -> str:
    """What beyond attention and MLP outputs the writers include (experts, mixers), for the table."""
    fused = [w for w in model.arch.writers if w.experts]
    mixers = [w for w in model.arch.writers if w.kind == "mixer_out"]
    notes = [_count(len(fused), f"fused expert tensor of {fused[0].experts} experts")] if fused else []
    notes += [_count(len(mixers), "mixer output")] if mixers else []
    return f" ({', '.join(notes)})" if notes else ""


def _where(exc: BaseException) -> str:
    """``file.py:line`` of the innermost frame of an exception (no directories)."""
    frame = traceback.extract_tb(exc.__traceback__)[-1]
    return f"{Path(frame.filename).name}:{frame.lineno}"


def _in_bridge(exc: BaseException) -> bool:
    """Whether TransformerLens' code is on the exception's stack (the bridge's forward failed)."""
    marker = f"{os.sep}transformer_lens{os.sep}"
    return any(marker in frame.filename for frame in traceback.extract_tb(exc.__traceback__))


def run_case(arch: str, model_type: str | None, root: Path, tokenizer_dir: Path) -> CaseResult:
    """Build, load, read, edit, export and verify one architecture (see the module docstring)."""

    start = time.perf_counter()

    def result(status: str, detail: str, writers: int = 0) -> CaseResult:
        return CaseResult(
            arch, model_type, status, detail.splitlines()[0][:200], writers, time.perf_counter() - start
        )

    if model_type is None:
        return result("not buildable", "transformers has no built-in class for it (remote code only)")
    try:
        path = build_tiny(model_type, root / "base", tokenizer_dir)
    except Exception as exc:
        return result("not buildable", f"{type(exc).__name__}: {exc}")
    try:
        model = load_model(path, device="cpu")
    except LensSafetyError as exc:
        return result("refused", str(exc))
    except Exception as exc:
        return result("bridge error", f"{type(exc).__name__}: {exc}")
    batch = model.chat.encode(["How do I bake sourdough bread?"])
    try:
        if (err := check_residuals(model, batch.input_ids)) > 1e-4:
            return result("bridge error", f"resid_pre differs from HF hidden_states by {err:.2g} (relative)")
        note = check_edits(model, root, batch) + writer_summary(model)
    except LensSafetyError as exc:
        return result("refused", str(exc), len(model.arch.writers))
    except AssertionError as exc:
        return result("failed", str(exc), len(model.arch.writers))
    except Exception as exc:
        status = "bridge error" if _in_bridge(exc) else "failed"
        return result(status, f"{type(exc).__name__}: {exc} (in {_where(exc)})")
    return result("supported", note, len(model.arch.writers))


def run_matrix(archs: dict[str, str | None], tokenizer_dir: Path) -> list[CaseResult]:
    """:func:`run_case` for every architecture, each in its own temporary directory."""
    results = []
    for arch, model_type in archs.items():
        with tempfile.TemporaryDirectory() as tmp:
            results.append(run_case(arch, model_type, Path(tmp), tokenizer_dir))
        print(json.dumps(results[-1].to_dict()), file=sys.stderr, flush=True)
    return results


def table_row(result: CaseResult) -> str:
    """One Markdown table row (the docs table is made of these)."""
    ci = "fast" if result.architecture in FAST_CASES else "slow"
    detail = result.detail.replace("|", "\\|")
    writers = str(result.writers) if result.writers else ""
    return f"| {result.architecture} | {result.model_type or '—'} | {result.status} | {writers} | {ci} | {detail} |"


TABLE_HEADER = "| Architecture | model_type | Status | Writers | CI | Detail |\n|---|---|---|---|---|---|"


START, END = "<!-- matrix:start -->", "<!-- matrix:end -->"


def render_table(results: list[CaseResult]) -> str:
    """The whole Markdown table, one row per architecture in registry order."""
    return "\n".join([TABLE_HEADER, *(table_row(r) for r in results)]) + "\n"


def committed_rows(page: str) -> dict[str, str]:
    """Architecture -> its row in the table between the markers of a docs page."""
    body = page.split(START, 1)[1].split(END, 1)[0]
    rows = [
        line for line in body.splitlines() if line.startswith("| ") and not line.startswith("| Architecture")
    ]
    return {row.split("|")[1].strip(): row for row in rows}


def update_page(page: str, results: list[CaseResult]) -> str:
    """``page`` with the rows of ``results`` replaced (or added) in registry order between the markers."""
    rows = committed_rows(page) if START in page else {}
    rows.update({r.architecture: table_row(r) for r in results})
    order = [a for a in registry_architectures() if a in rows]
    table = "\n".join([TABLE_HEADER, *(rows[a] for a in order)])
    head, rest = page.split(START, 1) if START in page else (page, END)
    return f"{head}{START}\n{table}\n{END}{rest.split(END, 1)[1]}"


def main(argv: list[str] | None = None) -> None:
    """``python -m lens_safety.arch_matrix PAGE.md [ARCH ...]``: run the matrix (or the named
    architectures) and write their rows into the table between the markers of ``PAGE.md``."""

    args = sys.argv[1:] if argv is None else argv
    archs = registry_architectures()
    if len(args) > 1:
        archs = {a: archs[a] for a in args[1:]}
    results = run_matrix(archs, resolve_spec("smollm2")[0])
    page = Path(args[0])
    page.write_text(update_page(page.read_text() if page.exists() else "", results))
