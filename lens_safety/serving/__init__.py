"""SRR as a deployable safeguard: an OpenAI-compatible server that answers with the safest of N.

Each chat completion samples ``n`` candidates, reads the ranker's hidden-state features, scores the
candidates with the SRR ranker and returns the top one (:mod:`.safeguard`); concurrent requests are
batched by one worker thread behind a bounded queue (:mod:`.scheduler`); the HTTP layer speaks
OpenAI's chat-completions protocol (:mod:`.protocol`, :mod:`.app`); an optional audit log records
scores, choices and judge verdicts (:mod:`.audit`); :func:`serve` runs it all with uvicorn
(:mod:`.server`). Needs the ``serve`` extra (Starlette and uvicorn).
"""

from lens_safety.serving.audit import AuditLog
from lens_safety.serving.engine import ENGINES, Capture, Engine, GenerateEngine, load_engine
from lens_safety.serving.protocol import APIError, ChatRequest, Limits, parse_chat_request
from lens_safety.serving.safeguard import Answer, Safeguard
from lens_safety.serving.scheduler import QueueFull, RequestTimeout, Scheduler, ShuttingDown
from lens_safety.serving.server import BackgroundServer, ServeConfig, ServeResult, build_server, serve

__all__ = [
    "ENGINES",
    "APIError",
    "Answer",
    "AuditLog",
    "BackgroundServer",
    "Capture",
    "ChatRequest",
    "Engine",
    "GenerateEngine",
    "Limits",
    "QueueFull",
    "RequestTimeout",
    "Safeguard",
    "Scheduler",
    "ServeConfig",
    "ServeResult",
    "ShuttingDown",
    "build_server",
    "load_engine",
    "parse_chat_request",
    "serve",
]
