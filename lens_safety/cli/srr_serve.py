"""``lens-safety srr serve``: the SRR safeguard as an OpenAI-compatible server (registered in ``cli/srr.py``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from lens_safety.cli.common import DeviceOpt, DtypeOpt, JsonOpt, ModelArg, print_json, quiet_libraries
from lens_safety.errors import LensSafetyError


def _api_key(name: str | None) -> str | None:
    if name is None:
        return None
    key = os.environ.get(name, "").strip()
    if not key:
        raise LensSafetyError(
            f"--api-key-env {name}: the environment variable {name} is not set or empty",
            f"export {name}=<key> before starting the server",
        )
    return key


def serve_command(
    model: ModelArg,
    ranker: Annotated[Path, typer.Option("--ranker", help="Ranker directory written by `srr train`.")],
    n: Annotated[
        int, typer.Option("--n", help="Candidates sampled per request (a request's `n` overrides it).")
    ] = 8,
    max_n: Annotated[int, typer.Option("--max-n", help="Largest `n` a request may ask for.")] = 16,
    engine: Annotated[str, typer.Option("--engine", help="Generation engine: hf.")] = "hf",
    host: Annotated[str, typer.Option("--host", help="Address to bind (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8000,
    served_name: Annotated[
        str | None, typer.Option("--served-name", help="Model id clients send (default: MODEL).")
    ] = None,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", help="New tokens per candidate unless the request says.")
    ] = 48,
    max_tokens_limit: Annotated[
        int, typer.Option("--max-tokens-limit", help="Largest max_tokens a request may ask for.")
    ] = 512,
    max_batch: Annotated[
        int, typer.Option("--max-batch", help="Requests sampled and scored together per step.")
    ] = 8,
    max_queue: Annotated[
        int, typer.Option("--max-queue", help="Requests waiting before new ones get HTTP 429.")
    ] = 64,
    request_timeout: Annotated[
        float, typer.Option("--request-timeout", help="Seconds until an unanswered request gets HTTP 504.")
    ] = 300.0,
    shutdown_timeout: Annotated[
        float,
        typer.Option("--shutdown-timeout", help="Seconds requests in progress get to finish at shutdown."),
    ] = 30.0,
    api_key_env: Annotated[
        str | None,
        typer.Option(
            "--api-key-env", help="Require 'Authorization: Bearer KEY', KEY read from this variable."
        ),
    ] = None,
    audit_log: Annotated[
        Path | None, typer.Option("--audit-log", help="Append one JSON line per request to this file.")
    ] = None,
    audit_judge: Annotated[
        str | None,
        typer.Option(
            "--audit-judge", help="Judge spec whose verdicts on every candidate go into the audit log."
        ),
    ] = None,
    expose_candidates: Annotated[
        bool,
        typer.Option(
            "--expose-candidates",
            help="Return every candidate in the response (evaluation only: clients see unchosen answers).",
        ),
    ] = False,
    system_prompt: Annotated[
        str | None, typer.Option("--system-prompt", help="System prompt of every request (the ranker's).")
    ] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Serve MODEL behind its SRR ranker: each answer is the safest of N sampled candidates."""
    key = _api_key(api_key_env)
    quiet_libraries()
    from lens_safety.serving.server import ServeConfig, serve

    config = ServeConfig(
        ranker=ranker,
        n=n,
        max_n=max_n,
        engine=engine,
        host=host,
        port=port,
        served_name=served_name,
        max_tokens=max_tokens,
        max_tokens_limit=max_tokens_limit,
        max_batch=max_batch,
        max_queue=max_queue,
        request_timeout=request_timeout,
        shutdown_timeout=shutdown_timeout,
        audit_log=audit_log,
        audit_judge=audit_judge,
        expose_candidates=expose_candidates,
    )

    def ready(url: str) -> None:
        typer.echo(
            f"serving {served_name or model} behind the SRR ranker {ranker} at {url} (Ctrl-C stops)", err=True
        )

    result = serve(
        model, config, api_key=key, device=device, dtype=dtype, system_prompt=system_prompt, on_ready=ready
    )
    if json_out:
        print_json(result.to_dict())
    else:
        counts = result.counts
        typer.echo(
            f"stopped after {result.seconds:.0f} s: {counts['answered']} answered, {counts['failed']} failed, "
            f"{counts['rejected']} rejected (queue full), {counts['timed_out']} timed out, "
            f"{counts['dropped']} finished after their client stopped waiting"
        )
