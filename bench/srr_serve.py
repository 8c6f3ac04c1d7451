"""The SRR safeguard server under load, measured in one run against one server process.

Usage (from the repository root):

    python bench/srr_serve.py [RANKER_DIR] [--model smollm2-refusal] [--n 8] [--max-tokens 48]
                              [--threads T] [--judge substring-broad] [--quick]

Starts ``lens-safety srr serve`` (a separate process, on 127.0.0.1, a free port) and talks to it
with the ``openai`` client, then stops it with SIGTERM. Without ``RANKER_DIR`` an untrained ranker
of the default shape at the default layer is used (costs are the same; the harmful-answer rates
are skipped: they need a trained ranker).

1. **overhead**: one client, the same prompts and seeds with the safeguard on and off (``n`` each,
   so both sample the same candidates; rotating order). Overhead = (mean latency on - mean latency
   off) / mean time the server spent sampling the ``n`` candidates with the safeguard off; target
   <= 0.05. Also the server's own split: ranking (features + ranker) / sampling.
2. **throughput**: 1, 4 and 16 concurrent clients, safeguard on, requests / s and latency.
3. **harmful answers**: held-out harmful prompts (``builtin:harmful_holdout``, every one wrapped in
   a built-in jailbreak template) and held-out harmless prompts (``builtin:harmless_holdout``),
   safeguard on (best of ``n``) vs off (one sample): the harmful-answer rate (not refused) and the
   harmless refusal rate, judged by ``--judge``, with Wilson 95% intervals.
4. **load test**: a fixed number of requests from 16 clients (safeguard on and off, streamed and
   not), the server's resident memory sampled throughout; then SIGTERM: the server must exit 0
   having answered every request it was sent (no request lost, none refused, none failed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import mean, median
from typing import Any

import httpx
import openai
import psutil
import torch

from lens_safety.evaluation.bootstrap import wilson
from lens_safety.evaluation.judges import get_judge, run_judge
from lens_safety.models import load_model
from lens_safety.prompts import PromptSet
from lens_safety.srr.build import wrap_harmful
from lens_safety.srr.features import default_ranker_layer
from lens_safety.srr.ranker import RankerConfig, SafetyRanker, read_ranker_record, save_ranker


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Server:
    """``lens-safety srr serve`` in a child process."""

    def __init__(self, model: str, ranker: str, args: argparse.Namespace, workdir: Path) -> None:
        self.port = free_port()
        self.audit = workdir / "audit.jsonl"
        env = dict(os.environ)
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        argv = [sys.executable, "-m", "lens_safety", "srr", "serve", model, "--ranker", ranker]
        argv += ["--port", str(self.port), "--served-name", "bench", "--n", str(args.n)]
        argv += ["--max-tokens", str(args.max_tokens), "--max-batch", "8", "--max-queue", "64"]
        argv += ["--request-timeout", "7200"]  # measured here: latency under load, never cut
        argv += ["--audit-log", str(self.audit), "--json"]
        self.process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 600
        while not self.healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(
                    f"the server did not start: {self.process.stderr.read() if self.process.stderr else ''}"
                )
            time.sleep(0.5)
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, timeout=3600)
        self.sent = 0
        self._lock = threading.Lock()

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    def rss_mib(self) -> float:
        return psutil.Process(self.process.pid).memory_info().rss / 2**20

    def ask(self, prompt: str, **kwargs: Any) -> tuple[Any, float]:
        extra = {"safeguard": kwargs.pop("safeguard")} if "safeguard" in kwargs else None
        with self._lock:
            self.sent += 1
        started = time.perf_counter()
        if kwargs.pop("stream", False):
            chunks = list(
                self.client.chat.completions.create(
                    model="bench",
                    messages=[{"role": "user", "content": prompt}],
                    extra_body=extra,
                    stream=True,
                    **kwargs,
                )
            )
            return chunks, time.perf_counter() - started
        out = self.client.chat.completions.create(
            model="bench", messages=[{"role": "user", "content": prompt}], extra_body=extra, **kwargs
        )
        return out, time.perf_counter() - started

    def stop(self) -> tuple[int, dict[str, Any]]:
        self.process.send_signal(signal.SIGTERM)
        out, err = self.process.communicate(timeout=600)
        return self.process.returncode, json.loads(out) if out.strip() else {"stderr": err[-2000:]}


def ext(out: Any) -> dict[str, Any]:
    return dict(out.model_extra["safeguard"])


def overhead(server: Server, prompts: list[str], repeats: int) -> dict[str, Any]:
    pairs = []
    for repeat in range(repeats):
        for i, prompt in enumerate(prompts):
            seed = 1000 * repeat + i
            order = ("on", "off") if (i + repeat) % 2 == 0 else ("off", "on")
            runs = {mode: server.ask(prompt, seed=seed, safeguard=mode) for mode in order}
            pairs.append({mode: (ext(out), seconds) for mode, (out, seconds) in runs.items()})
    on = [p["on"][1] for p in pairs]
    off = [p["off"][1] for p in pairs]
    sampling_off = [p["off"][0]["timing"]["sampling_seconds"] for p in pairs]
    sampling_on = [p["on"][0]["timing"]["sampling_seconds"] for p in pairs]
    ranking_on = [p["on"][0]["timing"]["ranking_seconds"] for p in pairs]
    per_pair = [(a - b) / s for a, b, s in zip(on, off, sampling_off, strict=True)]
    return {
        "requests": 2 * len(pairs),
        "latency_on_mean_s": mean(on),
        "latency_off_mean_s": mean(off),
        "sampling_off_mean_s": mean(sampling_off),
        "overhead_fraction": (mean(on) - mean(off)) / mean(sampling_off),
        "overhead_fraction_median_pair": median(per_pair),
        "server_ranking_over_sampling": sum(ranking_on) / sum(sampling_on),
        "server_capture_cost": (sum(sampling_on) - sum(sampling_off)) / sum(sampling_off),
    }


def concurrently(clients: int, jobs: list[Callable[[], Any]]) -> list[Any]:
    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(lambda job: job(), jobs))


def throughput(server: Server, prompts: list[str], levels: list[int]) -> list[dict[str, Any]]:
    rows = []
    for clients in levels:
        count = max(8, clients)
        chosen = [prompts[i % len(prompts)] for i in range(count)]
        jobs = [lambda p=p: server.ask(p) for p in chosen]
        started = time.perf_counter()
        results = concurrently(clients, jobs)
        wall = time.perf_counter() - started
        rows.append(
            {
                "clients": clients,
                "requests": count,
                "wall_s": wall,
                "requests_per_s": count / wall,
                "latency_mean_s": mean(s for _, s in results),
                "batch_mean": mean(ext(o)["timing"]["batch_size"] for o, _ in results),
            }
        )
    return rows


def rates(
    server: Server, judge_spec: str, n: int, n_harmful: int, n_harmless: int, save: Path | None
) -> dict[str, Any]:
    judge = get_judge(judge_spec)
    harmful = PromptSet.load("builtin:harmful_holdout").head(n_harmful)
    wrapped = [text for text, _ in wrap_harmful(harmful, 1.0, seed=0)]
    harmless = list(PromptSet.load("builtin:harmless_holdout").head(n_harmless).prompts)
    asks = [
        (kind, p, mode)
        for kind, ps in (("harmful", wrapped), ("harmless", harmless))
        for p in ps
        for mode in ("on", "off")
    ]
    jobs = [lambda p=p, m=m: server.ask(p, safeguard=m, n=n if m == "on" else 1) for _, p, m in asks]
    results = concurrently(16, jobs)
    if save is not None:  # to judge the same answers again with another judge, without resampling
        with open(save, "w", encoding="utf-8") as handle:
            for (kind, prompt, mode), (answer, _) in zip(asks, results, strict=True):
                text = answer.choices[0].message.content
                record = {"kind": kind, "safeguard": mode, "prompt": prompt, "completion": text}
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    out: dict[str, Any] = {
        "judge": judge.name,
        "harmful_prompts": len(wrapped),
        "harmless_prompts": len(harmless),
    }
    for kind in ("harmful", "harmless"):
        for mode in ("on", "off"):
            chosen = [
                (p, r[0].choices[0].message.content)
                for (k, p, m), r in zip(asks, results, strict=True)
                if k == kind and m == mode
            ]
            verdicts = run_judge(judge, [c for _, c in chosen], [p for p, _ in chosen])
            outcome = (
                [not v.refused for v in verdicts] if kind == "harmful" else [v.refused for v in verdicts]
            )
            estimate = wilson(outcome)
            name = "harmful_answer_rate" if kind == "harmful" else "harmless_refusal_rate"
            out[f"{name}_{mode}"] = {
                "rate": estimate.value,
                "count": sum(outcome),
                "n": len(outcome),
                "ci95": [estimate.ci_low, estimate.ci_high],
            }
    return out


def load_test(server: Server, prompts: list[str], count: int) -> dict[str, Any]:
    samples: list[tuple[int, float]] = []
    done = [0]
    lock = threading.Lock()
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append((done[0], server.rss_mib()))
            time.sleep(0.25)

    def one(i: int) -> bool:
        out, _ = server.ask(
            prompts[i % len(prompts)],
            n=4,
            max_tokens=16,
            safeguard="on" if i % 3 else "off",
            stream=i % 2 == 0,
        )
        with lock:
            done[0] += 1
        return bool(out)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    started = time.perf_counter()
    answered = sum(concurrently(16, [lambda i=i: one(i) for i in range(count)]))
    wall = time.perf_counter() - started
    stop.set()
    watcher.join()
    quarter = [rss for k, rss in samples if k <= count // 4]
    last = [rss for k, rss in samples if k >= 3 * count // 4]
    return {
        "requests": count,
        "answered": answered,
        "wall_s": wall,
        "rss_mib_first_quarter_max": max(quarter),
        "rss_mib_last_quarter_max": max(last),
        "rss_mib_growth": max(last) - max(quarter),
        "alive_after": server.healthy(),
    }


def teacher_forced_copy(ranker_dir: str, workdir: Path) -> str:
    """The same ranker weights read through a separate ``with_instruction`` pass (same cost as a
    trained one of that context: for the overhead only; its choices are meaningless)."""
    target = workdir / "teacher-forced-ranker"
    shutil.copytree(ranker_dir, target, ignore=shutil.ignore_patterns("baselines"))
    record = json.loads((target / "ranker.json").read_text())
    record["config"]["context"] = "with_instruction"
    (target / "ranker.json").write_text(json.dumps(record))
    return str(target)


def untrained_ranker(model_spec: str, workdir: Path) -> str:
    model = load_model(model_spec, device="cpu")
    ranker = SafetyRanker(
        RankerConfig(d_input=model.d_model, layer=default_ranker_layer(model), context="generated_mean")
    )
    return str(save_ranker(ranker.eval(), workdir / "untrained-ranker", model.identity()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ranker_dir", nargs="?")
    parser.add_argument("--model", default="smollm2-refusal")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads of the server (OMP_NUM_THREADS)"
    )
    parser.add_argument("--judge", default="substring-broad")
    parser.add_argument("--quick", action="store_true", help="fewer requests in every part")
    parser.add_argument("--save-answers", type=Path, help="JSONL of the judged answers (to judge them again)")
    args = parser.parse_args()
    quick = args.quick
    workdir = Path(tempfile.mkdtemp(prefix="srr-serve-bench-"))
    if args.ranker_dir:
        ranker, record = args.ranker_dir, read_ranker_record(args.ranker_dir)
        model_spec = record["base_model"]["spec"]
    else:
        ranker, record, model_spec = untrained_ranker(args.model, workdir), None, args.model
    harmful = PromptSet.load("builtin:harmful:test").prompts
    harmless = PromptSet.load("builtin:harmless:test").prompts
    mixed = [(harmful if i % 2 == 0 else harmless)[i // 2] for i in range(24)]
    load_before = os.getloadavg()
    started = time.perf_counter()
    server = Server(model_spec, ranker, args, workdir)
    startup = time.perf_counter() - started
    server.ask(mixed[0], seed=0)  # warm-up
    result: dict[str, Any] = {
        "model": model_spec,
        "ranker": args.ranker_dir or "untrained, default shape (generated_mean)",
        "ranker_config": (record or {}).get("config"),
        "n": args.n,
        "max_tokens": args.max_tokens,
        "server_torch_threads": args.threads or torch.get_num_threads(),
        "cpu_cores": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "server_startup_s": startup,
    }
    result["overhead"] = overhead(server, mixed[: 4 if quick else 6], 1 if quick else 2)
    result["throughput"] = throughput(server, mixed, [1, 4] if quick else [1, 4, 16])
    if args.ranker_dir:
        result["rates"] = rates(
            server, args.judge, args.n, 8 if quick else 32, 8 if quick else 16, args.save_answers
        )
    rss_before = server.rss_mib()
    result["load_test"] = load_test(server, mixed, 32 if quick else 96)
    result["load_test"]["rss_mib_before_load_test"] = rss_before
    code, summary = server.stop()
    result["shutdown"] = {"exit_code": code, "requests_sent": server.sent, **summary}
    if (record or {}).get("config", {}).get("context", "generated_mean") != "with_instruction":
        second = Server(model_spec, teacher_forced_copy(ranker, workdir), args, workdir)
        second.ask(mixed[0], seed=0)
        result["overhead_teacher_forced"] = overhead(second, mixed[: 4 if quick else 6], 1)
        second.stop()
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    result["total_s"] = time.perf_counter() - started
    print(report(result))
    print(json.dumps(result, indent=2, default=float))


def report(r: dict[str, Any]) -> str:
    o = r["overhead"]
    lines = [
        f"SRR safeguard server: {r['model']}, ranker {r['ranker']}, n = {r['n']}, {r['max_tokens']} tokens",
        f"{r['cpu_cores']} CPU cores, server torch threads {r['server_torch_threads']}, load average before {r['load_average_before']}",
        "",
        f"overhead (1 client, {o['requests']} requests, same seeds on/off): latency on {o['latency_on_mean_s']:.2f} s, "
        f"off {o['latency_off_mean_s']:.2f} s, sampling (off) {o['sampling_off_mean_s']:.2f} s",
        f"  overhead = (on - off) / sampling = {100 * o['overhead_fraction']:+.1f}% (median pair {100 * o['overhead_fraction_median_pair']:+.1f}%; target <= 5%)",
        f"  server: ranking / sampling = {100 * o['server_ranking_over_sampling']:.2f}%, capture hooks = {100 * o['server_capture_cost']:+.1f}% of sampling",
    ]
    if "overhead_teacher_forced" in r:
        t = r["overhead_teacher_forced"]
        lines += [
            f"same weights read by a separate with_instruction pass: overhead {100 * t['overhead_fraction']:+.1f}% "
            f"(median pair {100 * t['overhead_fraction_median_pair']:+.1f}%), server ranking / sampling "
            f"{100 * t['server_ranking_over_sampling']:.1f}%",
        ]
    lines += [
        "",
        "clients  requests  wall s  requests/s  latency s  mean batch",
    ]
    for t in r["throughput"]:
        lines.append(
            f"{t['clients']:>7}  {t['requests']:>8}  {t['wall_s']:>6.1f}  {t['requests_per_s']:>10.3f}  {t['latency_mean_s']:>9.2f}  {t['batch_mean']:>10.2f}"
        )
    if "rates" in r:
        q = r["rates"]
        lines += [
            "",
            f"judge {q['judge']}; {q['harmful_prompts']} jailbreak-wrapped builtin:harmful_holdout, {q['harmless_prompts']} builtin:harmless_holdout",
        ]
        for name in ("harmful_answer_rate", "harmless_refusal_rate"):
            for mode in ("off", "on"):
                e = q[f"{name}_{mode}"]
                lines.append(
                    f"  {name} safeguard {mode:<3}: {e['count']}/{e['n']} = {e['rate']:.3f} [{e['ci95'][0]:.3f}, {e['ci95'][1]:.3f}]"
                )
    lt = r["load_test"]
    lines += [
        "",
        f"load test: {lt['answered']}/{lt['requests']} answered in {lt['wall_s']:.1f} s (16 clients); server alive after: {lt['alive_after']}",
        f"  RSS MiB: before {lt['rss_mib_before_load_test']:.0f}, max first quarter {lt['rss_mib_first_quarter_max']:.0f}, "
        f"max last quarter {lt['rss_mib_last_quarter_max']:.0f} (growth {lt['rss_mib_growth']:+.0f})",
        f"shutdown (SIGTERM): exit {r['shutdown']['exit_code']}; {r['shutdown']['requests_sent']} requests sent in the whole run, "
        f"server counts {r['shutdown'].get('counts')}",
        f"load average after {r['load_average_after']}; total {r['total_s']:.0f} s",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
