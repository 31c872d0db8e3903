"""Measure what a step of the engine's CPU workers costs on this host beyond the cost model's
kernels (`kcloud.hardware.host.EngineStepCosts`): the simulator adds it to every step of a
replica on host CPU cores, so that a simulated `local-cpu` service steps as a served one does.

An `Engine` of the given plan (real mode, every stage on this host's cores) runs a grid of
loads: decode batches of 1 to 16 sequences at short and long contexts, long conversations beside
short ones (their decode rows attend in several groups), and prompts prefilled in chunks. Every
step's time is taken as the engine sees it (the command sent to the result back,
`Engine.step_times`), beside the cost model's time of that step (`kcloud.hardware.steps`, as
the engine's pacer costs it). The difference is fitted, robustly (scipy's `least_squares`,
Cauchy loss), to a constant per step, one per row, one per attention group of decode rows and
four per byte of KV cache (read by decode rows, padded in their groups; read past a core's
share of the last-level cache; written by prompt chunks; per (query, key) pair of a chunk), and
saved in the host's cache. What the engine adds to a step cannot be negative, so the constants
of every step are; the two of prompt chunks are signed, since they also correct the cost
model's kernels of a chunk, which on one host ran 10-15 % faster than modeled while decode
steps ran slower: with every constant non-negative, a calibration whose chunks ran fast fitted
the decode extras to zero as well.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import random
import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import least_squares, nnls

from kcloud.errors import KCloudError
from kcloud.hardware.host import EngineStepCosts, cache_share_bytes, save_engine_step_costs
from kcloud.planner.plan import Plan

# each load of the grid: requests submitted together, as (sequences, prompt tokens, generated
# tokens)
LOADS: tuple[tuple[tuple[int, int, int], ...], ...] = (
    ((1, 32, 24),), ((4, 64, 24),), ((16, 64, 24),), ((1, 900, 24),), ((4, 700, 24),),
    ((8, 300, 24),), ((2, 2000, 24), (6, 100, 24)), ((4, 1500, 32), (4, 400, 32)),
    ((2, 4000, 16), (4, 50, 16)), ((8, 2500, 24),), ((6, 3000, 16), (6, 300, 16)),
)
WARM_UP = ((2, 1500, 8), (2, 300, 8))
# then a stream of requests (`_stream`): how many, per second, and its seed
STREAM, STREAM_RATE, STREAM_SEED = 32, 6.0, 7
# the grid and the stream, timed this many times: a decode step's extras are about the size of
# the engine's step-to-step jitter, and one pass's fit moved by +-25 % from one to the next
PASSES = 2


@dataclass(frozen=True)
class StepSample:
    """One timed step: its features (`FEATURES`, KV bytes included) and times."""

    features: tuple[float, ...]
    wall_s: float  # as the engine saw it, measured
    kernels_s: float  # the cost model's time of its kernels, modeled


# what a step's extra seconds are fitted to, in `EngineStepCosts`' order
FEATURES = ("step", "row", "KV byte read (padded)", "KV byte written", "pair x KV byte",
            "decode group", "KV byte read past the cache share")
# the prompt chunks' constants, signed: they also correct the modeled kernels of a chunk
SIGNED = ("KV byte written", "pair x KV byte")


def measure(plan: Plan, *, save: bool = True) -> EngineStepCosts:
    """Time the engine of `plan` (an LLM on host CPU cores) over `LOADS`; fit, save, return."""
    load0 = os.getloadavg()[0]
    samples = time_steps(plan)
    costs = fit(samples, load_avg=statistics.mean([load0, os.getloadavg()[0]]))
    if save:
        save_engine_step_costs(costs)
    return costs


def time_steps(plan: Plan) -> list[StepSample]:
    """Every step of the engine of `plan` over `LOADS`, timed."""
    from kcloud.hardware.catalog import get_device
    from kcloud.hardware.steps import stage_tables_for
    from kcloud.runtime.engine import Engine, _pacer
    from kcloud.runtime.model import layer_graph

    if any(not s.device_type.startswith("host-cpu") for r in plan.replicas for s in r.stages):
        raise KCloudError("the engine's step costs are measured on this host's CPU cores",
                          "give a plan on local-cpu")
    modeled = _pacer(plan, "real", True, emulated_only=False)
    decode = layer_graph(plan.model, batch=1, seq_len=1, phase="decode", kv_len=64)
    forward = layer_graph(plan.model, batch=1, seq_len=plan.seq_len, phase=plan.phase)
    st = plan.replicas[0].stages[0]
    kvb = stage_tables_for(st, forward, decode, get_device(st.device_type),
                           None).tables.kv_bytes_per_token(st.start, st.end)
    share = cache_share_bytes()
    eng = Engine(plan, mode="real", pace=False)
    eng.start()
    samples: list[StepSample] = []
    def take(steps: list[tuple[int, Any, float]]) -> None:
        for ri, step, wall in steps:
            _, _, pre, pairs = step.shape()
            groups, padded = step.decode_padding()
            samples.append(StepSample(
                (1.0, len(step.rows), padded * kvb, pre * kvb, pairs * kvb, groups,
                 max(0.0, padded * kvb - share)), wall, modeled(ri, step) or 0.0))

    try:
        for load in (WARM_UP, *LOADS * PASSES):
            eng.step_times = []
            for n, prompt, out in load:
                for i in range(n):
                    _submit(eng, prompt, out, i)
            deadline = time.monotonic() + 120.0
            while eng.busy and time.monotonic() < deadline:
                eng.step(0.5)
            if load is not WARM_UP:  # its steps meet shapes for the first time: not timed
                take(eng.step_times)
        for k in range(PASSES):
            eng.step_times = []
            _stream(eng, min(eng.max_len, 4096), STREAM_SEED + k)
            take(eng.step_times)
    finally:
        eng.stop()
    if len(samples) < 20:
        raise KCloudError(f"the engine ran {len(samples)} steps, too few to fit",
                          "check that the plan's workers start on this host")
    return samples


def _submit(eng: Any, prompt: int, out: int, i: int) -> None:
    """A request of `prompt` tokens (their ids vary with `i`) that generates exactly `out`."""
    from kcloud.runtime.scheduler import SamplingParams

    eng.submit([5 + (i * 7 + j) % 200 for j in range(prompt)],
               SamplingParams(max_tokens=out, min_tokens=out, ignore_eos=True))


def _stream(eng: Any, context: int, seed: int) -> None:
    """A served engine's states: `STREAM` requests arriving at random (Poisson, seeded) with
    prompts of 32 tokens to most of `context` (log-uniform) and 16 to 128 output tokens, so
    that long conversations decode beside short ones and prompt chunks land among decodes."""
    rng = random.Random(seed)
    at, reqs = 0.0, []
    for _ in range(STREAM):
        at += rng.expovariate(STREAM_RATE)
        prompt = int(math.exp(rng.uniform(math.log(32), math.log(0.75 * context))))
        reqs.append((at, prompt, rng.randint(16, 128)))
    t0 = time.monotonic()
    deadline = t0 + 180.0
    while (reqs or eng.busy) and time.monotonic() < deadline:
        now = time.monotonic() - t0
        while reqs and reqs[0][0] <= now:
            _, prompt, out = reqs.pop(0)
            _submit(eng, prompt, out, 0)
        # wait for results (not a spin: the driver would take a worker's core) or the next one
        eng.step(0.5 if not reqs else max(0.0, min(0.05, reqs[0][0] - now)))


def fit(samples: list[StepSample], load_avg: float = 0.0,
        cache_bytes: float | None = None) -> EngineStepCosts:
    """Constants for `FEATURES` that best explain each step's wall time beyond its kernels
    (non-negative but for `SIGNED`). The fit is robust (Cauchy loss on residuals relative to
    the step): a step that another process on the host delayed is an outlier, not a cost of
    the engine."""
    rows = np.array([s.features for s in samples])
    resid = np.array([s.wall_s - s.kernels_s for s in samples])
    walls = np.array([s.wall_s for s in samples])
    scale = rows.max(axis=0)
    scale[scale == 0] = 1.0
    a = rows / scale
    start, _ = nnls(a, resid)
    # residuals relative to the step: a long step's few ms of noise weigh as a short one's
    w = 1.0 / walls
    typical = float(np.median(np.abs(resid) * w)) or 1.0
    lower = np.array([-np.inf if f in SIGNED else 0.0 for f in FEATURES])
    res = least_squares(lambda c: (a @ c - resid) * w, start, bounds=(lower, np.inf),
                        loss="cauchy", f_scale=0.5 * typical)
    coef = res.x / scale
    fitted = rows @ coef + np.array([s.kernels_s for s in samples])
    return EngineStepCosts(step_s=float(coef[0]), row_s=float(coef[1]),
                           kv_byte_s=float(coef[2]), prefill_byte_s=float(coef[3]),
                           pair_byte_s=float(coef[4]), group_s=float(coef[5]),
                           spill_byte_s=float(coef[6]),
                           cache_bytes=cache_share_bytes() if cache_bytes is None
                           else cache_bytes,
                           date=_dt.date.today().isoformat(), steps=len(samples),
                           load_avg=round(load_avg, 2),
                           fit_error_pct=round(100 * float(np.median(
                               np.abs(fitted - walls) / walls)), 1))


def _main() -> None:  # python -m kcloud.runtime.step_costs PLAN.json
    import sys

    print(measure(Plan.load(sys.argv[1])))


if __name__ == "__main__":
    _main()
