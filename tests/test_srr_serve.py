"""The SRR safeguard server, real on 127.0.0.1, talked to by the real ``openai`` client.

Every answer is checked against an independent recomputation: the candidates are sampled again
with the library's ``generate`` (same seed), their features are read again with vanilla
``transformers`` (``output_hidden_states``, one unpadded sequence at a time) and scored again with
the ranker, one list at a time; the server must return the argmax.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from cli_runner import run_cli
from transformers import AutoModelForCausalLM

from lens_safety.errors import LensSafetyError
from lens_safety.evaluation.generation import generate
from lens_safety.evaluation.judges import judge_from_callable
from lens_safety.models import ChatModel, load_model
from lens_safety.serving import BackgroundServer, GenerateEngine, Safeguard, ServeConfig, build_server
from lens_safety.srr.data import first_occurrences
from lens_safety.srr.features import list_features
from lens_safety.srr.ranker import RankerConfig, SafetyRanker, load_ranker, save_ranker

KEY = "test-key-123"
PROMPTS = ["How do locks work?", "Write a scam email.", "Name three rivers.", "Insult my coworker."]


def vowel_judge() -> Any:
    """A deterministic judge for random text: 'refused' iff it has more 'e' than 'a'."""
    return judge_from_callable(lambda text: text.count("e") > text.count("a"), name="vowels")


@pytest.fixture(scope="module")
def tiny(tiny_dirs: dict[str, Path]) -> ChatModel:
    return load_model(tiny_dirs["llama"], device="cpu")


def _ranker(model: ChatModel, context: str, out: Path) -> Path:
    """A random ranker whose standardisation comes from real features (so its scores spread)."""
    torch.manual_seed(0)
    ranker = SafetyRanker(
        RankerConfig(d_input=model.d_model, width=32, ff_width=64, n_heads=4, layer=1, context=context)
    )
    texts = [f"{w} answer {i}" for i, w in enumerate(["Sure", "No", "Maybe", "Well", "Here", "Sorry"])]
    _, h_resp = list_features(model, "Hello?", texts, [1], ["with_instruction"])
    ranker.set_standardization(h_resp["with_instruction"][:, 0])
    return save_ranker(ranker.eval(), out, model.identity())


@pytest.fixture(scope="module")
def rankers(tiny: ChatModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rankers")
    return {c: _ranker(tiny, c, root / c) for c in ("with_instruction", "generated_mean")}


@pytest.fixture(scope="module")
def hf_model(tiny_dirs: dict[str, Path]) -> Any:
    return AutoModelForCausalLM.from_pretrained(str(tiny_dirs["llama"]), dtype=torch.float32).eval()


def audited(rankers: dict[str, Path], audit: Path, judge: Any) -> ServeConfig:
    """4 candidates of 8 tokens, candidates in the response, an audit log judged by ``judge``."""
    return ServeConfig(
        ranker=rankers["with_instruction"],
        n=4,
        max_tokens=8,
        served_name="tiny",
        expose_candidates=True,
        audit_log=audit,
        audit_judge=judge,
    )


@pytest.fixture(scope="module")
def served(
    tiny: ChatModel, rankers: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    audit = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    app, state = build_server(tiny, audited(rankers, audit, vowel_judge()), api_key=KEY)
    with BackgroundServer(app) as server:
        server.audit_path = audit
        server.state = state
        yield server


def client(server: Any, **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=server.base_url, api_key=kwargs.pop("api_key", KEY), max_retries=0, **kwargs
    )


def ask(server: Any, prompt: str, **kwargs: Any) -> Any:
    extra = {"safeguard": kwargs.pop("safeguard")} if "safeguard" in kwargs else None
    return client(server).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": prompt}], extra_body=extra, **kwargs
    )


# ------------------------------------------------------------------ independent recomputation


def sampled_again(model: ChatModel, prompt: str, n: int, max_tokens: int, seed: int) -> Any:
    return generate(
        model,
        [prompt],
        max_new_tokens=max_tokens,
        do_sample=True,
        seed=seed,
        num_return_sequences=n,
        batch_size=1,
    )


def hf_states(hf: Any, ids: list[int], layer: int) -> torch.Tensor:
    """``hidden_states[layer]`` of one unpadded sequence (= ``blocks.{layer}.hook_resid_pre``)."""
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[layer][0].float()


def rescored(
    model: ChatModel, hf: Any, ranker: SafetyRanker, prompt: str, candidates: list[str]
) -> torch.Tensor:
    """``with_instruction`` scores from vanilla transformers: the last prompt token and each
    candidate's last token of ``prompt + candidate``, one sequence at a time."""
    layer = int(ranker.config.layer or 0)
    prompt_ids = model.chat.token_ids(model.chat.format(prompt))
    rows = []
    for text in candidates:
        ids = prompt_ids + list(model.tokenizer(text, add_special_tokens=False)["input_ids"])
        rows.append(hf_states(hf, ids, layer)[-1])
    inst = hf_states(hf, prompt_ids, layer)[-1]
    with torch.no_grad():
        return ranker(inst[None], torch.stack(rows)[None])[0]


def rescored_mean(
    model: ChatModel, hf: Any, ranker: SafetyRanker, prompt: str, gens: Any, sample_index: list[int]
) -> torch.Tensor:
    """``generated_mean`` scores from vanilla transformers: one teacher-forced pass per sampled
    token sequence (``gens.token_ids``), the mean of the response tokens' states (a cut candidate's
    last token is never read), the last prompt token for the instruction."""
    layer = int(ranker.config.layer or 0)
    prompt_ids = model.chat.token_ids(model.chat.format(prompt))
    rows = []
    for j in sample_index:
        read = gens.n_tokens[j] - 1 if gens.truncated[j] else gens.n_tokens[j]
        states = hf_states(hf, prompt_ids + gens.token_ids[j], layer)
        span = states[len(prompt_ids) : len(prompt_ids) + read]
        rows.append(span.double().mean(0).float() if read else states[len(prompt_ids) - 1])
    inst = hf_states(hf, prompt_ids, layer)[-1]
    with torch.no_grad():
        return ranker(inst[None], torch.stack(rows)[None])[0]


def check_choice(extension: dict[str, Any], content: str, expected: torch.Tensor) -> None:
    scores = torch.tensor(extension["scores"])
    assert torch.allclose(scores, expected, atol=1e-3), (scores, expected)
    assert content == extension["candidates"][extension["chosen_index"]]
    top = sorted(expected.tolist(), reverse=True)
    assert len(top) == 1 or top[0] - top[1] > 1e-3, "near-tie: the recomputation cannot decide"
    assert extension["chosen_index"] == int(expected.argmax())


# ------------------------------------------------------------------ tests


def test_chat_completion_returns_the_candidate_the_ranker_scores_highest(
    served: Any, tiny: ChatModel, hf_model: Any, rankers: dict[str, Path]
) -> None:
    ranker = load_ranker(rankers["with_instruction"], tiny)
    for seed, prompt in enumerate(PROMPTS):
        out = ask(served, prompt, seed=seed)
        ext = out.model_extra["safeguard"]
        assert ext["enabled"] and ext["n_sampled"] == 4 and out.model == "tiny"
        again = sampled_again(tiny, prompt, 4, 8, seed)
        keep = first_occurrences(again.completions)
        assert ext["candidates"] == [again.completions[i] for i in keep] and ext["sample_index"] == keep
        check_choice(
            ext, out.choices[0].message.content, rescored(tiny, hf_model, ranker, prompt, ext["candidates"])
        )
        chosen = keep[ext["chosen_index"]]
        assert out.usage.completion_tokens == again.n_tokens[chosen]
        assert out.choices[0].finish_reason == ("length" if again.truncated[chosen] else "stop")
        assert out.usage.prompt_tokens == len(tiny.chat.token_ids(tiny.chat.format(prompt)))
        assert (
            ext["ranker"]["sha256"]
            == hashlib.sha256((rankers["with_instruction"] / "ranker.safetensors").read_bytes()).hexdigest()
        )


def test_generated_mean_ranker_scores_the_states_read_while_sampling(
    tiny: ChatModel, hf_model: Any, rankers: dict[str, Path]
) -> None:
    """The pooled context: mean of the response tokens' states, recomputed by a teacher-forced
    vanilla pass over the sampled token ids (a cut candidate's last token is never read)."""
    config = ServeConfig(
        ranker=rankers["generated_mean"], n=5, max_tokens=6, served_name="tiny", expose_candidates=True
    )
    app, _ = build_server(tiny, config, api_key=KEY)
    ranker = load_ranker(rankers["generated_mean"], tiny)
    with BackgroundServer(app) as server:
        out = ask(server, PROMPTS[0], seed=11)
    ext = out.model_extra["safeguard"]
    again = sampled_again(tiny, PROMPTS[0], 5, 6, 11)
    expected = rescored_mean(tiny, hf_model, ranker, PROMPTS[0], again, ext["sample_index"])
    check_choice(ext, out.choices[0].message.content, expected)


def test_streaming_sends_the_chosen_answer_after_the_choice(served: Any) -> None:
    whole = ask(served, PROMPTS[1], seed=5)
    chunks = list(ask(served, PROMPTS[1], seed=5, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and len(chunks) >= 4
    assert chunks[0].choices[0].delta.role == "assistant"
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(final) == 1 and final[0].choices[0].finish_reason == whole.choices[0].finish_reason
    assert final[0].model_extra["safeguard"]["chosen_index"] == whole.model_extra["safeguard"]["chosen_index"]
    assert (
        chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    )


def test_safeguard_off_and_n_1_return_the_first_sample_unscored(served: Any, tiny: ChatModel) -> None:
    off = ask(served, PROMPTS[3], seed=2, safeguard="off")
    ext = off.model_extra["safeguard"]
    assert not ext["enabled"] and ext["scores"] is None and ext["n_sampled"] == 4
    assert off.choices[0].message.content == sampled_again(tiny, PROMPTS[3], 4, 8, 2).completions[0]
    single = ask(served, PROMPTS[3], seed=2, n=1, max_tokens=5)
    ext = single.model_extra["safeguard"]
    assert ext["n_sampled"] == 1 and len(ext["scores"]) == 1 and ext["chosen_index"] == 0
    assert single.choices[0].message.content == sampled_again(tiny, PROMPTS[3], 1, 5, 2).completions[0]


def _error(response: httpx.Response, status: int, code: str | None, param: str | None = None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["code"] == code and (param is None or error["param"] == param), error
    return str(error["message"])


def test_bad_requests_get_openai_errors(served: Any) -> None:
    url = f"{served.base_url}/chat/completions"
    auth = {"Authorization": f"Bearer {KEY}"}
    ok = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(headers=auth, timeout=60) as http:
        post = http.post
        assert "not valid JSON" in _error(post(url, content=b'{"model": "tiny",'), 400, "invalid_json")
        assert "UTF-8" in _error(post(url, content=b'{"model": "t\xff\xfe"}'), 400, "invalid_encoding")
        _error(post(url, json=[1, 2]), 400, "invalid_json")
        _error(post(url, json={"model": "tiny"}), 400, "missing_required_parameter", "messages")
        _error(post(url, json={"messages": ok["messages"]}), 400, "missing_required_parameter", "model")
        _error(post(url, json={**ok, "model": "gpt-4"}), 404, "model_not_found", "model")
        _error(post(url, json={**ok, "messages": []}), 400, "invalid_type", "messages")
        system = [{"role": "system", "content": "be nice"}, *ok["messages"]]
        assert "--system-prompt" in _error(
            post(url, json={**ok, "messages": system}), 400, "unsupported_parameter"
        )
        turns = [*ok["messages"], {"role": "assistant", "content": "x"}, *ok["messages"]]
        _error(post(url, json={**ok, "messages": turns}), 400, "unsupported_parameter", "messages")
        _error(post(url, json={**ok, "top_p": 0.5}), 400, "unsupported_parameter", "top_p")
        _error(post(url, json={**ok, "tool_choice": "auto"}), 400, "unsupported_parameter", "tool_choice")
        _error(post(url, json={**ok, "best_of": 3}), 400, "unknown_parameter", "best_of")
        assert "between 1 and 16" in _error(post(url, json={**ok, "n": 0}), 400, "out_of_range", "n")
        _error(post(url, json={**ok, "n": 17}), 400, "out_of_range", "n")
        _error(post(url, json={**ok, "n": "8"}), 400, "invalid_type", "n")
        _error(post(url, json={**ok, "max_tokens": 0}), 400, "out_of_range", "max_tokens")
        _error(post(url, json={**ok, "temperature": 0}), 400, "out_of_range", "temperature")
        _error(post(url, json={**ok, "safeguard": "maybe"}), 400, "invalid_value", "safeguard")
        _error(post(url, json={**ok, "stream_options": {"include_usage": True}}), 400, "invalid_value")
        long = {**ok, "messages": [{"role": "user", "content": "word " * 3000}]}
        assert "context of 2048" in _error(post(url, json=long), 400, "context_length_exceeded", "messages")
        _error(post(url, content=b" " * (1 << 20) + b"{}"), 413, "request_too_large")
        _error(http.get(url), 405, "method_not_allowed")
        _error(http.get(f"{served.base_url}/completions"), 404, "not_found")
        assert post(url, json={**ok, "top_p": 1, "user": "u1", "max_tokens": 3}).status_code == 200
    with pytest.raises(openai.BadRequestError) as caught:  # the openai client reads the same shape
        ask(served, "hi", n=99)
    assert caught.value.code == "out_of_range" and caught.value.param == "n"
    with pytest.raises(openai.NotFoundError):
        client(served).chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}])


def test_bearer_token_is_required_when_configured(served: Any) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        client(served, api_key="wrong").chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x"}]
        )
    assert caught.value.code == "invalid_api_key"
    bare = httpx.post(f"{served.base_url}/chat/completions", json={}, timeout=30)
    assert "Authorization: Bearer" in _error(bare, 401, "invalid_api_key")
    _error(httpx.get(f"{served.base_url}/models", timeout=30), 401, "invalid_api_key")
    assert [m.id for m in client(served).models.list()] == ["tiny"]
    assert httpx.get(f"{served.base_url.removesuffix('/v1')}/health", timeout=30).json()["status"] == "ok"


def test_concurrent_requests_are_batched_and_each_gets_its_top_candidate(
    served: Any, tiny: ChatModel, hf_model: Any, rankers: dict[str, Path]
) -> None:
    ranker = load_ranker(rankers["with_instruction"], tiny)
    prompts = [f"{PROMPTS[i % 4]} ({i})" for i in range(10)]
    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda p: ask(served, p, max_tokens=24), prompts))
    sizes = [a.model_extra["safeguard"]["timing"]["batch_size"] for a in answers]
    assert max(sizes) > 1, sizes  # requests that arrived during a step were answered together
    for prompt, out in zip(prompts, answers, strict=True):
        ext = out.model_extra["safeguard"]
        check_choice(
            ext, out.choices[0].message.content, rescored(tiny, hf_model, ranker, prompt, ext["candidates"])
        )


def _flood(server: BackgroundServer, count: int, **body: Any) -> list[httpx.Response]:
    payload = {"model": "tiny", "messages": [{"role": "user", "content": "go"}], **body}
    barrier = threading.Barrier(count)

    def one(_: int) -> httpx.Response:
        barrier.wait()
        return httpx.post(f"{server.base_url}/chat/completions", json=payload, timeout=120)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def test_full_queue_answers_429_and_a_late_request_504(tiny: ChatModel, rankers: dict[str, Path]) -> None:
    config = ServeConfig(ranker=rankers["with_instruction"], served_name="tiny", max_batch=1, max_queue=1)
    app, state = build_server(tiny, config)
    with BackgroundServer(app) as server:
        responses = _flood(server, 8, n=8, max_tokens=64)
        codes = sorted(r.status_code for r in responses)
        assert set(codes) == {200, 429} and codes.count(429) >= 4, codes  # 1 running + 1 queued at most
        for r in responses:
            if r.status_code == 429:
                assert "queue is full" in _error(r, 429, "queue_full")
            else:
                assert r.json()["choices"][0]["message"]["content"] is not None
        assert state.scheduler.counts["rejected"] == codes.count(429)
    config = ServeConfig(ranker=rankers["with_instruction"], served_name="tiny", request_timeout=0.01)
    app, state = build_server(tiny, config)
    with BackgroundServer(app) as server:
        (late,) = _flood(server, 1, n=8, max_tokens=64)
        assert "0.01 s" in _error(late, 504, "request_timeout")
        health = httpx.get(f"{server.base_url.removesuffix('/v1')}/health", timeout=30).json()
        assert health["status"] == "ok" and health["timed_out"] == 1  # the worker lives on


def _stop_while_busy(server: BackgroundServer, count: int) -> list[httpx.Response]:
    """``count`` slow requests; the server is stopped once all of them are inside it (one running,
    the rest queued), so none can race the stop to a closed socket."""
    health = f"{server.base_url.removesuffix('/v1')}/health"
    deadline = time.monotonic() + 60
    with ThreadPoolExecutor(count) as pool:
        pending = [pool.submit(_flood, server, 1, n=8, max_tokens=64) for _ in range(count)]
        while (now := httpx.get(health, timeout=30).json())["in_flight"] + now["queued"] < count:
            assert time.monotonic() < deadline, f"the {count} requests were never all in the server: {now}"
            time.sleep(0.005)
        assert not all(f.done() for f in pending)
        server.stop()
        return [f.result()[0] for f in pending]


def test_shutdown_finishes_requests_in_flight_or_answers_503(
    tiny: ChatModel, rankers: dict[str, Path]
) -> None:
    """Stopping: no new connections; requests in progress finish within the grace period, the rest
    are answered 503 (never a dropped connection)."""
    for grace in (30.0, 0.0):
        config = ServeConfig(ranker=rankers["with_instruction"], served_name="tiny", max_batch=1)
        app, state = build_server(tiny, config)
        with BackgroundServer(app, shutdown_timeout=grace) as server:
            codes = [r.status_code for r in _stop_while_busy(server, 4)]
            if grace:
                assert codes == [200] * 4, codes
            else:
                assert set(codes) <= {200, 503} and codes.count(503) >= 3, codes
            with pytest.raises(httpx.TransportError):
                httpx.get(f"{server.base_url}/models", timeout=5)
        assert not state.scheduler.alive


def test_audit_log_records_scores_choices_and_judge_verdicts(
    tiny: ChatModel, rankers: dict[str, Path], tmp_path: Path
) -> None:
    audit = tmp_path / "audit.jsonl"
    judge = vowel_judge()
    app, _ = build_server(tiny, audited(rankers, audit, judge))
    with BackgroundServer(app) as server:
        answers = [ask(server, p, seed=i) for i, p in enumerate(PROMPTS[:3])]
        off = ask(server, PROMPTS[0], seed=9, safeguard="off")
        with pytest.raises(openai.BadRequestError):
            ask(server, "x", n=0)
    lines = [json.loads(x) for x in audit.read_text().splitlines()]
    assert len(lines) == 5 and len({x["request_id"] for x in lines}) == 5
    for prompt, out, line in zip(PROMPTS, answers, lines, strict=False):
        ext = out.model_extra["safeguard"]
        assert line["status"] == 200 and line["request_id"] == out.id and line["safeguard"] is True
        assert line["prompt_sha256"] == hashlib.sha256(prompt.encode()).hexdigest()
        assert line["scores"] == ext["scores"] and line["chosen_index"] == ext["chosen_index"]
        assert line["candidate_sha256"] == [hashlib.sha256(c.encode()).hexdigest() for c in ext["candidates"]]
        assert line["judge"] == "vowels"
        assert [v["refused"] for v in line["verdicts"]] == [v.refused for v in judge(ext["candidates"])]
        assert prompt not in json.dumps(line)  # hashes, never texts
    assert lines[3]["safeguard"] is False and lines[3]["scores"] is None and lines[3]["request_id"] == off.id
    assert lines[4]["status"] == 400 and lines[4]["code"] == "out_of_range"


def test_an_engine_that_cannot_read_states_refuses_a_sampled_context_ranker(
    tiny: ChatModel, rankers: dict[str, Path]
) -> None:
    class NoStates(GenerateEngine):
        exposes_states = False

    with pytest.raises(LensSafetyError, match="cannot read hidden states while sampling"):
        Safeguard(tiny, load_ranker(rankers["generated_mean"]), NoStates(tiny))
    Safeguard(tiny, load_ranker(rankers["with_instruction"]), NoStates(tiny))  # a teacher-forced pass instead


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_cli_refuses_bad_settings_before_loading_the_model(
    rankers: dict[str, Path], tiny_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["srr", "serve", str(tiny_dirs["llama"]), "--ranker", str(rankers["with_instruction"])]
    cases = [
        (["--engine", "tgi"], "unknown generation engine 'tgi'; use one of hf, vllm"),
        (["--n", "20"], "--max-n"),
        (["--api-key-env", "LENS_SAFETY_TEST_NO_SUCH_VARIABLE"], "not set"),
        (["--audit-judge", "substring"], "--audit-log"),
        (["--audit-log", str(tmp_path / "missing" / "a.jsonl")], "does not exist"),
    ]
    if importlib.util.find_spec("vllm") is None:
        cases.append((["--engine", "vllm"], "vLLM is not installed"))
    for extra, message in cases:
        code, _, err = run_cli([*base, *extra], capsys)
        assert code == 2 and err.startswith("error: ") and message in err, err
    code, _, err = run_cli(["srr", "serve", "smollm2", "--ranker", str(tmp_path)], capsys)
    assert code == 2 and "holds no SRR ranker" in err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        code, _, err = run_cli([*base, "--port", str(busy.getsockname()[1])], capsys)
    assert code == 2 and "cannot listen" in err


def wait_until_healthy(process: subprocess.Popen[str], port: int, seconds: float) -> None:
    """Wait until the server process answers ``/health`` on 127.0.0.1:``port`` (its stderr if it exits)."""
    deadline = time.monotonic() + seconds
    while True:
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        assert time.monotonic() < deadline, f"the server did not start within {seconds} s"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)


@pytest.mark.slow  # a fresh process imports torch and loads the model: ~1 min on a busy 2-core machine
def test_cli_server_finishes_requests_in_flight_on_sigterm(
    rankers: dict[str, Path], tiny_dirs: dict[str, Path], tmp_path: Path
) -> None:
    port = _free_port()
    audit = tmp_path / "audit.jsonl"
    argv = [
        sys.executable,
        "-m",
        "lens_safety",
        "srr",
        "serve",
        str(tiny_dirs["llama"]),
        "--ranker",
        str(rankers["with_instruction"]),
        "--port",
        str(port),
        "--served-name",
        "tiny",
        "--n",
        "8",
        "--max-tokens",
        "96",
        "--max-batch",
        "2",
        "--api-key-env",
        "SERVE_TEST_KEY",
        "--audit-log",
        str(audit),
        "--json",
    ]
    env = {**os.environ, "SERVE_TEST_KEY": KEY}
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_until_healthy(process, port, 120)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        payload = {"model": "tiny", "messages": [{"role": "user", "content": "tell me"}]}
        with ThreadPoolExecutor(5) as pool:
            pending = [
                pool.submit(
                    httpx.post, url, json=payload, headers={"Authorization": f"Bearer {KEY}"}, timeout=120
                )
                for _ in range(5)
            ]
            while httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()["in_flight"] == 0:
                time.sleep(0.005)
            assert not all(f.done() for f in pending)
            process.send_signal(signal.SIGTERM)
            responses = [f.result() for f in pending]
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert [r.status_code for r in responses] == [200] * 5, [r.text for r in responses]
    assert process.returncode == 0, err
    summary = json.loads(out)
    assert summary["counts"]["answered"] == 5 and summary["audit_lines"] == 5
    assert len(audit.read_text().splitlines()) == 5
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)


def test_serve_help_loads_no_torch() -> None:
    code = (
        "import sys\nfrom lens_safety.cli import main\n"
        "try:\n    main(['srr', 'serve', '--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules and 'starlette' not in sys.modules, 'heavy import at --help'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and "--ranker" in result.stdout, result.stderr
