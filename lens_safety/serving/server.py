"""Put the SRR safeguard in front of a model: load, build the application, serve it with uvicorn.

:func:`build_server` loads the model and its ranker (a ranker trained on another base model is
refused), the generation engine, the scheduler and the optional audit log, and returns the ASGI
application with its :class:`~lens_safety.serving.app.ServerState`. :func:`serve` runs it with
uvicorn until SIGINT / SIGTERM: the server stops listening, lets the requests in progress finish
for up to ``shutdown_timeout`` seconds, answers those still waiting with 503 (none is dropped),
then the application's shutdown stops the worker and writes the audit log out. :class:`BackgroundServer` runs an application on a thread of the
calling process (tests, notebooks, benchmarks); both stop the same way (:class:`GracefulServer`).

Why Starlette + uvicorn: the server needs three routes, a lifespan and full control of every error
body (OpenAI's shape, including for non-UTF-8 and malformed JSON bodies, which a schema-validating
framework answers in its own shape before user code runs). Starlette is the maintained ASGI toolkit
FastAPI itself is built on, with nothing more than that; uvicorn is its reference server and does
graceful shutdown. vLLM's own server would need vLLM as the engine, which this package does not
require.
"""

from __future__ import annotations

import asyncio
import copy
import ipaddress
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette

from lens_safety.chat import ChatFormatter
from lens_safety.errors import LensSafetyError, warn
from lens_safety.evaluation.verdict import Judge
from lens_safety.hashing import sha256_file
from lens_safety.models import ChatModel, load_model
from lens_safety.serving.app import ServerState, build_app, locked
from lens_safety.serving.audit import AuditLog
from lens_safety.serving.engine import check_engine, load_engine
from lens_safety.serving.protocol import Limits
from lens_safety.serving.safeguard import Safeguard
from lens_safety.serving.scheduler import Scheduler
from lens_safety.srr.ranker import WEIGHTS_FILE, SafetyRanker, load_ranker, read_ranker_record


@dataclass
class ServeConfig:
    """Settings of the safeguard server (the CLI's options).

    Attributes:
        ranker: directory written by ``lens-safety srr train``.
        n: candidates sampled per request by default (a request's ``n`` overrides it).
        max_n: largest ``n`` a request may ask for.
        engine: generation engine (``hf``).
        served_name: the model id clients send (default: the model spec).
        max_tokens: new tokens per candidate by default (SRR rankers are trained on 48).
        max_tokens_limit: largest ``max_tokens`` a request may ask for.
        max_batch: requests answered together in one worker step.
        max_queue: requests waiting for a step before new ones get 429.
        request_timeout: seconds from arrival to answer before a 504.
        shutdown_timeout: seconds requests in progress get to finish at shutdown.
        audit_log: JSONL file to append one line per request to.
        audit_judge: judge spec whose verdicts on every candidate go into the audit log.
        expose_candidates: return all candidates in the response (evaluation only: it hands the
            unchosen, possibly unsafe, candidates to the client).
    """

    ranker: Path
    n: int = 8
    max_n: int = 16
    engine: str = "hf"
    host: str = "127.0.0.1"
    port: int = 8000
    served_name: str | None = None
    max_tokens: int = 48
    max_tokens_limit: int = 512
    max_batch: int = 8
    max_queue: int = 64
    request_timeout: float = 300.0
    shutdown_timeout: float = 30.0
    audit_log: Path | None = None
    audit_judge: str | Judge | None = None
    expose_candidates: bool = False

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        if self.audit_judge is not None and not isinstance(self.audit_judge, str):
            out["audit_judge"] = self.audit_judge.name
        return {k: str(v) if isinstance(v, Path) else v for k, v in out.items()}

    def check(self) -> None:
        """Raise a one-line error for settings that cannot work."""
        if not 1 <= self.n <= self.max_n:
            raise LensSafetyError(
                f"--n {self.n} is outside 1..--max-n ({self.max_n})", "pass 1 <= --n <= --max-n"
            )
        if not 1 <= self.max_tokens <= self.max_tokens_limit:
            raise LensSafetyError(
                f"--max-tokens {self.max_tokens} is outside 1..{self.max_tokens_limit}", "lower --max-tokens"
            )
        if self.max_batch < 1 or self.max_queue < 1 or self.request_timeout <= 0 or self.shutdown_timeout < 0:
            raise LensSafetyError(
                "--max-batch and --max-queue must be >= 1, --request-timeout > 0 and --shutdown-timeout >= 0",
                "pass positive values",
            )
        if self.audit_judge is not None and self.audit_log is None:
            raise LensSafetyError(
                "--audit-judge needs --audit-log", "name the audit log file with --audit-log"
            )
        check_engine(self.engine)
        read_ranker_record(self.ranker)


def ranker_summary(ranker: SafetyRanker, directory: Path) -> dict[str, Any]:
    """Identity of a ranker for responses and logs: weights SHA-256, layer, context, members."""
    config = ranker.config
    return {
        "sha256": sha256_file(directory / WEIGHTS_FILE),
        "layer": config.layer,
        "context": config.context,
        "features": config.features,
        "members": config.members,
    }


def prompt_counter(model: ChatModel) -> Any:
    """Counts a user message's chat-formatted tokens exactly as sampling and the ranker's features
    see them, with a copy of the tokenizer (the worker thread uses the model's own)."""
    formatter = ChatFormatter(
        copy.deepcopy(model.tokenizer),
        model.chat.system_prompt,
        model.chat.use_chat_template,
        model.chat.max_length,
    )
    return locked(lambda text: len(formatter.token_ids(formatter.format(text))))


def build_server(
    model: ChatModel, config: ServeConfig, api_key: str | None = None
) -> tuple[Starlette, ServerState]:
    """The application serving ``model`` behind the ranker of ``config`` (module docstring)."""
    config.check()
    ranker = load_ranker(config.ranker, model)
    engine = load_engine(config.engine, model)
    safeguard = Safeguard(model, ranker, engine)
    audit = AuditLog(config.audit_log, config.audit_judge) if config.audit_log is not None else None
    state = ServerState(
        limits=Limits(
            served_name=config.served_name or model.spec,
            default_n=config.n,
            max_n=config.max_n,
            default_max_tokens=config.max_tokens,
            max_tokens=config.max_tokens_limit,
        ),
        scheduler=Scheduler(
            safeguard.answer,
            max_batch=config.max_batch,
            max_queue=config.max_queue,
            timeout=config.request_timeout,
        ),
        count_prompt_tokens=prompt_counter(model),
        context_length=model.chat.max_length,
        ranker=ranker_summary(ranker, Path(config.ranker)),
        api_key=api_key,
        audit=audit,
        engine=engine,
        expose_candidates=config.expose_candidates,
    )
    return build_app(state), state


@dataclass
class ServeResult:
    """What a server did before it stopped."""

    address: str
    served_name: str
    seconds: float
    counts: dict[str, int]
    audit_lines: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_port(host: str, port: int) -> None:
    """Raise a one-line error when ``host:port`` cannot be bound (checked before the model loads)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise LensSafetyError(
                f"cannot listen on {host}:{port} ({exc.strerror or exc})",
                "choose a free --port or another --host",
            ) from None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve(
    model_spec: str,
    config: ServeConfig,
    *,
    api_key: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    system_prompt: str | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> ServeResult:
    """Load ``model_spec`` and serve it until SIGINT / SIGTERM (module docstring); ``on_ready(url)``
    is called once the socket listens."""
    config.check()
    check_port(config.host, config.port)
    if not _is_loopback(config.host) and api_key is None:
        warn(f"serving on {config.host} without a bearer token: anyone who reaches it can use the model")
    model = load_model(model_spec, device=device, dtype=dtype, system_prompt=system_prompt)
    app, state = build_server(model, config, api_key)
    server = GracefulServer(app, config.host, config.port, config.shutdown_timeout)
    started = time.time()
    watcher = threading.Thread(target=_announce, args=(server, on_ready), daemon=True)
    watcher.start()
    try:
        with _stop_signals_return():
            server.run()
    except SystemExit:  # uvicorn exits when it cannot listen
        server.started = False
    if not server.started:
        raise LensSafetyError(
            f"could not listen on {config.host}:{config.port}", "choose a free --port (or another --host)"
        )
    return ServeResult(
        f"http://{config.host}:{config.port}",
        state.limits.served_name,
        time.time() - started,
        dict(state.scheduler.counts),
        state.audit.lines if state.audit is not None else None,
    )


class GracefulServer(uvicorn.Server):
    """uvicorn's server with the safeguard's shutdown: stop listening, give the requests in progress
    ``grace`` seconds, then answer what is still unanswered with 503 (:meth:`Scheduler.abort`),
    so no client sees a dropped connection; then the application's own shutdown runs."""

    def __init__(self, app: Starlette, host: str, port: int, grace: float) -> None:
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            timeout_graceful_shutdown=int(grace) + 10,
            lifespan="on",
        )
        super().__init__(config)
        self.grace = grace
        self.state: ServerState | None = getattr(app.state, "serving", None)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.state is None:
            await super().shutdown(sockets)
            return
        self.state.stopping = True
        timer = asyncio.get_running_loop().call_later(self.grace, self.state.scheduler.abort)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()


@contextmanager
def _stop_signals_return() -> Iterator[None]:
    """uvicorn re-raises the SIGINT / SIGTERM that stopped it once it has shut down gracefully, to
    the handlers in place before it ran: make those ignore it, so a stopped server returns."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _announce(server: uvicorn.Server, on_ready: Callable[[str], None] | None) -> None:
    while not server.started and not server.should_exit:
        time.sleep(0.05)
    if server.started and on_ready is not None:
        host, port = server.servers[0].sockets[0].getsockname()[:2]
        on_ready(f"http://{host}:{port}/v1")


class BackgroundServer:
    """Runs an ASGI application with uvicorn on a thread of this process, on 127.0.0.1.

    ``with BackgroundServer(app) as server: ... server.base_url`` (``http://127.0.0.1:PORT/v1``);
    leaving the block shuts it down gracefully (requests in progress finish, then the lifespan's
    shutdown runs). ``port=0`` takes a free port.
    """

    def __init__(self, app: Starlette, port: int = 0, shutdown_timeout: float = 30.0) -> None:
        self.server = GracefulServer(app, "127.0.0.1", port, shutdown_timeout)
        self._thread = threading.Thread(target=self.server.run, name="lens-safety-server", daemon=True)
        self.port = port

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        while not self.server.started:
            if not self._thread.is_alive():
                raise LensSafetyError("the server stopped while starting", "see its log for the reason")
            time.sleep(0.02)
        self.port = int(self.server.servers[0].sockets[0].getsockname()[1])
        return self

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join()

    def __exit__(self, *exc: object) -> None:
        self.stop()
