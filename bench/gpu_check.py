"""GPU check: one short run over what a GPU user relies on, with a pass / fail table.

Run: ``python bench/gpu_check.py [OUT.json]`` (default: ``$OUT/gpu_check.json`` when ``$OUT`` is
set; the table and the JSON are printed either way). It also runs on a CPU machine: the CUDA rows
then say ``skipped: no CUDA`` and the rest runs on the CPU. Rows, in order:

* ``cuda``: the device, its bf16 support and a bf16 matmul against float64;
* ``self-check``: the embedded SmolLM2-135M-Instruct in bfloat16 on the device, greedy generation
  through lens-safety against vanilla transformers (``check_generation(reference="vanilla")``);
* ``matrix <arch>``: tiny random checkpoints of the architecture matrix's fast cases stored in
  bfloat16, loaded in bfloat16 on the device: ``resid_pre`` against vanilla transformers' hidden
  states (same device and dtype, relative error), then a ROSI export verified by reloading;
* ``matrix cpu <arch>``: ``lens_safety.arch_matrix.run_case`` (float32, CPU, every check);
* ``edit-export-verify``: ROSI on SmolLM2 (bfloat16, on the device) exported and verified, with the
  growth of host memory (peak RSS) during the export per byte of the largest shard;
* ``device_map``: a tiny llama split across every GPU (``device_map="balanced"``) against one device
  (residuals, greedy tokens, export bytes); with one GPU ``device_map="auto"`` on it; and always a
  CPU + disk split (embedding and two blocks in memory, the rest offloaded to disk) against the CPU;
* ``generate hf``: greedy completions of SmolLM2 on the device, tokens per second;
* ``generate vllm`` / ``reads vllm``: vLLM's greedy completions against the Hugging Face engine's
  (float32, token for token) and its residual reads against the bridge's (``skipped`` without vLLM).
"""

from __future__ import annotations

import gc
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

PROMPTS = ["Name a colour.", "How do I bake bread at home?", "What is the capital of France?", "Say hi."]
MATRIX_ON_DEVICE = ("Qwen3ForCausalLM", "Gemma3ForCausalLM", "MistralForCausalLM", "MixtralForCausalLM")
MATRIX_ON_CPU = ("Olmo2ForCausalLM", "Phi3ForCausalLM")
ROWS: list[dict[str, Any]] = []


class Skip(Exception):
    """A row that does not apply here (its reason is printed)."""


def row(name: str, check: Callable[[], dict[str, Any]]) -> None:
    """Run one check; record pass (its details), skipped (the reason) or fail (the error)."""
    start = time.perf_counter()
    try:
        details, status = check(), "pass"
    except Skip as reason:
        details, status = {}, f"skipped: {reason}"
    except Exception as exc:  # a failed row must not stop the others
        where = traceback.extract_tb(exc.__traceback__)[-1]
        details = {"where": f"{Path(where.filename).name}:{where.lineno}"}
        status = f"fail: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    ROWS.append(
        {"check": name, "status": status, "seconds": round(time.perf_counter() - start, 1), **details}
    )
    print(f"{name:<34} {status[:90]:<90} {ROWS[-1]['seconds']:>6.1f} s", flush=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def require(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def check_cuda() -> dict[str, Any]:
    if not torch.cuda.is_available():
        raise Skip("no CUDA")
    a = torch.randn(512, 512, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = a @ a
    got = (a.cuda().bfloat16() @ a.cuda().bfloat16()).double().cpu()
    error = float((got - exact).abs().max() / exact.abs().max())
    require(torch.cuda.is_bf16_supported() and error < 2e-2, f"bf16 matmul relative error {error:.3g}")
    return {
        "device": torch.cuda.get_device_name(0),
        "gpus": torch.cuda.device_count(),
        "torch_cuda": torch.version.cuda,
        "bf16_matmul_rel_error": error,
    }


def tokenizer_dir() -> Path:
    from lens_safety.sources import resolve_spec

    return resolve_spec("smollm2")[0]


def check_selfcheck() -> dict[str, Any]:
    from lens_safety.models import load_model
    from lens_safety.selfcheck import check_generation

    model = load_model("smollm2", device=device(), dtype="bfloat16")
    check = check_generation(model, reference="vanilla")
    require(check.ok, f"greedy tokens differ from vanilla transformers: {check.tokens} vs {check.expected}")
    return {"dtype": "bfloat16", "ties_accepted": len(check.ties)}


def check_matrix_on_device(arch: str, root: Path) -> dict[str, Any]:
    from lens_safety.arch_matrix.checks import vanilla
    from lens_safety.arch_matrix.configs import build_tiny, registry_architectures
    from lens_safety.edits import rosi
    from lens_safety.export import export_edit
    from lens_safety.models import load_model

    model_type = registry_architectures()[arch]
    require(model_type is not None, f"{arch} has no transformers model type")
    path = build_tiny(str(model_type), root / arch, tokenizer_dir(), dtype=torch.bfloat16)
    model = load_model(path, device=device(), dtype="bfloat16")
    ids = model.chat.encode(PROMPTS[1:2]).input_ids.to(model.device)
    with torch.inference_mode():
        _, cache = model.bridge.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_resid_pre"))
        hidden = vanilla(path, torch.bfloat16).to(model.device)(ids, output_hidden_states=True).hidden_states
    error = max(
        float(
            (cache[f"blocks.{i}.hook_resid_pre"].float() - hidden[i].float()).abs().max()
            / hidden[i].float().abs().max()
        )
        for i in range(model.n_layers)
    )
    require(error <= 1e-2, f"resid_pre differs from HF hidden_states by {error:.3g} (relative)")
    direction = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0))
    result = export_edit(model, rosi(direction, 5.0), root / f"{arch}-rosi")
    return {
        "resid_rel_error": error,
        "writers": len(model.arch.writers),
        "export_max_logit_diff": result.max_abs_logit_diff,
    }


def check_matrix_on_cpu(arch: str, root: Path) -> dict[str, Any]:
    from lens_safety.arch_matrix import run_case
    from lens_safety.arch_matrix.configs import registry_architectures

    result = run_case(arch, registry_architectures()[arch], root / f"cpu-{arch}", tokenizer_dir())
    require(result.status == "supported", f"{result.status}: {result.detail}")
    return {"detail": result.detail}


def check_edit_export(root: Path) -> dict[str, Any]:
    from lens_safety.edits import rosi
    from lens_safety.export import export_edit
    from lens_safety.models import load_model

    model = load_model("smollm2", device=device(), dtype="bfloat16")
    direction = torch.randn(model.d_model, generator=torch.Generator().manual_seed(1))
    baseline = _status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    result = export_edit(model, rosi(direction, 8.0), root / "smollm2-rosi")
    largest = max(p.stat().st_size for p in model.hf_path.glob("*.safetensors"))
    verification = result.edit["verification"]
    return {
        "max_abs_logit_diff": result.max_abs_logit_diff,
        "bound": result.bound,
        "reference": verification["reference"],
        "write_s": round(result.seconds - result.verify_seconds, 1),
        "verify_s": round(result.verify_seconds, 1),
        "host_rss_growth_per_largest_shard": round((_status_bytes("VmHWM") - baseline) / largest, 3),
    }


def _status_bytes(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} is not in /proc/self/status")


def _digest(directory: Path) -> dict[str, str]:
    import hashlib

    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("*.safetensors"))
    }


def _same_as_one_device(
    path: Path, one_device: str, root: Path, tag: str, **placement: Any
) -> dict[str, Any]:
    """Residuals, greedy tokens and export bytes of a split load against a one-device load."""
    from lens_safety.activations import collect_activations
    from lens_safety.edits import rosi
    from lens_safety.evaluation.generation import generate
    from lens_safety.export import export_edit
    from lens_safety.models import load_model

    one = load_model(path, device=one_device)
    split = load_model(path, **placement)
    a = collect_activations(one, PROMPTS, positions=(-1, -2)).tensor
    b = collect_activations(split, PROMPTS, positions=(-1, -2)).tensor
    error = float((a - b).abs().max() / a.abs().max())
    require(error <= 1e-5, f"split residuals differ by {error:.3g} (relative)")
    same_tokens = (
        generate(one, PROMPTS, max_new_tokens=8).token_ids
        == generate(split, PROMPTS, max_new_tokens=8).token_ids
    )
    require(same_tokens, "greedy tokens differ between the split and the one-device model")
    spec = rosi(torch.randn(one.d_model, generator=torch.Generator().manual_seed(2)), 5.0)
    export_edit(one, spec, root / f"{tag}-one")
    export_edit(split, spec, root / f"{tag}-split")
    require(_digest(root / f"{tag}-one") == _digest(root / f"{tag}-split"), "export bytes differ")
    return {
        f"{tag}_map": {k: str(v) for k, v in (split.device_map or {}).items()},
        f"{tag}_resid_rel_error": error,
    }


def check_device_map(root: Path) -> dict[str, Any]:
    from lens_safety.testing import make_tiny_model

    path = make_tiny_model("llama", root / "dm-llama", tokenizer_dir())
    out: dict[str, Any] = {}
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus >= 2:
        out |= _same_as_one_device(path, "cuda:0", root, "gpus", device_map="balanced")
    elif gpus == 1:
        out |= _same_as_one_device(path, "cuda:0", root, "gpu", device_map="auto")
        out["note"] = "one GPU: the GPU map holds everything; the CPU + disk split is the real split"
    in_memory = ("model.embed_tokens", "model.layers.0", "model.layers.1")
    offloaded = ("model.layers.2", "model.norm", "model.rotary_emb", "lm_head")
    cpu_disk = dict.fromkeys(in_memory, "cpu") | dict.fromkeys(offloaded, "disk")  # never a GPU
    out |= _same_as_one_device(path, "cpu", root, "cpu_disk", device_map=cpu_disk)
    require("disk" in out["cpu_disk_map"].values(), f"nothing was offloaded: {out['cpu_disk_map']}")
    return out


def check_generate_hf() -> dict[str, Any]:
    from lens_safety.evaluation.generation import generate
    from lens_safety.models import load_model

    model = load_model("smollm2", device=device(), dtype="bfloat16")
    gens = generate(model, PROMPTS * 4, max_new_tokens=32, batch_size=16)
    require(all(n > 0 for n in gens.n_tokens), "an empty completion")
    return {"completions": len(gens), "tokens_per_s": round(gens.tokens_per_second, 1)}


def _vllm() -> None:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise Skip("vLLM not installed")


def check_generate_vllm() -> dict[str, Any]:
    _vllm()
    from lens_safety.evaluation.generation import generate
    from lens_safety.evaluation.vllm_engine import VLLMEngine
    from lens_safety.models import load_model

    model = load_model("smollm2", device=device(), dtype="float32")
    hf = generate(model, PROMPTS, max_new_tokens=24)
    with VLLMEngine(model, max_model_len=512, enforce_eager=True) as engine:
        started = time.perf_counter()
        ours = generate(model, PROMPTS * 4, max_new_tokens=24, engine=engine)
        seconds = time.perf_counter() - started
    equal = sum(a == b for a, b in zip(hf.token_ids, ours.token_ids[: len(PROMPTS)], strict=True))
    require(equal == len(PROMPTS), f"{equal}/{len(PROMPTS)} greedy completions equal the HF engine's")
    return {
        "equal_completions": f"{equal}/{len(PROMPTS)}",
        "tokens_per_s": round(sum(ours.n_tokens) / seconds, 1),
    }


def check_reads_vllm() -> dict[str, Any]:
    _vllm()
    from lens_safety.activations import collect_activations
    from lens_safety.evaluation.vllm_engine import VLLMReader
    from lens_safety.models import load_model

    model = load_model("smollm2", device=device(), dtype="float32")
    layers = (0, 5, 15, model.n_layers - 1)
    want = collect_activations(model, PROMPTS, layers=layers, positions=(-1, -3)).tensor
    with VLLMReader(model, max_model_len=512, max_num_batched_tokens=512) as reader:
        got = collect_activations(model, PROMPTS, layers=layers, positions=(-1, -3), reader=reader).tensor
    error = float((got - want).abs().max() / want.abs().max())
    require(error <= 1e-3, f"vLLM residuals differ from the bridge's by {error:.3g} (relative)")
    return {"resid_rel_error": error}


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    target = (
        Path(sys.argv[1])
        if len(sys.argv) > 1
        else (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else None)
    )
    started = time.perf_counter()
    print(f"{'check':<34} {'status':<90} {'time':>8}")
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        root = Path(tmp)
        row("cuda", check_cuda)
        row("self-check (bf16)", check_selfcheck)
        for arch in MATRIX_ON_DEVICE:
            row(f"matrix {arch} (bf16)", lambda arch=arch: check_matrix_on_device(arch, root))
        for arch in MATRIX_ON_CPU:
            row(f"matrix cpu {arch}", lambda arch=arch: check_matrix_on_cpu(arch, root))
        row("edit-export-verify (bf16)", lambda: check_edit_export(root))
        row("device_map", lambda: check_device_map(root))
        row("generate hf (bf16)", check_generate_hf)
        row("generate vllm (fp32, = hf)", check_generate_vllm)
        row("reads vllm (fp32, = bridge)", check_reads_vllm)
    failed = [r["check"] for r in ROWS if r["status"].startswith("fail")]
    report = {
        "device": device(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "seconds": round(time.perf_counter() - started, 1),
        "passed": sum(r["status"] == "pass" for r in ROWS),
        "failed": failed,
        "skipped": sum(r["status"].startswith("skipped") for r in ROWS),
        "rows": ROWS,
    }
    print(json.dumps(report, indent=2, default=str))
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(report, indent=2, default=str))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
