"""Request streams: traces scaled in rate, or a seeded synthetic generator.

Trace format (CSV, one row per request): `arrived_at` (seconds from the trace start),
`num_prefill_tokens` (prompt length), `num_decode_tokens` (generated length). It is the format
of the Azure LLM inference trace 2023 (published with the Splitwise paper by Microsoft Azure,
licence CC-BY 4.0) as distributed with Microsoft's Vidur simulator (MIT licence).

A stream is an iterator of `(arrival_s, prompt_tokens, output_tokens)` in arrival order,
produced in blocks so that a stream of 10 million requests never sits in memory whole.
Non-LLM requests carry 0 prompt tokens and 1 output.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kcloud.errors import KCloudError

TRACE_COLUMNS = ("arrived_at", "num_prefill_tokens", "num_decode_tokens")
BLOCK = 65536


@dataclass(frozen=True)
class Trace:
    arrived_at: np.ndarray
    prompt: np.ndarray
    output: np.ndarray
    source: str

    def __len__(self) -> int:
        return len(self.arrived_at)

    @property
    def duration_s(self) -> float:
        return float(self.arrived_at[-1] - self.arrived_at[0]) if len(self) > 1 else 0.0

    @property
    def rate(self) -> float:
        return (len(self) - 1) / self.duration_s if self.duration_s > 0 else 0.0


def read_trace(path: str | Path) -> Trace:
    """Read a trace CSV; a bad file is one `KCloudError` line naming the problem."""
    p = Path(path)
    if not p.is_file():
        raise KCloudError(f"no trace file at {p}",
                          "give a CSV with columns arrived_at,num_prefill_tokens,"
                          "num_decode_tokens")
    with p.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header[:3]) != TRACE_COLUMNS:
            raise KCloudError(f"{p}: the header is {header}, not {','.join(TRACE_COLUMNS)}",
                              "give a trace in the Azure LLM inference trace format")
        try:
            rows = np.array([[float(r[0]), float(r[1]), float(r[2])] for r in reader if r],
                            dtype=np.float64)
        except (ValueError, IndexError) as exc:
            raise KCloudError(f"{p}: a row is not three numbers ({exc})",
                              "each row: arrived_at,num_prefill_tokens,num_decode_tokens") from None
    if rows.size == 0:
        raise KCloudError(f"{p} has no requests", "give a trace with at least one row")
    if (np.diff(rows[:, 0]) < 0).any():
        rows = rows[np.argsort(rows[:, 0], kind="stable")]
    if (rows[:, 1:] < 0).any() or (rows[:, 0] < 0).any():
        raise KCloudError(f"{p}: negative arrival times or token counts",
                          "times and lengths must be 0 or more")
    return Trace(rows[:, 0] - rows[0, 0], rows[:, 1].astype(np.int64),
                 np.maximum(1, rows[:, 2]).astype(np.int64), str(p))


def trace_stream(trace: Trace, *, rate_scale: float = 1.0, duration_s: float | None = None,
                 max_tokens: int | None = None, limit: int | None = None,
                 ) -> Iterator[tuple[float, int, int]]:
    """Replay `trace` with its arrivals sped up `rate_scale` times; `duration_s` repeats it
    (back to back) until that long; `max_tokens` clips a request's prompt so that prompt +
    output fit (as Vidur does); `limit` stops after that many requests."""
    if rate_scale <= 0:
        raise KCloudError(f"rate scale must be positive, got {rate_scale}", "give --rate-scale > 0")
    t = trace.arrived_at / rate_scale
    span = (trace.duration_s / rate_scale) + (1.0 / (trace.rate * rate_scale)
                                             if trace.rate > 0 else 1.0)
    prompt, out = trace.prompt, trace.output
    if max_tokens is not None:
        out = np.minimum(out, max_tokens - 1)
        prompt = np.maximum(1, np.minimum(prompt, max_tokens - out))
    n = 0
    offset = 0.0
    while True:
        for a, p, o in zip((t + offset).tolist(), prompt.tolist(), out.tolist(), strict=True):
            if duration_s is not None and a >= duration_s:
                return
            if limit is not None and n >= limit:
                return
            n += 1
            yield a, p, o
        if duration_s is None:
            return
        offset += span


@dataclass(frozen=True)
class Lengths:
    """Prompt and output lengths: resampled from a trace (its empirical distribution), or a
    log-normal with a mean and a coefficient of variation (cv 0: every request alike)."""

    prompt_mean: float = 0.0
    output_mean: float = 1.0
    cv: float = 0.0
    trace: Trace | None = None

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        if self.trace is not None:
            idx = rng.integers(0, len(self.trace), n)
            return self.trace.prompt[idx], self.trace.output[idx]
        return self._draw(rng, self.prompt_mean, n, 0), self._draw(rng, self.output_mean, n, 1)

    def _draw(self, rng: np.random.Generator, mean: float, n: int, least: int) -> np.ndarray:
        if self.cv <= 0 or mean <= 0:
            return np.full(n, max(least, round(mean)), dtype=np.int64)
        s2 = np.log1p(self.cv**2)
        x = rng.lognormal(np.log(mean) - s2 / 2, np.sqrt(s2), n)
        return np.maximum(least, np.rint(x)).astype(np.int64)


def synthetic_stream(rate: float, *, duration_s: float | None = None, limit: int | None = None,
                     seed: int = 0, arrivals: str = "poisson", burstiness: float = 1.0,
                     lengths: Lengths | None = None) -> Iterator[tuple[float, int, int]]:
    """Arrivals at `rate` per second: Poisson, or Gamma inter-arrival times whose coefficient
    of variation is `burstiness` (1: Poisson; above 1: bursts), until `duration_s` or `limit`."""
    if not rate > 0:
        raise KCloudError(f"request rate must be positive, got {rate}", "give --rate > 0")
    if arrivals not in ("poisson", "gamma"):
        raise KCloudError(f"unknown arrival process '{arrivals}'", "use poisson or gamma")
    if duration_s is None and limit is None:
        raise KCloudError("a synthetic stream needs a duration or a request count",
                          "give --duration")
    if not burstiness > 0:
        raise KCloudError(f"burstiness must be positive, got {burstiness}", "give burstiness > 0")
    rng = np.random.default_rng(seed)
    lens = lengths or Lengths()
    t = 0.0
    n = 0
    while True:
        if arrivals == "poisson" or burstiness == 1.0:
            gaps = rng.exponential(1.0 / rate, BLOCK)
        else:
            shape = 1.0 / burstiness**2
            gaps = rng.gamma(shape, 1.0 / (rate * shape), BLOCK)
        times = t + np.cumsum(gaps)
        t = float(times[-1])
        prompt, out = lens.sample(rng, BLOCK)
        for a, p, o in zip(times.tolist(), prompt.tolist(), out.tolist(), strict=True):
            if duration_s is not None and a >= duration_s:
                return
            if limit is not None and n >= limit:
                return
            n += 1
            yield a, p, o
