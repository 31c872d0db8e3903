"""Measure what a step of the engine's CPU workers costs on this host beyond the cost model's
kernels (`kcloud.hardware.host.EngineStepCosts`): the simulator adds it to every step of a
replica on host CPU cores, so that a simulated `local-cpu` service steps as a served one does.

An `Engine` of the given plan (real mode, every stage on this host's cores) runs a grid of
loads: decode batches of 1 to 16 sequences at short and long contexts, and prompts prefilled in
chunks. Every step's time is taken as the engine sees it (the command sent to the result back,
`Engine.step_times`), beside the cost model's time of that step (`kcloud.hardware.steps`, as
the engine's pacer costs it). The difference is fitted by non-negative least squares (scipy)
to a constant per step, one per row and three per byte of KV cache (read by decode rows,
written by prompt chunks, per (query, key) pair of a chunk), and saved in the host's cache.
"""

from __future__ import annotations

import datetime as _dt
import os
import statistics
import time

import numpy as np
from scipy.optimize import nnls

from kcloud.errors import KCloudError
from kcloud.hardware.host import EngineStepCosts, save_engine_step_costs
from kcloud.planner.plan import Plan

# (sequences, prompt tokens, generated tokens) of each load of the grid
LOADS: tuple[tuple[int, int, int], ...] = (
    (1, 32, 24), (4, 64, 24), (16, 64, 24), (1, 900, 24), (4, 700, 24), (8, 300, 24),
)


def measure(plan: Plan, *, save: bool = True) -> EngineStepCosts:
    """Time the engine of `plan` (an LLM on host CPU cores) over `LOADS`; fit, save, return."""
    from kcloud.hardware.catalog import get_device
    from kcloud.hardware.steps import stage_tables_for
    from kcloud.runtime.engine import Engine, _pacer
    from kcloud.runtime.model import layer_graph
    from kcloud.runtime.scheduler import SamplingParams

    if any(not s.device_type.startswith("host-cpu") for r in plan.replicas for s in r.stages):
        raise KCloudError("the engine's step costs are measured on this host's CPU cores",
                          "give a plan on local-cpu")
    modeled = _pacer(plan, "real", True, emulated_only=False)
    decode = layer_graph(plan.model, batch=1, seq_len=1, phase="decode", kv_len=64)
    forward = layer_graph(plan.model, batch=1, seq_len=plan.seq_len, phase=plan.phase)
    st = plan.replicas[0].stages[0]
    kvb = stage_tables_for(st, forward, decode, get_device(st.device_type),
                           None).tables.kv_bytes_per_token(st.start, st.end)
    eng = Engine(plan, mode="real", pace=False)
    eng.start()
    samples: list[tuple[tuple[int, float, int, float], int, float, float]] = []
    load0 = os.getloadavg()[0]
    try:
        for n, prompt, out in LOADS:
            eng.step_times = []
            for i in range(n):
                eng.submit([5 + (i * 7 + j) % 200 for j in range(prompt)],
                           SamplingParams(max_tokens=out, min_tokens=out, ignore_eos=True))
            deadline = time.monotonic() + 120.0
            while eng.busy and time.monotonic() < deadline:
                eng.step(0.5)
            for ri, plan_step, wall in eng.step_times:
                samples.append((plan_step.shape(), len(plan_step.rows), wall,
                                modeled(ri, plan_step) or 0.0))
    finally:
        eng.stop()
    if len(samples) < 20:
        raise KCloudError(f"the engine ran {len(samples)} steps, too few to fit",
                          "check that the plan's workers start on this host")
    rows = np.array([[1.0, r, kv * kvb, pre * kvb, pairs * kvb]
                     for (_, kv, pre, pairs), r, _, _ in samples])
    resid = np.array([wall - m for _, _, wall, m in samples])
    scale = rows.max(axis=0)
    scale[scale == 0] = 1.0
    coef, _ = nnls(rows / scale, resid)
    coef = coef / scale
    fitted = rows @ coef + np.array([m for *_, m in samples])
    walls = np.array([w for _, _, w, _ in samples])
    costs = EngineStepCosts(step_s=float(coef[0]), row_s=float(coef[1]),
                            kv_byte_s=float(coef[2]), prefill_byte_s=float(coef[3]),
                            pair_byte_s=float(coef[4]), date=_dt.date.today().isoformat(),
                            steps=len(samples),
                            load_avg=round(statistics.mean([load0, os.getloadavg()[0]]), 2),
                            fit_error_pct=round(100 * float(np.median(
                                np.abs(fitted - walls) / walls)), 1))
    if save:
        save_engine_step_costs(costs)
    return costs


def _main() -> None:  # python -m kcloud.runtime.step_costs PLAN.json
    import sys

    print(measure(Plan.load(sys.argv[1])))


if __name__ == "__main__":
    _main()
