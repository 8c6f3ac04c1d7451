"""The safeguard's audit log: one JSON line per chat-completion request, appended.

A line records what was asked (the SHA-256 of the instruction, not its text), what was sampled
(the SHA-256 of each unique candidate), every ranker score, the chosen index, the status sent back
and, when a judge is configured (``--audit-judge SPEC``, any spec of
:func:`lens_safety.evaluation.judges.get_judge`), the judge's verdict on every candidate: the data
to measure attack success with the safeguard on (the chosen candidate) and off (the first sample)
from real traffic. Texts never reach the log.

Judging can be slow (a classifier, a remote LLM), so lines are written by a thread of their own:
:meth:`AuditLog.record` only queues the entry, and the model worker never waits for the judge.
:meth:`AuditLog.close` writes what is queued, then stops.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
from pathlib import Path
from typing import Any

from lens_safety.errors import LensSafetyError
from lens_safety.evaluation.judges import get_judge, run_judge
from lens_safety.evaluation.verdict import Judge


def text_sha256(text: str) -> str:
    """Hex SHA-256 of a text's UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class AuditLog:
    """Appends one JSON line per request to ``path`` (module docstring)."""

    def __init__(self, path: str | Path, judge: str | Judge | None = None) -> None:
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise LensSafetyError(
                f"the audit log's folder {self.path.parent} does not exist",
                "create it or choose another --audit-log",
            )
        self.judge = get_judge(judge) if judge is not None else None
        self._handle = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self._queue: queue.Queue[tuple[dict[str, Any], str | None, list[str]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._write, name="lens-safety-audit", daemon=True)
        self._thread.start()
        self.lines = 0

    def record(
        self, entry: dict[str, Any], instruction: str | None = None, candidates: list[str] | None = None
    ) -> None:
        """Queue one line: ``entry`` plus the hashes of ``instruction`` and ``candidates`` (and the
        judge's verdicts on the candidates when a judge is configured)."""
        self._queue.put((dict(entry), instruction, list(candidates or [])))

    def _line(self, entry: dict[str, Any], instruction: str | None, candidates: list[str]) -> dict[str, Any]:
        line = {"time": time.time(), **entry}
        if instruction is not None:
            line["prompt_sha256"] = text_sha256(instruction)
        if candidates:
            line["candidate_sha256"] = [text_sha256(c) for c in candidates]
        if self.judge is not None and candidates:
            line["judge"] = self.judge.name
            try:
                verdicts = run_judge(self.judge, candidates, [instruction or ""] * len(candidates))
                line["verdicts"] = [
                    {"refused": v.refused, "harmful": v.harmful, "score": v.score} for v in verdicts
                ]
            except Exception as exc:  # a judge failure is recorded, never fatal to the server
                line["judge_error"] = str(exc)
        return line

    def _write(self) -> None:
        while (item := self._queue.get()) is not None:
            line = self._line(*item)
            try:
                text = json.dumps(line, ensure_ascii=False, allow_nan=False, default=str)
            except ValueError as exc:  # a non-finite number: say so instead of writing invalid JSON
                text = json.dumps(
                    {"time": line["time"], "request_id": line.get("request_id"), "error": str(exc)}
                )
            self._handle.write(text + "\n")
            self._handle.flush()
            self.lines += 1

    def close(self, wait: float = 60.0) -> None:
        """Write every queued line (judging them), then close the file."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(wait)
        self._handle.close()
