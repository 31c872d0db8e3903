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
