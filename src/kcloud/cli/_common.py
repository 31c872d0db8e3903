"""Shared helpers for the CLI: JSON output and the Rich console."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console

# Wide enough for the tables when the output is not a terminal (CI logs, pipes).
console = Console(width=None if sys.stdout.isatty() else 150)
err_console = Console(stderr=True)


def emit_json(obj: Any) -> None:
    """Print exactly one JSON object on stdout."""
    sys.stdout.write(json.dumps(obj, default=_default) + "\n")


def _default(o: Any) -> Any:
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if hasattr(o, "value"):
        return o.value
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def si(value: float, unit: str = "", digits: int = 3) -> str:
    """A number with an SI prefix, e.g. 3.2e12 -> '3.20 T'."""
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.{digits}g} {prefix}{unit}"
    return f"{value:.{digits}g} {unit}".rstrip()
