"""Loading the external prompt sets in tests whose data packages may be absent."""

from __future__ import annotations

from importlib import metadata

from lens_safety.external_prompts import EXTERNAL_SOURCES
from lens_safety.prompts import PromptSet


def load_if_installed(spec: str) -> PromptSet | None:
    """The prompts of ``spec``; ``None`` only when it is an external set whose package is not
    installed (any other failure to load is an error, not a skipped check)."""
    source = EXTERNAL_SOURCES.get(spec.split(":", 1)[0])
    if source is not None:
        try:
            metadata.distribution(source.distribution)
        except metadata.PackageNotFoundError:
            return None
    return PromptSet.load(spec)
