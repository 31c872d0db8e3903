"""Load generator for any OpenAI-compatible server (what `kcloud bench serve` runs).

Requests arrive either as a recorded trace replayed at its own arrival times (optionally sped
up) or as Poisson arrivals at a given rate; an optional concurrency cap holds requests back
while that many are in flight. Each request is one streamed `POST /v1/completions` whose prompt
is a list of token ids (the OpenAI API accepts one) of the asked length, with `max_tokens`, and
vLLM's `min_tokens` and `ignore_eos` extensions so that every request generates exactly the
asked number of tokens whatever the model says. Per request it measures time to first token
(TTFT), time per output token after the first (TPOT) and end-to-end latency (E2E); the run
reports their percentiles, request and token throughput, goodput under a TTFT/TPOT SLO, and
failed requests by kind. Every figure is measured on the client's clock.

Trace format: a CSV with the columns `arrived_at` (seconds from the trace start),
`num_prefill_tokens` (prompt length) and `num_decode_tokens` (generated length), as in the
Azure LLM inference trace 2023 (published with the Splitwise paper, Patel et al., ISCA 2024,
license CC-BY 4.0) in the processed form distributed with the Vidur simulator (MIT license).
"""

from __future__ import annotations

import asyncio
import csv
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from kcloud.errors import KCloudError

TRACE_COLUMNS = ("arrived_at", "num_prefill_tokens", "num_decode_tokens")
PERCENTILES = (50, 90, 99)
# Prompt token ids are drawn from this range unless told otherwise: above the special tokens
# of the byte-level and small BPE vocabularies K-Cloud ships, inside any real model's vocabulary.
DEFAULT_TOKEN_IDS = (5, 256)


@dataclass(frozen=True)
class RequestSpec:
    """One request to send: when (seconds after the run starts) and how long."""

    index: int
    at_s: float
    input_tokens: int
    output_tokens: int


@dataclass
class RequestRecord:
    """What happened to one request, on the client's clock (seconds after the run starts)."""

    index: int
    input_tokens: int
    output_tokens_asked: int
    scheduled_s: float
    sent_s: float | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    output_tokens: int = 0
    error: str | None = None  # kind: http_429, http_500, connect, timeout, stream_error, ...
    detail: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.e2e_s is not None

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)  # type: ignore[operator]


def load_trace(path: str | Path, *, limit: int | None = None,
               speedup: float = 1.0) -> list[RequestSpec]:
    """Read a trace CSV (see the module doc) into requests, arrival times relative to the first
    row and divided by `speedup`; `limit` keeps the first rows only."""
    p = Path(path)
    if not p.is_file():
        raise KCloudError(f"trace file {p} not found", "pass a CSV with columns "
                          + ", ".join(TRACE_COLUMNS))
    if speedup <= 0:
        raise KCloudError(f"speedup must be positive, got {speedup}")
    rows: list[tuple[float, int, int]] = []
    with p.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in TRACE_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise KCloudError(f"trace {p} lacks the column(s) {', '.join(missing)}",
                              "a trace has columns " + ", ".join(TRACE_COLUMNS))
        for line, row in enumerate(reader, start=2):
            if limit is not None and len(rows) >= limit:
                break
            try:
                at = float(row["arrived_at"])
                n_in = int(float(row["num_prefill_tokens"]))
                n_out = int(float(row["num_decode_tokens"]))
            except (TypeError, ValueError):
                raise KCloudError(f"trace {p} line {line}: not a number in "
                                  f"{[row.get(c) for c in TRACE_COLUMNS]}") from None
            if not math.isfinite(at) or n_in < 1 or n_out < 1:
                raise KCloudError(f"trace {p} line {line}: arrived_at must be finite and both "
                                  f"token counts at least 1")
            rows.append((at, n_in, n_out))
    if not rows:
        raise KCloudError(f"trace {p} has no requests")
    rows.sort(key=lambda r: r[0])
    t0 = rows[0][0]
    return [RequestSpec(i, (at - t0) / speedup, n_in, n_out)
            for i, (at, n_in, n_out) in enumerate(rows)]


def poisson_requests(n: int, rate: float, input_tokens: int, output_tokens: int, *,
                     seed: int = 0) -> list[RequestSpec]:
    """`n` requests of fixed lengths arriving as a Poisson process of `rate` per second (all at
    once for an infinite rate), the first at time 0."""
    if n < 1 or input_tokens < 1 or output_tokens < 1:
        raise KCloudError("requests, input tokens and output tokens must all be at least 1")
    if not rate > 0:
        raise KCloudError(f"rate must be positive (or inf), got {rate}")
    if math.isinf(rate):
        times = np.zeros(n)
    else:
        gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n)
        gaps[0] = 0.0
        times = np.cumsum(gaps)
    return [RequestSpec(i, float(t), input_tokens, output_tokens) for i, t in enumerate(times)]


def base_url(url: str) -> str:
    """The server root: `http://h:p`, `http://h:p/` and `http://h:p/v1` all name one server."""
    u = url.rstrip("/")
    return u[: -len("/v1")] if u.endswith("/v1") else u


def prompt_ids(spec: RequestSpec, seed: int, token_ids: tuple[int, int]) -> list[int]:
    """The request's prompt: its own seeded draw, so that no two prompts share a prefix by chance
    (servers with prefix caching would otherwise skip their prefill)."""
    rng = np.random.default_rng([seed, spec.index])
    return rng.integers(token_ids[0], token_ids[1], size=spec.input_tokens).tolist()


@dataclass
class BenchResult:
    """A finished run: per-request records and the run's wall time."""

    url: str
    model: str
    records: list[RequestRecord]
    duration_s: float
    concurrency: int | None
    source: str
    slo_ttft_s: float | None = None
    slo_tpot_s: float | None = None
    clock_origin: float = 0.0  # time.perf_counter() when the run started (records count from it)

    def meets_slo(self, r: RequestRecord) -> bool:
        if not r.ok:
            return False
        if self.slo_ttft_s is not None and (r.ttft_s is None or r.ttft_s > self.slo_ttft_s):
            return False
        tpot = r.tpot_s
        return not (self.slo_tpot_s is not None and tpot is not None
                    and tpot > self.slo_tpot_s)

    def summary(self) -> dict[str, Any]:
        done = [r for r in self.records if r.ok]
        kinds = Counter(r.error for r in self.records if r.error is not None)
        dur = self.duration_s if self.duration_s > 0 else float("nan")
        out_tokens = sum(r.output_tokens for r in done)
        has_slo = self.slo_ttft_s is not None or self.slo_tpot_s is not None
        good = sum(1 for r in done if self.meets_slo(r)) if has_slo else None
        return {
            "url": self.url,
            "model": self.model,
            "source": self.source,
            "concurrency": self.concurrency,
            "requests": len(self.records),
            "completed": len(done),
            "errors": sum(kinds.values()),
            "errors_by_kind": dict(sorted(kinds.items())),
            "duration_s": self.duration_s,
            "requests_per_s": len(done) / dur,
            "throughput_tok_s": out_tokens / dur,
            "input_tok_s": sum(r.input_tokens for r in done) / dur,
            "output_tokens": out_tokens,
            "short_outputs": sum(1 for r in done if r.output_tokens < r.output_tokens_asked),
            "ttft_s": _percentiles([r.ttft_s for r in done]),
            "tpot_s": _percentiles([r.tpot_s for r in done]),
            "e2e_s": _percentiles([r.e2e_s for r in done]),
            "slo": {"ttft_ms": None if self.slo_ttft_s is None else self.slo_ttft_s * 1e3,
                    "tpot_ms": None if self.slo_tpot_s is None else self.slo_tpot_s * 1e3},
            # Goodput as in DistServe/vLLM's benchmark: completed requests per second that met
            # every SLO given (None without an SLO).
            "goodput": None if good is None else good / dur,
            "goodput_fraction": None if good is None or not self.records
            else good / len(self.records),
            "figures": "measured",
        }

    def to_dict(self) -> dict[str, Any]:
        return {**self.summary(), "records": [asdict(r) for r in self.records]}


def _percentiles(values: Sequence[float | None]) -> dict[str, float | None]:
    xs = np.array([v for v in values if v is not None], dtype=float)
    if xs.size == 0:
        return {f"p{q}": None for q in PERCENTILES}
    return {f"p{q}": float(np.percentile(xs, q)) for q in PERCENTILES}


async def check_server(client: httpx.AsyncClient, root: str, model: str) -> None:
    """Fail in one line when nothing answers at `root` or it does not serve `model`."""
    try:
        resp = await client.get(f"{root}/v1/models", timeout=30.0)
    except httpx.HTTPError as exc:
        raise KCloudError(f"cannot reach {root} ({type(exc).__name__})",
                          "start the server first or check --url") from None
    if resp.status_code != 200:
        return  # a server without the model list: its completions will tell
    try:
        ids = [m["id"] for m in resp.json().get("data", [])]
    except (ValueError, KeyError, TypeError, AttributeError):
        return
    if ids and model not in ids:
        raise KCloudError(f"model '{model}' is not served at {root}",
                          "pass --model one of " + ", ".join(ids))


async def _send(client: httpx.AsyncClient, root: str, model: str, spec: RequestSpec,
                rec: RequestRecord, t0: float, seed: int, token_ids: tuple[int, int],
                timeout_s: float) -> None:
    body = {
        "model": model,
        "prompt": prompt_ids(spec, seed, token_ids),
        "max_tokens": spec.output_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        # vLLM's sampling extensions (kcloud serve accepts them too): fixed output lengths.
        "min_tokens": spec.output_tokens,
        "ignore_eos": True,
    }
    start = time.perf_counter()
    rec.sent_s = start - t0
    chunks = 0
    usage_tokens: int | None = None
    finished = False
    try:
        async with asyncio.timeout(timeout_s), client.stream(
                "POST", f"{root}/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                rec.error, rec.detail = f"http_{resp.status_code}", _error_message(text)
                return
            # Server-sent events (the OpenAI streaming format): `data: {json}` lines, the
            # last one `data: [DONE]`.
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    finished = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    rec.error, rec.detail = "stream_error", _error_message(data)
                    return
                if chunk.get("choices"):
                    chunks += 1
                    if rec.ttft_s is None:
                        rec.ttft_s = time.perf_counter() - start
                usage = chunk.get("usage")
                if usage and usage.get("completion_tokens") is not None:
                    usage_tokens = int(usage["completion_tokens"])
    except TimeoutError:
        rec.error, rec.detail = "timeout", f"no complete answer within {timeout_s:g} s"
        return
    except httpx.TimeoutException as exc:
        rec.error, rec.detail = "timeout", type(exc).__name__
        return
    except httpx.ConnectError as exc:
        rec.error, rec.detail = "connect", str(exc) or type(exc).__name__
        return
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
        rec.error, rec.detail = "disconnect", str(exc) or type(exc).__name__
        return
    except json.JSONDecodeError as exc:
        rec.error, rec.detail = "bad_response", str(exc)
        return
    if not finished:
        rec.error, rec.detail = "incomplete", "the stream ended before data: [DONE]"
        return
    rec.e2e_s = time.perf_counter() - start
    rec.output_tokens = usage_tokens if usage_tokens is not None else chunks
    if rec.ttft_s is None:
        rec.ttft_s = rec.e2e_s


def _error_message(text: str) -> str:
    """The OpenAI error body's message when there is one, else the text's start."""
    try:
        err = json.loads(text).get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:200]
    except (ValueError, AttributeError):
        pass
    return text[:200]


async def run_bench_async(url: str, model: str, specs: Sequence[RequestSpec], *,
                          concurrency: int | None = None, seed: int = 0,
                          slo_ttft_s: float | None = None, slo_tpot_s: float | None = None,
                          timeout_s: float = 600.0,
                          token_ids: tuple[int, int] = DEFAULT_TOKEN_IDS,
                          source: str = "",
                          on_done: Callable[[RequestRecord], None] | None = None,
                          ) -> BenchResult:
    """Send `specs` to the server at `url` at their times and wait for every answer."""
    if concurrency is not None and concurrency < 1:
        raise KCloudError(f"concurrency must be at least 1, got {concurrency}")
    if not 0 <= token_ids[0] < token_ids[1]:
        raise KCloudError(f"token id range {token_ids[0]}:{token_ids[1]} is empty")
    root = base_url(url)
    n_conn = concurrency or max(1, len(specs))
    limits = httpx.Limits(max_connections=n_conn, max_keepalive_connections=n_conn)
    gate = asyncio.Semaphore(concurrency) if concurrency else None
    records = [RequestRecord(s.index, s.input_tokens, s.output_tokens, s.at_s) for s in specs]
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout_s)) as client:
        await check_server(client, root, model)
        t0 = time.perf_counter()
        end = t0

        async def one(spec: RequestSpec, rec: RequestRecord) -> None:
            nonlocal end
            delay = t0 + spec.at_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if gate is None:
                await _send(client, root, model, spec, rec, t0, seed, token_ids, timeout_s)
            else:
                async with gate:
                    await _send(client, root, model, spec, rec, t0, seed, token_ids, timeout_s)
            end = max(end, time.perf_counter())
            if on_done is not None:
                on_done(rec)

        await asyncio.gather(*(one(s, r) for s, r in zip(specs, records, strict=True)))
    return BenchResult(url=root, model=model, records=records, duration_s=end - t0,
                       concurrency=concurrency, source=source, slo_ttft_s=slo_ttft_s,
                       slo_tpot_s=slo_tpot_s, clock_origin=t0)


def run_bench(url: str, model: str, specs: Sequence[RequestSpec], *, progress: bool = False,
              **kw: Any) -> BenchResult:
    """`run_bench_async` from synchronous code, with a Rich progress bar on stderr if asked."""
    if not progress:
        return asyncio.run(run_bench_async(url, model, specs, **kw))
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    bar = Progress(TextColumn("[bold]bench serve[/]"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                   console=Console(stderr=True), transient=True)
    errors = 0

    with bar:
        task = bar.add_task("requests", total=len(specs), status="")

        def done(rec: RequestRecord) -> None:
            nonlocal errors
            errors += rec.error is not None
            bar.update(task, advance=1, status=f"errors {errors}" if errors else "")

        return asyncio.run(run_bench_async(url, model, specs, on_done=done, **kw))
