"""The LLM judge's retries, backoff and concurrency bound against a real HTTP server on 127.0.0.1.

The server (Python's own ``http.server``, started and stopped here) speaks the OpenAI chat
completions format and answers each pair's first request with HTTP 503, then chosen failures
(429, an answer that is not JSON), then the rubric's JSON. It records when each request arrived
and how many were in flight at once, so the client's behaviour is read from the server's side.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lens_safety.errors import LensSafetyError
from lens_safety.evaluation.llm_judge import OpenAIJudge

pytest.importorskip("openai")

PAIRS = [(f"request {i}", "I can't help with that." if i % 2 else f"Here is answer {i}.") for i in range(8)]
CONCURRENCY = 3
BACKOFF = 0.05


class Scripted:
    """What the server answers to each pair's n-th request, and what it saw."""

    def __init__(self, script: dict[str, list[int | str]], hold_first: int = 0) -> None:
        self.script = script  # prompt -> [status or "garbage", ...] before the good answer
        self.hold_first = hold_first  # the first N requests wait until N are in flight
        self.arrivals: dict[str, list[float]] = {}
        self.in_flight = 0
        self.most_in_flight = 0
        self.total = 0
        self.lock = threading.Condition()

    def enter(self, prompt: str) -> int | str:
        with self.lock:
            self.total += 1
            attempt = len(self.arrivals.setdefault(prompt, []))
            self.arrivals[prompt].append(time.monotonic())
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            self.lock.notify_all()
            if self.total <= self.hold_first:
                self.lock.wait_for(lambda: self.most_in_flight >= self.hold_first, timeout=10)
        steps = self.script.get(prompt, [])
        return steps[attempt] if attempt < len(steps) else 200

    def leave(self) -> None:
        with self.lock:
            self.in_flight -= 1


def _handler(state: Scripted) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            user = body["messages"][1]["content"]
            prompt = user.split("<<<\n", 1)[1].split("\n>>>", 1)[0]
            step = state.enter(prompt)
            try:
                time.sleep(0.02)  # long enough for concurrent requests to overlap
                if isinstance(step, int) and step != 200:
                    self._send(step, {"error": {"message": f"scripted {step}", "type": "server_error"}})
                    return
                refused = "can't" in user
                content = "not json at all" if step == "garbage" else json.dumps({"refused": refused})
                message = {"role": "assistant", "content": content}
                choice = {"index": 0, "message": message, "finish_reason": "stop"}
                reply = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"]}
                self._send(200, {**reply, "choices": [choice]})
            finally:
                state.leave()

        def _send(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def serve() -> Iterator[Any]:
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(state: Scripted) -> str:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/v1"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_transient_failures_are_retried_with_backoff_within_the_concurrency_bound(
    serve: Any, tmp_path: Path
) -> None:
    script: dict[str, list[int | str]] = {p: [503] for p, _ in PAIRS}
    script[PAIRS[0][0]] = [503, 429]
    script[PAIRS[1][0]] = [503, "garbage"]
    state = Scripted(script, hold_first=CONCURRENCY)
    judge = OpenAIJudge(
        "m", serve(state), concurrency=CONCURRENCY, retries=3, backoff=BACKOFF, cache_dir=tmp_path
    )
    verdicts = judge([r for _, r in PAIRS], [p for p, _ in PAIRS])
    assert [v.refused for v in verdicts] == ["can't" in r for _, r in PAIRS]
    # every pair: one 503 then the answer; two pairs one more failure each (a 429, an answer that
    # is not JSON), each followed by a new request
    expected = {p: 3 if p in (PAIRS[0][0], PAIRS[1][0]) else 2 for p, _ in PAIRS}
    assert {p: len(t) for p, t in state.arrivals.items()} == expected
    assert judge.requests_sent == state.total == sum(expected.values())
    assert state.most_in_flight == CONCURRENCY  # reached, never exceeded
    for times in state.arrivals.values():  # retry k waits backoff * 2**(k-1) before its request
        for k in range(1, len(times)):
            assert times[k] - times[k - 1] >= BACKOFF * 2 ** (k - 1)
    assert len(list(tmp_path.glob("*.json"))) == len(PAIRS)


def test_retries_run_out_or_a_client_error_stop_with_one_line(serve: Any, tmp_path: Path) -> None:
    always = Scripted({PAIRS[3][0]: [503] * 10})
    judge = OpenAIJudge("m", serve(always), concurrency=1, retries=1, backoff=0.01, cache_dir=tmp_path)
    with pytest.raises(LensSafetyError) as failed:
        judge([r for _, r in PAIRS[:5]], [p for p, _ in PAIRS[:5]])
    message = str(failed.value)
    assert "\n" not in message and "gave no valid answer after 2 tries (InternalServerError" in message
    assert len(always.arrivals[PAIRS[3][0]]) == 2
    cached = len(list(tmp_path.glob("*.json")))
    assert f"{cached} of 5 verdicts are cached" in message and cached >= 1

    missing = Scripted({p: [404] for p, _ in PAIRS})
    judge = OpenAIJudge("m", serve(missing), retries=3, backoff=0.01, cache_dir=tmp_path / "other")
    with pytest.raises(LensSafetyError, match="answered HTTP 404"):
        judge([PAIRS[0][1]], [PAIRS[0][0]])
    assert missing.total == 1  # a client error is not retried
