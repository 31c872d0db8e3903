"""User input at the edges, shared by every loader and command: reading an input file as
text (one-line errors for a missing, unreadable, oversized or non-UTF-8 file), and the bounds
on what a user may ask for, checked before any work starts (so that a huge number is a
one-line error, not minutes of work or an out-of-memory kill)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import yaml

from kcloud.errors import KCloudError

MAX_INPUT_BYTES = 16 * 2**20  # a catalog, cluster, calibration or plan file
MAX_BATCH = 65_536  # items per request or micro-batch
MAX_TOKENS = 1_048_576  # tokens per sample (prompt, generated, sequence, KV cache)
MAX_DEVICES = 16_384  # devices in one cluster: the search takes ~10 s there, ~6 min at 65,536
MAX_MICRO_BATCHES = 10_000  # micro-batches per replica in one run
MAX_RUN_INPUT_BYTES = 2 * 2**30  # a run's micro-batches, made before the workers start
MAX_LAYERS = 100_000  # layers of one model in a plan


def read_text(path: str | os.PathLike[str], what: str, hint: str) -> str:
    """The UTF-8 text of a user's input file; `what` names it in the one-line error
    ("cluster file", "plan", ...), `hint` says what to give instead."""
    p = Path(path)
    try:
        if not p.is_file():
            raise KCloudError(f"no {what} at {p}", hint)
        size = p.stat().st_size
        if size > MAX_INPUT_BYTES:
            raise KCloudError(f"{what} {p} is {size / 2**20:.0f} MiB, more than a "
                              f"{what} can be ({MAX_INPUT_BYTES // 2**20} MiB)", hint)
        return p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise KCloudError(f"{what} {p} is not UTF-8 text (byte {exc.start})", hint) from None
    except OSError as exc:
        raise KCloudError(f"cannot read {what} {p}: {exc.strerror or exc}", hint) from None


def yaml_data(text: str) -> Any:
    """The data of one YAML document, read safely by libyaml's parser where PyYAML was built
    with it (the pure-Python parser takes a fifth of a second for the device catalog, in every
    command); raises `yaml.YAMLError`."""
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def check_count(name: str, value: object, low: int, high: int, hint: str = "") -> int:
    """`value` as an integer in [low, high] (not a bool, a fraction or a string), or a
    one-line error naming the field."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise KCloudError(f"{name} must be a whole number, got {value!r}",
                          hint or f"give {name} as an integer from {low} to {high:,}")
    if not low <= value <= high:
        raise KCloudError(f"{name} must be from {low} to {high:,}, got {value:,}",
                          hint or f"give {name} from {low} to {high:,}")
    return value


def check_finite(name: str, value: object, *, positive: bool = False) -> float:
    """`value` as a finite number (positive when asked), or a one-line error."""
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value) or (positive and not value > 0):
        need = "a finite positive number" if positive else "a finite number"
        raise KCloudError(f"{name} must be {need}, got {value!r}", f"give {name} as {need}")
    return float(value)
