"""Measure what `kcloud serve`'s HTTP front end costs on this host beside its engine
(`kcloud.hardware.host.FrontEndCosts`), so that the simulator of a served service
(`Service.front_end`) answers as a client of the server sees it.

A running server is probed with streamed completions sent together (`PROBES`: short prompts at
rising concurrency, and long prompts), each `ROUNDS` times. For each run, measured: the CPU time of
the server's event loop thread (its `kcloud_event_loop_cpu_seconds` gauge) and of the client (this
process, which sends the requests and reads their server-sent events), the server's mean time to
first token (from its metrics, counted from the engine's submission) and the client's. The CPU of a
run gives the CPU of a token streamed and of a step's delivery; what a client waits for its first
token beyond the server's count gives a request's admission (the requests sent together are
admitted one by one) and its way in and out (`fit`: non-negative least squares, robust to a run
another process slowed).

The probes are short synthetic requests: a trace replay checks the simulator with these costs
out of sample (`benchmarks/bench_sim_vs_serve.py`).
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx
import numpy as np
from scipy.optimize import least_squares, nnls

from kcloud.errors import KCloudError
from kcloud.hardware.host import FrontEndCosts, host_cores, save_front_end_costs
from kcloud.planner.scheduling import SchedulerConfig

# (requests sent together, prompt tokens, output tokens) of each probe
# (short prompts at rising concurrency; as many tokens streamed by fewer or more requests, which
# tell a request's CPU from its tokens'; long prompts, which tell a prompt token's)
PROBES = ((1, 16, 64), (4, 16, 64), (16, 16, 64), (32, 16, 64), (16, 16, 8), (8, 16, 128),
          (4, 1024, 16), (2, 4096, 8))
ROUNDS = 3


@dataclass(frozen=True)
class ProbeRun:
    """One run of a probe, measured."""

    requests: int
    prompt_tokens: int  # of all its requests
    tokens: int  # streamed, of all its requests
    deliveries: int  # turns of the engine's loop that handed events to the event loop
    cpu_s: float  # the server's event loop and the client together
    client_ttft_s: float  # mean, on the client's clock from sending
    server_ttft_s: float  # mean, on the server's from the engine's submission


@dataclass(frozen=True)
class Served:
    """A language model a running `kcloud serve` serves, and its engine's limits."""

    name: str
    config: SchedulerConfig  # a replica's scheduling limits
    replicas: int


def served_config(url: str, model: str | None = None) -> Served:
    """The model `model` (default: the first one listed) of the server at `url`, with the
    engine limits its `/v1/models` extension reports."""
    from kcloud.serve.bench import base_url

    root = base_url(url)
    try:
        data = httpx.get(f"{root}/v1/models", timeout=30).json()["data"]
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        raise KCloudError(f"no model list from {root}/v1/models",
                          "start `kcloud serve` first or check --url") from None
    entry = next((d for d in data if model is None or d.get("id") == model), None)
    if entry is None:
        raise KCloudError(f"the server at {root} does not serve '{model}'",
                          "give --served-name as the server has it")
    k = entry.get("kcloud")
    if not k or not k.get("kv_blocks_per_replica"):
        raise KCloudError(f"the server at {root} does not report its engine's limits",
                          "probe a language model served by `kcloud serve`")
    cfg = SchedulerConfig(token_budget=int(k["token_budget"]), max_batch=int(k["max_batch"]),
                          block_size=int(k["block_size"]),
                          num_blocks=int(k["kv_blocks_per_replica"]),
                          max_len=int(entry.get("max_model_len") or 1 << 30))
    return Served(str(entry["id"]), cfg, int(k["replicas"]))


_METRIC = re.compile(r'^(kcloud_event_loop_cpu_seconds|kcloud_time_to_first_token_seconds_sum|'
                     r'kcloud_time_to_first_token_seconds_count|'
                     r'kcloud_engine_step_seconds_count)(?:\{[^}]*\})? (\S+)$', re.M)


def _server_counters(root: str) -> dict[str, float]:
    text = httpx.get(f"{root}/metrics", timeout=30).text
    found = {m.group(1): float(m.group(2)) for m in _METRIC.finditer(text)}
    if "kcloud_event_loop_cpu_seconds" not in found:
        raise KCloudError(f"the server at {root} does not report its event loop's CPU time",
                          "probe a server started by `kcloud serve`")
    return found


def probe(url: str, model: str, requests: int, prompt: int, output: int,
          seed: int = 0) -> ProbeRun:
    """`requests` streamed completions sent together, once (measured)."""
    from kcloud.serve.bench import RequestSpec, base_url, run_bench

    root = base_url(url)
    specs = [RequestSpec(i, 0.0, prompt, output) for i in range(requests)]
    before = _server_counters(root)
    cpu0 = time.process_time()
    res = run_bench(url, model, specs, seed=seed)
    cpu = time.process_time() - cpu0
    after = _server_counters(root)
    bad = [r for r in res.records if not r.ok]
    if bad:
        raise KCloudError(f"a probe of {requests} requests failed: {bad[0].error} "
                          f"({bad[0].detail})", "check the server's log")
    n = after["kcloud_time_to_first_token_seconds_count"] - before[
        "kcloud_time_to_first_token_seconds_count"]
    server_ttft = (after["kcloud_time_to_first_token_seconds_sum"]
                   - before["kcloud_time_to_first_token_seconds_sum"]) / max(n, 1.0)
    return ProbeRun(requests, requests * prompt, sum(r.output_tokens for r in res.records),
                    round(after["kcloud_engine_step_seconds_count"]
                          - before["kcloud_engine_step_seconds_count"]),
                    cpu + after["kcloud_event_loop_cpu_seconds"]
                    - before["kcloud_event_loop_cpu_seconds"],
                    statistics.mean(r.ttft_s or 0.0 for r in res.records), server_ttft)


def _robust_nnls(rows: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative coefficients for rows @ c ~ y, relative residuals, robust to a run that
    another process on the host slowed (soft L1 loss)."""
    start, _ = nnls(rows, y)
    w = 1.0 / np.maximum(np.abs(y), 1e-9)
    res = least_squares(lambda c: (rows @ c - y) * w, start, bounds=(0.0, np.inf),
                        loss="soft_l1", f_scale=0.1)
    return np.asarray(res.x)


def fit(runs: Sequence[ProbeRun]) -> tuple[float, float, float, float, float, float]:
    """(request_s, prompt_token_s, token_s, delivery_s, latency_s, the CPU fit's median
    relative error) from probe runs:

    - the CPU of a run: a constant per run (the client's set-up, the metrics read), one per
      request, one per token streamed and one per delivery of a step's events (a wake-up of
      the event loop), of which the last two are kept (`token_s`, `delivery_s`);
    - what the client waits for its first token beyond the server's count (from the engine's
      submission), per run: `latency_s` + the admissions it waits behind, (C - 1) / 2 of the
      C sent together on average, each `request_s` + `prompt_token_s` x its prompt, plus its
      own prompt's.
    """
    if len({(r.requests, r.prompt_tokens, r.tokens) for r in runs}) < 4:
        raise KCloudError("the front end's costs need four probes of different shapes or more",
                          f"probe as `PROBES` does ({len(PROBES)} shapes)")
    rows = np.array([[1.0, r.requests, r.tokens, r.deliveries] for r in runs])
    cpu = np.array([r.cpu_s for r in runs])
    c = _robust_nnls(rows, cpu)
    err = float(np.median(np.abs(rows @ c - cpu) / cpu))
    token_s, delivery_s = float(c[2]), float(c[3])
    ahead = np.array([(r.requests - 1) / 2 for r in runs])
    prompt = np.array([r.prompt_tokens / r.requests for r in runs])
    q = np.column_stack([np.ones(len(runs)), ahead, prompt * (ahead + 1)])
    gap = np.array([max(1e-6, r.client_ttft_s - r.server_ttft_s) for r in runs])
    latency_s, request_s, prompt_token_s = (float(x) for x in _robust_nnls(q, gap))
    return request_s, prompt_token_s, token_s, delivery_s, latency_s, err


def measure(url: str, model: str | None = None, *,
            probes: Sequence[tuple[int, int, int]] | None = None,
            rounds: int = ROUNDS, save: bool = True,
            progress: Callable[[str], None] | None = None) -> FrontEndCosts:
    """Probe the server at `url` (serving the language model `model`, default its first), fit,
    save (unless not `save`) and return its front-end costs on this host."""
    served = served_config(url, model)
    model, cfg = served.name, served.config
    load0 = os.getloadavg()[0]
    runs = []
    probe(url, model, 2, 16, 8)  # the client's and server's first requests: not measured
    for n, prompt, output in PROBES if probes is None else probes:
        output = max(1, min(output, cfg.max_len // 2))  # a short context: probes that fit it
        prompt = max(1, min(prompt, cfg.max_len - output - 1))
        if progress is not None:
            progress(f"{n} requests of {prompt} prompt and {output} output tokens together, "
                     f"{rounds} rounds")
        runs += [probe(url, model, n, prompt, output, seed=k) for k in range(rounds)]
    request_s, prompt_token_s, token_s, delivery_s, latency_s, err = fit(runs)
    costs = FrontEndCosts(request_s=request_s, prompt_token_s=prompt_token_s, token_s=token_s,
                          delivery_s=delivery_s, latency_s=latency_s, cores=host_cores(),
                          date=_dt.date.today().isoformat(), probes=len(runs),
                          load_avg=round(statistics.mean([load0, os.getloadavg()[0]]), 2),
                          fit_error_pct=round(100 * err, 1))
    if save:
        save_front_end_costs(costs)
    return costs


def describe(c: FrontEndCosts) -> str:
    return (f"{c.request_s * 1e3:.2f} ms to admit a request and {c.prompt_token_s * 1e6:.2f} us "
            f"a prompt token, {c.latency_s * 1e3:.2f} ms a request's way; CPU "
            f"{c.token_s * 1e6:.0f} us a token streamed and {c.delivery_s * 1e6:.0f} us a step's "
            f"delivery (fit within {c.fit_error_pct:.0f} %); {c.source}")


__all__ = ["PROBES", "ProbeRun", "Served", "describe", "fit", "measure", "probe", "served_config"]
