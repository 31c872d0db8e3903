"""What a simulation measures, in bounded memory.

Latencies go into streaming quantile sketches (Apache DataSketches' t-digest, compression
1000: p50/p90/p99 within about 0.5 % of the exact quantiles on log-normal latencies, and
deterministic, unlike its randomized KLL sketch), so 10 million requests cost the same memory
as ten thousand; each sketch is fed in blocks. Power and utilization are kept per device type in
fixed-width time bins. Every figure is modeled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from datasketches import tdigest_double

SKETCH_K = 1000
QUANTILES = (0.5, 0.9, 0.99)
_FLUSH = 4096


class Quantiles:
    """A streaming quantile sketch fed in blocks (and a few exact moments)."""

    __slots__ = ("_buf", "count", "sketch", "total")

    def __init__(self) -> None:
        self.sketch = tdigest_double(SKETCH_K)
        self._buf: list[float] = []
        self.count = 0
        self.total = 0.0

    def add(self, x: float) -> None:
        self._buf.append(x)
        if len(self._buf) >= _FLUSH:
            self.flush()

    def flush(self) -> None:
        if self._buf:
            arr = np.asarray(self._buf, dtype=np.float64)
            self.sketch.update(arr)
            self.count += len(arr)
            self.total += float(arr.sum())
            self._buf.clear()

    def quantiles(self) -> dict[str, float | None]:
        self.flush()
        if self.count == 0:
            return {f"p{round(q * 100)}": None for q in QUANTILES}
        return {f"p{round(q * 100)}": float(self.sketch.get_quantile(q)) for q in QUANTILES}

    @property
    def mean(self) -> float | None:
        self.flush()
        return self.total / self.count if self.count else None

    def cdf(self, points: int = 200) -> tuple[list[float], list[float]]:
        """(values, cumulative shares) for a plot."""
        self.flush()
        if self.count == 0:
            return [], []
        qs = np.linspace(0.0, 1.0, points)
        return [float(self.sketch.get_quantile(q)) for q in qs.tolist()], qs.tolist()


@dataclass
class ServiceStats:
    name: str
    is_llm: bool
    slo: dict[str, float | None]
    requests: int = 0
    completed: int = 0
    dropped: int = 0
    met_slo: int = 0
    tokens: int = 0  # generated tokens (LLM) or items served
    good_tokens: int = 0  # of requests that met their SLO
    prompt_tokens: int = 0
    preemptions: int = 0
    energy_j: float = 0.0
    ttft: Quantiles = field(default_factory=Quantiles)
    tpot: Quantiles = field(default_factory=Quantiles)
    e2e: Quantiles = field(default_factory=Quantiles)
    queue: Quantiles = field(default_factory=Quantiles)

    def to_dict(self, span_s: float) -> dict[str, Any]:
        out: dict[str, Any] = {
            "requests": self.requests, "completed": self.completed, "dropped": self.dropped,
            "ttft_s": self.ttft.quantiles() if self.is_llm else None,
            "tpot_s": self.tpot.quantiles() if self.is_llm else None,
            "e2e_s": self.e2e.quantiles(),
            "queueing_s": self.queue.quantiles(),
            "slo": self.slo,
            "slo_attainment": self.met_slo / self.requests if self.requests else None,
            "goodput_req_s": self.met_slo / span_s if span_s > 0 else 0.0,
            "throughput_tok_s": (self.tokens / span_s if span_s > 0 else 0.0)
            if self.is_llm else None,
            "throughput_req_s": self.completed / span_s if span_s > 0 else 0.0,
            "goodput_tok_s": (self.good_tokens / span_s if span_s > 0 else 0.0)
            if self.is_llm else None,
            "preemptions": self.preemptions,
            "energy_j": self.energy_j,
            "energy_per_request_j": self.energy_j / self.completed if self.completed else None,
            "energy_per_token_j": (self.energy_j / self.tokens if self.tokens else None)
            if self.is_llm else None,
        }
        return out


class Ledger:
    """Per device type: busy time, dynamic energy and powered-on device time, in time bins."""

    def __init__(self, types: list[str], bin_s: float) -> None:
        self.types = types
        self.index = {t: i for i, t in enumerate(types)}
        self.bin_s = bin_s
        n = len(types)
        self.busy = [[0.0] for _ in range(n)]  # device-seconds busy per bin
        self.dyn = [[0.0] for _ in range(n)]  # dynamic joules per bin
        self.on = [[0.0] for _ in range(n)]  # device-seconds powered on per bin
        self.idle_j = [0.0] * n  # idle joules in all
        self.busy_total = [0.0] * n
        self.dyn_total = [0.0] * n

    def _spread(self, rows: list[list[float]], i: int, t0: float, t1: float,
                amount: float) -> None:
        row = rows[i]
        w = self.bin_s
        b0 = int(t0 / w)
        b1 = int(t1 / w)
        if b1 >= len(row):
            for r in rows:
                r.extend([0.0] * (b1 + 1 - len(r)))
        if b0 == b1 or t1 <= t0:
            row[b0] += amount
            return
        rate = amount / (t1 - t0)
        row[b0] += ((b0 + 1) * w - t0) * rate
        for b in range(b0 + 1, b1):
            row[b] += w * rate
        row[b1] += (t1 - b1 * w) * rate

    def work(self, i: int, t0: float, t1: float, busy_s: float, dyn_j: float) -> None:
        self.busy_total[i] += busy_s
        self.dyn_total[i] += dyn_j
        w = self.bin_s
        b0 = int(t0 / w)
        busy = self.busy[i]
        if b0 == int(t1 / w) and b0 < len(busy):  # within one bin: the common case
            busy[b0] += busy_s
            self.dyn[i][b0] += dyn_j
            return
        self._spread(self.busy, i, t0, t1, busy_s)
        self._spread(self.dyn, i, t0, t1, dyn_j)

    def work_types(self, types: list[int], t0: float, t1: float, per: Any) -> float:
        """`work` from t0 to t1 on each of `types`, its (busy device-seconds, dynamic joules)
        in `per`; the dynamic joules in all."""
        w = self.bin_s
        b0 = int(t0 / w)
        one = b0 == int(t1 / w)
        e = 0.0
        for i, (busy_s, dyn_j) in zip(types, per, strict=True):
            e += dyn_j
            busy = self.busy[i]
            if one and b0 < len(busy):  # within one bin: the common case
                self.busy_total[i] += busy_s
                self.dyn_total[i] += dyn_j
                busy[b0] += busy_s
                self.dyn[i][b0] += dyn_j
            else:
                self.work(i, t0, t1, busy_s, dyn_j)
        return e

    def powered(self, i: int, t0: float, t1: float, devices: int, idle_w: float) -> None:
        if t1 <= t0:
            return
        self.idle_j[i] += devices * idle_w * (t1 - t0)
        self._spread(self.on, i, t0, t1, devices * (t1 - t0))
        self._spread(self.dyn, i, t0, t1, devices * idle_w * (t1 - t0))

    def series(self, span_s: float) -> dict[str, dict[str, list[float]]]:
        n = max(1, int(np.ceil(span_s / self.bin_s)))
        out: dict[str, dict[str, list[float]]] = {}
        for i, t in enumerate(self.types):
            def pad(row: list[float]) -> np.ndarray:
                a = np.zeros(n)
                a[:min(n, len(row))] = row[:n]
                return a
            busy, energy, on = pad(self.busy[i]), pad(self.dyn[i]), pad(self.on[i])
            with np.errstate(divide="ignore", invalid="ignore"):
                util = np.where(on > 0, busy / np.where(on > 0, on, 1.0), 0.0)
            out[t] = {"power_w": (energy / self.bin_s).tolist(),
                      "utilization": np.minimum(util, 1.0).tolist()}
        return out
