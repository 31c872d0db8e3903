"""User-facing errors: one line that names the problem and the way out."""

from __future__ import annotations


class KCloudError(Exception):
    """An error caused by user input or environment, shown as one line (exit code 2)."""

    def __init__(self, problem: str, hint: str | None = None) -> None:
        self.problem = problem
        self.hint = hint
        super().__init__(self.message)

    @property
    def message(self) -> str:
        return f"{self.problem}; {self.hint}" if self.hint else self.problem


class CatalogError(KCloudError):
    """A malformed or unknown device entry."""


class CaptureError(KCloudError):
    """A model that cannot be built, imported or captured."""


class FitError(KCloudError):
    """A model that does not fit in a device's memory."""


class PrecisionError(KCloudError):
    """A device that cannot run an op at the requested precision, with no fallback."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as one line for a message: a K-Cloud error's own words, otherwise
    "Type: text" (the type names what the user's code or a library raised)."""
    if isinstance(exc, KCloudError):
        return exc.message
    text = " ".join(str(exc).split())
    if len(text) > limit:
        text = text[:limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
