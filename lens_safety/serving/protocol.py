"""The OpenAI chat-completions protocol as this server speaks it: request checks, error shape, bodies.

A request is read by :func:`parse_chat_request` into a :class:`ChatRequest`, or refused with an
:class:`APIError` whose body is OpenAI's ``{"error": {"message", "type", "param", "code"}}``.

Differences from OpenAI's API, on purpose:

* ``n`` is the number of **candidates sampled** (1 .. ``max_n``; default: the server's ``--n``).
  Exactly one choice comes back: the candidate the SRR ranker scored highest. ``n = 1`` or the
  extension field ``"safeguard": "off"`` gives the unguarded answer (the first sample).
* One user message, no system message: the ranker was trained on single-turn instructions
  formatted with the server's own system prompt (``--system-prompt`` at start).
* Sampling is over the whole vocabulary at ``temperature`` > 0 (how SRR candidates are drawn):
  ``top_p`` other than 1, penalties, logit bias, stop sequences, log-probabilities, tools and
  structured output are refused with a message naming the parameter.
* The response carries an extension field ``safeguard`` (chosen index, every score, the ranker's
  hash; :mod:`lens_safety.serving.app`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any


class APIError(Exception):
    """An HTTP error in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = kind
        self.param = param
        self.code = code

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    """What a request may ask for (defaults of the CLI's options)."""

    served_name: str
    default_n: int = 8
    max_n: int = 16
    default_max_tokens: int = 48
    max_tokens: int = 512
    max_body_bytes: int = 1 << 20


@dataclass(frozen=True)
class ChatRequest:
    """One checked chat-completion request."""

    instruction: str
    n: int
    temperature: float
    max_tokens: int
    safeguard: bool
    stream: bool = False
    include_usage: bool = False
    seed: int | None = None


#: accepted only at the value that changes nothing (the sampling SRR's candidates come from)
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "top_p": (1, 1.0),
    "frequency_penalty": (0, 0.0),
    "presence_penalty": (0, 0.0),
    "logprobs": (False,),
    "logit_bias": ({},),
    "stop": ([],),
    "tools": ([],),
    "parallel_tool_calls": (False,),
    "response_format": ({"type": "text"},),
    "store": (False,),
}
#: OpenAI parameters this server does not implement at any value
UNSUPPORTED = frozenset(
    {
        "top_logprobs",
        "tool_choice",
        "functions",
        "function_call",
        "modalities",
        "audio",
        "prediction",
        "reasoning_effort",
        "web_search_options",
        "service_tier",
    }
)
#: accepted and not used
IGNORED = frozenset({"user", "metadata"})
KNOWN = frozenset(
    {
        "model",
        "messages",
        "n",
        "temperature",
        "max_tokens",
        "max_completion_tokens",
        "stream",
        "stream_options",
        "seed",
        "safeguard",
    }
)


def decode_body(raw: bytes, limits: Limits) -> dict[str, Any]:
    """The JSON object of a request body, or a 400 / 413 naming what is wrong with it."""
    if len(raw) > limits.max_body_bytes:
        raise APIError(
            413,
            f"request body of {len(raw)} bytes is over the limit of {limits.max_body_bytes} bytes",
            code="request_too_large",
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(
            400,
            f"the request body is not valid UTF-8 (byte {exc.start}); send JSON encoded as UTF-8",
            code="invalid_encoding",
        ) from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise APIError(
            400,
            f"the request body is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})",
            code="invalid_json",
        ) from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def _int(body: dict[str, Any], name: str, low: int, high: int, default: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"'{name}' must be an integer, got {value!r}", param=name, code="invalid_type")
    if not low <= value <= high:
        raise APIError(
            400, f"'{name}' must be between {low} and {high}, got {value}", param=name, code="out_of_range"
        )
    return int(value)


def _check_parameters(body: dict[str, Any]) -> None:
    for name, value in body.items():
        if name in KNOWN or name in IGNORED:
            continue
        if name in NEUTRAL:
            if value is None or value in NEUTRAL[name]:
                continue
            raise APIError(
                400,
                f"'{name}' = {json.dumps(value)[:80]} is not supported: the server samples candidates "
                f"over the whole vocabulary for the SRR ranker; remove '{name}'",
                param=name,
                code="unsupported_parameter",
            )
        if name in UNSUPPORTED:
            raise APIError(
                400,
                f"'{name}' is not supported by this server; remove it",
                param=name,
                code="unsupported_parameter",
            )
        raise APIError(400, f"unrecognized request argument '{name}'", param=name, code="unknown_parameter")


def _message_text(message: Any, index: int) -> tuple[str, str]:
    where = f"messages[{index}]"
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise APIError(400, f"{where} must be an object with a 'role'", param=where, code="invalid_type")
    content = message.get("content")
    if isinstance(content, list):
        parts = []
        for part in content:
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise APIError(
                    400, f"{where}.content: only text parts are supported", param=where, code="invalid_type"
                )
            parts.append(part["text"])
        content = "\n".join(parts)
    if not isinstance(content, str):
        raise APIError(400, f"{where}.content must be a string", param=where, code="invalid_type")
    return message["role"], content


def _instruction(body: dict[str, Any]) -> str:
    if "messages" not in body:
        raise APIError(400, "'messages' is required", param="messages", code="missing_required_parameter")
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", param="messages", code="invalid_type")
    turns = [_message_text(m, i) for i, m in enumerate(messages)]
    if any(role in {"system", "developer"} for role, _ in turns):
        raise APIError(
            400,
            "system messages are not supported: the SRR ranker was trained on prompts formatted with "
            "the server's own system prompt (set it with --system-prompt when starting the server)",
            param="messages",
            code="unsupported_parameter",
        )
    if len(turns) != 1 or turns[0][0] != "user":
        raise APIError(
            400,
            f"this server answers one user message (the single-turn form the SRR ranker was trained "
            f"on); got roles {[role for role, _ in turns]}",
            param="messages",
            code="unsupported_parameter",
        )
    return turns[0][1]


def _safeguard(body: dict[str, Any]) -> bool:
    value = body.get("safeguard", "on")
    if value in ("on", True):
        return True
    if value in ("off", False):
        return False
    raise APIError(
        400, f'\'safeguard\' must be "on" or "off", got {value!r}', param="safeguard", code="invalid_value"
    )


def _temperature(body: dict[str, Any]) -> float:
    value = body.get("temperature")
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise APIError(400, "'temperature' must be a number", param="temperature", code="invalid_type")
    if not 0 < value <= 2:
        raise APIError(
            400,
            f"'temperature' must be in (0, 2], got {value}: the server samples its candidates "
            "(temperature 0 would give N identical ones)",
            param="temperature",
            code="out_of_range",
        )
    return float(value)


def _stream(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be true or false", param="stream", code="invalid_type")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream or not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise APIError(
            400,
            '\'stream_options\' is only {"include_usage": bool}, and only with "stream": true',
            param="stream_options",
            code="invalid_value",
        )
    return stream, bool(options.get("include_usage", False))


def parse_chat_request(body: dict[str, Any], limits: Limits) -> ChatRequest:
    """Check a decoded ``/v1/chat/completions`` body against ``limits`` (module docstring)."""
    _check_parameters(body)
    model = body.get("model")
    if model is None:
        raise APIError(400, "'model' is required", param="model", code="missing_required_parameter")
    if model != limits.served_name:
        raise APIError(
            404,
            f"the model '{model}' does not exist here; this server serves '{limits.served_name}'",
            param="model",
            code="model_not_found",
        )
    instruction = _instruction(body)
    if "max_tokens" in body and "max_completion_tokens" in body:
        raise APIError(
            400,
            "pass 'max_tokens' or 'max_completion_tokens', not both",
            param="max_tokens",
            code="invalid_value",
        )
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise APIError(
            400, f"'seed' must be a non-negative integer, got {seed!r}", param="seed", code="invalid_type"
        )
    stream, include_usage = _stream(body)
    return ChatRequest(
        instruction=instruction,
        n=_int(body, "n", 1, limits.max_n, limits.default_n),
        temperature=_temperature(body),
        max_tokens=_int(body, name, 1, limits.max_tokens, limits.default_max_tokens),
        safeguard=_safeguard(body),
        stream=stream,
        include_usage=include_usage,
        seed=seed,
    )
