"""The SRR safeguard server under load, measured in one run against one server process.

Usage (from the repository root):

    python bench/srr_serve.py [RANKER_DIR] [--model smollm2-refusal] [--n 8] [--max-tokens 48]
                              [--threads T] [--judge substring-broad] [--quick]
                              [--parts overhead,throughput,rates,load,teacher-forced]
                              [--harmful 32] [--harmless 16] [--save-answers FILE]
    python bench/srr_serve.py --judge-answers FILE --judge learned,substring-broad

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
   harmless refusal rate, judged by every ``--judge`` on the same answers, with Wilson 95%
   intervals. ``--save-answers`` keeps the answers; ``--judge-answers FILE`` judges such a file
   again (no server, no sampling).
4. **load test**: a fixed number of requests from 16 clients (safeguard on and off, streamed and
   not), the server's resident memory sampled throughout; then SIGTERM: the server must exit 0
   having answered every request it was sent (no request lost, none refused, none failed).
5. **teacher-forced**: the overhead again with the same ranker weights read by a separate
   ``with_instruction`` pass (a second server).

``--parts`` runs a subset (e.g. ``--parts rates``); the SIGTERM check always runs.
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
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import mean, median
from typing import Any

import httpx
import openai
import psutil
import torch

from lens_safety.evaluation.bootstrap import bootstrap
from lens_safety.evaluation.judges import get_judges, judge_question
from lens_safety.evaluation.metrics import rate_of_completions
from lens_safety.evaluation.panel import JudgeRates, pairwise
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


def concurrently(clients: int, jobs: Sequence[Callable[[], Any]]) -> list[Any]:
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


def collect_answers(server: Server, n: int, n_harmful: int, n_harmless: int) -> list[dict[str, str]]:
    """Held-out harmful prompts (each jailbreak-wrapped) and harmless ones, each asked with the
    safeguard on (best of ``n``) and off (one sample): one record per answer."""
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
    return [
        {"kind": kind, "safeguard": mode, "prompt": prompt, "completion": answer.choices[0].message.content}
        for (kind, prompt, mode), (answer, _) in zip(asks, results, strict=True)
    ]


def judged_rates(records: list[dict[str, str]], judge_specs: list[str]) -> dict[str, Any]:
    """Harmful-answer rate (not refused) and harmless refusal rate, safeguard on and off, by every
    judge on the same answers (Wilson 95% intervals), the difference on - off paired by prompt
    (percentile bootstrap of the per-prompt differences), and how often each pair of judges agrees."""
    panel = []
    for judge in get_judges(judge_specs):
        sets = {}
        for kind, mode in (("harmful", "off"), ("harmful", "on"), ("harmless", "off"), ("harmless", "on")):
            chosen = [r for r in records if r["kind"] == kind and r["safeguard"] == mode]
            sets[f"{kind}_{mode}"] = rate_of_completions(
                [r["completion"] for r in chosen], [r["prompt"] for r in chosen], judge, interval="wilson"
            )
        panel.append(JudgeRates(judge.name, judge_question(judge), sets))
    by_judge: dict[str, Any] = {}
    for rates in panel:
        row = {}
        for key, result in rates.rates.items():
            kind, mode = key.split("_")
            refused = sum(result.refused)
            if kind == "harmful":  # the complement's Wilson interval is the complement of the interval
                row[f"harmful_answer_rate_{mode}"] = _rate(
                    result.n - refused, result.n, 1 - result.ci_high, 1 - result.ci_low
                )
            else:
                row[f"harmless_refusal_rate_{mode}"] = _rate(refused, result.n, result.ci_low, result.ci_high)
        for name, kind in (("harmful_answer_rate", "harmful"), ("harmless_refusal_rate", "harmless")):
            on, off = rates.rates[f"{kind}_on"], rates.rates[f"{kind}_off"]
            assert on.prompts == off.prompts, "on and off answers are paired by prompt"
            sign = -1.0 if kind == "harmful" else 1.0  # harmful answers are the non-refusals
            paired = bootstrap(
                [sign * (float(a) - float(b)) for a, b in zip(on.refused, off.refused, strict=True)]
            )
            row[f"{name}_on_minus_off"] = paired.to_dict()
        by_judge[rates.judge] = row
    return {
        "harmful_prompts": sum(r["kind"] == "harmful" and r["safeguard"] == "on" for r in records),
        "harmless_prompts": sum(r["kind"] == "harmless" and r["safeguard"] == "on" for r in records),
        "by_judge": by_judge,
        "agreement": [pair.to_dict() for pair in pairwise(panel)],
    }


def _rate(count: int, n: int, low: float, high: float) -> dict[str, Any]:
    return {"rate": count / n, "count": count, "n": n, "ci95": [low, high]}


def save_answers(records: list[dict[str, str]], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def read_answers(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    fields = {"kind", "safeguard", "prompt", "completion"}
    if not records or any(set(r) != fields for r in records):
        raise SystemExit(f"{path}: expected JSON lines with exactly the fields {sorted(fields)}")
    return records


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


PARTS = ("overhead", "throughput", "rates", "load", "teacher-forced")


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ranker_dir", nargs="?")
    parser.add_argument("--model", default="smollm2-refusal")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads of the server (OMP_NUM_THREADS)"
    )
    parser.add_argument(
        "--judge",
        action="append",
        help="judge spec(s) of the rates, repeatable or comma-separated (default substring-broad)",
    )
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    parser.add_argument("--harmful", type=int, default=32, help="held-out harmful prompts of the rates")
    parser.add_argument("--harmless", type=int, default=16, help="held-out harmless prompts of the rates")
    parser.add_argument("--quick", action="store_true", help="fewer requests in every part")
    parser.add_argument("--save-answers", type=Path, help="JSONL of the judged answers (to judge them again)")
    parser.add_argument(
        "--judge-answers", type=Path, help="judge a --save-answers file again (no server) and stop"
    )
    args = parser.parse_args()
    args.judge = args.judge or ["substring-broad"]
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    return args


def rejudge(path: Path, judge_specs: list[str]) -> None:
    """Judge the answers of an earlier run (``--save-answers``) again, with every judge."""
    rates = judged_rates(read_answers(path), judge_specs)
    print("\n".join([f"answers: {path.name}", *rates_report(rates)]))
    print(json.dumps({"answers": path.name, "rates": rates}, indent=2, default=float))


def main() -> None:
    args = arguments()
    if args.judge_answers is not None:
        rejudge(args.judge_answers, args.judge)
        return
    quick, parts = args.quick, args.parts
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
        "parts": parts,
        "server_torch_threads": args.threads or torch.get_num_threads(),
        "cpu_cores": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "server_startup_s": startup,
    }
    if "overhead" in parts:
        result["overhead"] = overhead(server, mixed[: 4 if quick else 6], 1 if quick else 2)
    if "throughput" in parts:
        result["throughput"] = throughput(server, mixed, [1, 4] if quick else [1, 4, 16])
    if "rates" in parts and args.ranker_dir:
        answers = collect_answers(server, args.n, 8 if quick else args.harmful, 8 if quick else args.harmless)
        if args.save_answers is not None:  # to judge the same answers again, without resampling
            save_answers(answers, args.save_answers)
        result["rates"] = judged_rates(answers, args.judge)
    if "load" in parts:
        rss_before = server.rss_mib()
        result["load_test"] = load_test(server, mixed, 32 if quick else 96)
        result["load_test"]["rss_mib_before_load_test"] = rss_before
    code, summary = server.stop()
    result["shutdown"] = {"exit_code": code, "requests_sent": server.sent, **summary}
    context = (record or {}).get("config", {}).get("context", "generated_mean")
    if "teacher-forced" in parts and context != "with_instruction":
        second = Server(model_spec, teacher_forced_copy(ranker, workdir), args, workdir)
        second.ask(mixed[0], seed=0)
        result["overhead_teacher_forced"] = overhead(second, mixed[: 4 if quick else 6], 1)
        second.stop()
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    result["total_s"] = time.perf_counter() - started
    print(report(result))
    print(json.dumps(result, indent=2, default=float))


def overhead_report(o: dict[str, Any], t: dict[str, Any] | None) -> list[str]:
    lines = [
        f"overhead (1 client, {o['requests']} requests, same seeds on/off): latency on {o['latency_on_mean_s']:.2f} s, "
        f"off {o['latency_off_mean_s']:.2f} s, sampling (off) {o['sampling_off_mean_s']:.2f} s",
        f"  overhead = (on - off) / sampling = {100 * o['overhead_fraction']:+.1f}% (median pair {100 * o['overhead_fraction_median_pair']:+.1f}%; target <= 5%)",
        f"  server: ranking / sampling = {100 * o['server_ranking_over_sampling']:.2f}%, capture hooks = {100 * o['server_capture_cost']:+.1f}% of sampling",
    ]
    if t is not None:
        lines.append(
            f"same weights read by a separate with_instruction pass: overhead {100 * t['overhead_fraction']:+.1f}% "
            f"(median pair {100 * t['overhead_fraction_median_pair']:+.1f}%), server ranking / sampling "
            f"{100 * t['server_ranking_over_sampling']:.1f}%"
        )
    return lines


def rates_report(q: dict[str, Any]) -> list[str]:
    lines = [
        f"{q['harmful_prompts']} jailbreak-wrapped builtin:harmful_holdout, {q['harmless_prompts']} builtin:harmless_holdout; "
        "safeguard on = best of n, off = one sample"
    ]
    for judge, rates in q["by_judge"].items():
        lines.append(f"judge {judge}")
        for name in ("harmful_answer_rate", "harmless_refusal_rate"):
            for mode in ("off", "on"):
                e = rates[f"{name}_{mode}"]
                lines.append(
                    f"  {name} safeguard {mode:<3}: {e['count']}/{e['n']} = {e['rate']:.3f} [{e['ci95'][0]:.3f}, {e['ci95'][1]:.3f}]"
                )
            d = rates[f"{name}_on_minus_off"]
            lines.append(
                f"  {name} on - off, paired by prompt: {d['value']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"
            )
    for pair in q["agreement"]:
        a = pair["agreement"]
        lines.append(
            f"agreement {' vs '.join(pair['judges'])} on all {a['n']} answers: {a['value']:.3f} "
            f"[{a['ci_low']:.3f}, {a['ci_high']:.3f}], kappa {pair['kappa']:.3f}, counts {pair['counts']}"
        )
    return lines


def report(r: dict[str, Any]) -> str:
    lines = [
        f"SRR safeguard server: {r['model']}, ranker {r['ranker']}, n = {r['n']}, {r['max_tokens']} tokens; parts {', '.join(r['parts'])}",
        f"{r['cpu_cores']} CPU cores, server torch threads {r['server_torch_threads']}, load average before {r['load_average_before']}",
    ]
    if "overhead" in r:
        lines += ["", *overhead_report(r["overhead"], r.get("overhead_teacher_forced"))]
    if "throughput" in r:
        lines += ["", "clients  requests  wall s  requests/s  latency s  mean batch"]
        for t in r["throughput"]:
            lines.append(
                f"{t['clients']:>7}  {t['requests']:>8}  {t['wall_s']:>6.1f}  {t['requests_per_s']:>10.3f}  {t['latency_mean_s']:>9.2f}  {t['batch_mean']:>10.2f}"
            )
    if "rates" in r:
        lines += ["", *rates_report(r["rates"])]
    if "load_test" in r:
        lt = r["load_test"]
        lines += [
            "",
            f"load test: {lt['answered']}/{lt['requests']} answered in {lt['wall_s']:.1f} s (16 clients); server alive after: {lt['alive_after']}",
            f"  RSS MiB: before {lt['rss_mib_before_load_test']:.0f}, max first quarter {lt['rss_mib_first_quarter_max']:.0f}, "
            f"max last quarter {lt['rss_mib_last_quarter_max']:.0f} (growth {lt['rss_mib_growth']:+.0f})",
        ]
    lines += [
        f"shutdown (SIGTERM): exit {r['shutdown']['exit_code']}; {r['shutdown']['requests_sent']} requests sent in the whole run, "
        f"server counts {r['shutdown'].get('counts')}",
        f"load average after {r['load_average_after']}; total {r['total_s']:.0f} s",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
