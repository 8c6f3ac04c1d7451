"""OpenAI response bodies of the safeguard: a ``chat.completion`` and its server-sent-event stream."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any


def completion_body(
    request_id: str,
    served_name: str,
    text: str,
    finish_reason: str,
    usage: dict[str, int],
    extension: dict[str, Any],
) -> dict[str, Any]:
    """A ``chat.completion`` object with one choice and the ``safeguard`` extension field."""
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": served_name,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        ],
        "usage": usage,
        "safeguard": extension,
    }


def text_pieces(text: str) -> list[str]:
    """``text`` cut before each run of whitespace; the pieces concatenate to ``text`` exactly."""
    pieces = re.findall(r"\s*\S+|\s+$", text)
    return pieces or [""]


def stream_events(
    request_id: str,
    served_name: str,
    text: str,
    finish_reason: str,
    usage: dict[str, int] | None,
    extension: dict[str, Any],
) -> Iterator[str]:
    """Server-sent events of an already chosen answer: a role chunk, one chunk per word, a final
    chunk with ``finish_reason`` and the ``safeguard`` field, the usage chunk when asked, ``[DONE]``."""
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        body = {
            "id": request_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": served_name,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
            **extra,
        }
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    for piece in text_pieces(text):
        yield chunk({"content": piece})
    yield chunk({}, finish_reason, safeguard=extension)
    if usage is not None:
        body = {
            "id": request_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": served_name,
            "choices": [],
            "usage": usage,
        }
        yield f"data: {json.dumps(body)}\n\n"
    yield "data: [DONE]\n\n"
