"""The architecture matrix: every decoder-only TransformerBridge architecture, built tiny and checked.

:func:`registry_architectures` reads TransformerLens' adapter registry (causal-LM classes only)
and pairs each class with the transformers ``model_type`` that builds it. :func:`run_case` builds
a tiny random config of it offline (2 layers, width 64), saves it, and checks, in float32:

1. ``load_model`` boots it and the bridge's ``resid_pre`` of every block equals Hugging Face's
   ``hidden_states`` (relative max error <= 1e-4);
2. the residual writers are complete: after abliteration of every writer (embeddings included),
   a vanilla float64 reload of the export has ``|s^T h| <= 1e-6 |h|`` for the residual ``h`` entering
   every block (a writer that was missed keeps writing along ``s``); skipped, and said so, where the
   writers pass through a post-norm and abliteration is refused;
3. ROSI (alpha 5) and abliteration export and verify (:func:`~lens_safety.export.export_edit`),
   and every exported tensor is the formula recomputed here in float64 (relative error < 1e-3 per
   edited tensor), every other tensor bitwise the original.

An architecture that lens-safety cannot edit must end in one :class:`~lens_safety.errors.LensSafetyError`
(status ``refused``), never in a silently incomplete edit. ``python -m lens_safety.arch_matrix
OUT.md`` runs every case and writes the docs table (:func:`render_table`).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lens_safety.edits import orthogonalize, rosi
from lens_safety.edits.checkpoint import read_tensors
from lens_safety.errors import LensSafetyError
from lens_safety.export import export_edit
from lens_safety.models import load_model
from lens_safety.sources import resolve_spec

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
)
TINY: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
    "num_local_experts": 4,
    "num_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
}
MAX_TINY_PARAMETERS = 12_000_000  # untied embeddings of a 49k vocabulary at width 64 are ~6.3M
ALPHA = 5.0


@dataclass
class CaseResult:
    """One architecture's outcome: ``supported``, ``refused`` (a LensSafetyError, by design),
    ``not buildable`` (no offline tiny model), ``bridge error`` (TransformerBridge fails) or
    ``failed`` (a lens-safety check failed: a bug)."""

    architecture: str
    model_type: str | None
    status: str
    detail: str
    writers: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def registry_architectures() -> dict[str, str | None]:
    """TransformerBridge's causal-LM architecture classes -> the transformers ``model_type`` building them."""
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    by_class: dict[str, list[str]] = {}
    for model_type, classes in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        for name in classes if isinstance(classes, (list, tuple)) else [classes]:
            by_class.setdefault(name.lower(), []).append(model_type)
    out: dict[str, str | None] = {}
    for arch in SUPPORTED_ARCHITECTURES:
        if not (arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel")):
            continue
        types = by_class.get(arch.lower(), [])
        stem = arch.lower().removesuffix("forcausallm").removesuffix("lmheadmodel")
        out[arch] = next((t for t in types if t.replace("_", "") == stem.replace("_", "")), None) or (
            types[0] if types else None
        )
    return dict(sorted(out.items()))


def build_tiny(model_type: str, out_dir: Path, tokenizer_dir: Path) -> Path:
    """Save a tiny random ``model_type`` model (float32, random biases) with the given tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **TINY)
    with torch.device("meta"):
        size = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    if size > MAX_TINY_PARAMETERS:
        raise ValueError(f"the tiny config still has {size / 1e6:.0f}M parameters (keys not recognised)")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.02)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _vanilla(path: Path, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="eager").eval()


def check_residuals(model: Any, ids: torch.Tensor) -> float:
    """Largest relative error of the bridge's ``resid_pre`` against HF ``hidden_states``."""
    with torch.inference_mode():
        _, cache = model.bridge.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_resid_pre"))
        hidden = _vanilla(model.hf_path, torch.float32)(ids, output_hidden_states=True).hidden_states
    worst = 0.0
    for layer in range(model.n_layers):
        ours, theirs = cache[f"blocks.{layer}.hook_resid_pre"].float(), hidden[layer].float()
        worst = max(worst, float((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-12)))
    return worst


def expected_tensor(
    method: str, base: torch.Tensor, layout: str, is_bias: bool, s: torch.Tensor
) -> torch.Tensor:
    """The edit of one tensor, recomputed in float64 from the formulas (independently of the library)."""
    w = base.to(torch.float64)
    rows = layout in ("conv1d", "embedding")
    if method == "rosi":
        if is_bias:
            return w + ALPHA * s * w.mean()
        return w + ALPHA * (torch.outer(w.mean(1), s) if rows else torch.outer(s, w.mean(0)))
    if is_bias:
        return w - s * (s @ w)
    return w - (torch.outer(w @ s, s) if rows else torch.outer(s, s @ w))


def check_formula(model: Any, out: Path, method: str, s: torch.Tensor) -> float:
    """Largest relative error of an exported edited tensor; raises if an unedited tensor changed."""

    record = json.loads((out / "edit.json").read_text())
    edited = set(record["edited_parameters"])
    layouts = {
        f"{w.hf_name}.{part}": (w.layout, part == "bias")
        for w in model.arch.writers
        for part in ("weight", "bias")
    }
    base = _vanilla(model.hf_path, torch.float32).state_dict()
    new = _vanilla(out, torch.float32).state_dict()
    worst = 0.0
    for name, tensor in base.items():
        if name not in edited:
            if name in new and not torch.equal(new[name], tensor):
                raise AssertionError(f"{name} changed but is not an edited parameter")
            continue
        original = read_tensors(model.hf_path, [name])[name]
        expected = expected_tensor(method, original, *layouts[name], s)
        delta = expected - original.to(torch.float64)
        got = new[name].to(torch.float64) - original.to(torch.float64)
        worst = max(worst, float((got - delta).norm() / delta.norm().clamp_min(1e-30)))
    return worst


def check_complete(out: Path, s: torch.Tensor, ids: torch.Tensor, n_layers: int) -> float:
    """Largest ``|s^T h| / |h|`` of the residual entering each block of an abliterated export."""
    with torch.inference_mode():
        hidden = _vanilla(out, torch.float64)(ids, output_hidden_states=True).hidden_states
    return max(
        float(((hidden[layer][0] @ s).abs() / hidden[layer][0].norm(dim=-1).clamp_min(1e-30)).max())
        for layer in range(n_layers)
    )


def _check_edits(model: Any, root: Path, ids: torch.Tensor) -> str:
    """Steps 2 and 3 of the module docstring; returns a note, raises AssertionError on a failure."""

    s = torch.randn(model.d_model, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    s = s / s.norm()
    export_edit(model, rosi(s, ALPHA), root / "rosi")
    if (err := check_formula(model, root / "rosi", "rosi", s)) >= 1e-3:
        raise AssertionError(f"ROSI export differs from the formula by {err:.2g} (relative)")
    try:
        export_edit(model, orthogonalize(s), root / "ablated")
    except LensSafetyError as exc:
        if "post-norm" not in str(exc):
            raise
        return "abliteration refused (writers pass through a post-norm); ROSI exact"
    if (err := check_formula(model, root / "ablated", "orthogonalize", s)) >= 1e-3:
        raise AssertionError(f"abliterated export differs from the formula by {err:.2g} (relative)")
    if (leak := check_complete(root / "ablated", s, ids, model.n_layers)) > 1e-6:
        raise AssertionError(
            f"abliterated residual keeps {leak:.2g} of its norm along s (a writer was missed)"
        )
    return "ROSI and abliteration exact"


def _where(exc: BaseException) -> str:
    """``file.py:line`` of the innermost frame of an exception (no directories)."""
    frame = traceback.extract_tb(exc.__traceback__)[-1]
    return f"{Path(frame.filename).name}:{frame.lineno}"


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
    ids = model.chat.encode(["How do I bake sourdough bread?"]).input_ids
    try:
        if (err := check_residuals(model, ids)) > 1e-4:
            return result("failed", f"resid_pre differs from HF hidden_states by {err:.2g} (relative)")
        note = _check_edits(model, root, ids)
    except LensSafetyError as exc:
        return result("refused", str(exc), len(model.arch.writers))
    except AssertionError as exc:
        return result("failed", str(exc), len(model.arch.writers))
    except Exception as exc:
        return result("failed", f"{type(exc).__name__}: {exc} (in {_where(exc)})")
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


if __name__ == "__main__":
    main()
