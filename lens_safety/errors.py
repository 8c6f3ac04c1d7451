"""One exception type for every problem a user can fix.

Every message is one line that names the problem and the fix. The CLI prints it as
``error: <message>`` and exits with status 2, never with a traceback.
"""

from __future__ import annotations


class LensSafetyError(Exception):
    """A problem with the user's input or environment, with the fix in the message."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        message = problem if fix is None else f"{problem}; {fix}"
        super().__init__(" ".join(message.split()))


class LensSafetyWarning(UserWarning):
    """Something the user should know that does not stop the job (the CLI prints ``warning: …``)."""


def warn(message: str) -> None:
    """Issue a :class:`LensSafetyWarning` with a one-line message."""
    import warnings

    warnings.warn(" ".join(message.split()), LensSafetyWarning, stacklevel=3)


def require(condition: bool, problem: str, fix: str | None = None) -> None:
    """Raise :class:`LensSafetyError` unless ``condition`` holds."""
    if not condition:
        raise LensSafetyError(problem, fix)


def first_of(names: list[str]) -> str:
    """The first of ``names`` for an error line: ``"a"``, or ``"a (and 2 more)"``."""
    rest = len(names) - 1
    return names[0] if rest == 0 else f"{names[0]} (and {rest} more)"
