"""``lens-safety srr serve``: the SRR safeguard as an OpenAI-compatible server."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from lens_safety.cli import options, srr_app
from lens_safety.cli.common import print_json, quiet_libraries
from lens_safety.errors import LensSafetyError

RankerOpt = Annotated[Path, typer.Option("--ranker", help="Ranker directory written by `srr train`.")]
ServeNOpt = Annotated[
    int, typer.Option("--n", help="Candidates sampled per request (a request's `n` overrides it).")
]
MaxNOpt = Annotated[int, typer.Option("--max-n", help="Largest `n` a request may ask for.")]
ServeEngineOpt = Annotated[
    str,
    typer.Option(
        "--engine",
        help="Generation engine: hf (features read while sampling) or vllm (the vllm extra; features from one teacher-forced pass).",
    ),
]
HostOpt = Annotated[str, typer.Option("--host", help="Address to bind (loopback by default).")]
PortOpt = Annotated[int, typer.Option("--port", help="TCP port.")]
ServedNameOpt = Annotated[
    str | None, typer.Option("--served-name", help="Model id clients send (default: MODEL).")
]
MaxTokensOpt = Annotated[
    int, typer.Option("--max-tokens", help="New tokens per candidate unless the request says.")
]
MaxTokensLimitOpt = Annotated[
    int, typer.Option("--max-tokens-limit", help="Largest max_tokens a request may ask for.")
]
MaxBatchOpt = Annotated[
    int, typer.Option("--max-batch", help="Requests sampled and scored together per step.")
]
MaxQueueOpt = Annotated[
    int, typer.Option("--max-queue", help="Requests waiting before new ones get HTTP 429.")
]
RequestTimeoutOpt = Annotated[
    float, typer.Option("--request-timeout", help="Seconds until an unanswered request gets HTTP 504.")
]
ShutdownTimeoutOpt = Annotated[
    float, typer.Option("--shutdown-timeout", help="Seconds requests in progress get to finish at shutdown.")
]
ApiKeyEnvOpt = Annotated[
    str | None,
    typer.Option("--api-key-env", help="Require 'Authorization: Bearer KEY', KEY read from this variable."),
]
AuditLogOpt = Annotated[
    Path | None, typer.Option("--audit-log", help="Append one JSON line per request to this file.")
]
AuditJudgeOpt = Annotated[
    str | None,
    typer.Option("--audit-judge", help="Judge spec whose verdicts on every candidate go into the audit log."),
]
ExposeCandidatesOpt = Annotated[
    bool,
    typer.Option(
        "--expose-candidates",
        help="Return every candidate in the response (evaluation only: clients see unchosen answers).",
    ),
]
RankerSystemPromptOpt = Annotated[
    str | None, typer.Option("--system-prompt", help="System prompt of every request (the ranker's).")
]


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


@srr_app.command("serve")
def serve_command(
    model: options.ModelArg,
    ranker: RankerOpt,
    n: ServeNOpt = 8,
    max_n: MaxNOpt = 16,
    engine: ServeEngineOpt = "hf",
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8000,
    served_name: ServedNameOpt = None,
    max_tokens: MaxTokensOpt = 48,
    max_tokens_limit: MaxTokensLimitOpt = 512,
    max_batch: MaxBatchOpt = 8,
    max_queue: MaxQueueOpt = 64,
    request_timeout: RequestTimeoutOpt = 300.0,
    shutdown_timeout: ShutdownTimeoutOpt = 30.0,
    api_key_env: ApiKeyEnvOpt = None,
    audit_log: AuditLogOpt = None,
    audit_judge: AuditJudgeOpt = None,
    expose_candidates: ExposeCandidatesOpt = False,
    system_prompt: RankerSystemPromptOpt = None,
    device: options.DeviceOpt = None,
    dtype: options.DtypeOpt = None,
    json_out: options.JsonOpt = False,
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
