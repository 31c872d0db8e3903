"""Predicted vs measured latency on this machine's CPU cores (the `local-cpu` cluster).

For each model and plan shape (one worker, a 2-stage pipeline, a tensor-parallel pair), the
planner's predicted request latency (modeled, from the cost model with this host's measured
parameters) is compared with the latency the runtime measures: a request reaching the idle
pipeline, the median of a run's latency probes. A shared host drifts by tens of percent over
minutes (other tenants), so every repeat first measures the host's parameters again and then
runs every plan: each repeat compares a prediction with runs of the same machine state. The
figure per plan is the median over the repeats of (modeled / measured); the spread of the
repeats, and of the calibrations, is printed beside it.

    python benchmarks/bench_prediction.py [--models mlp,tiny-resnet,tiny-gpt] [--batch 8]
        [--repeats 5] [--probes 15] [--cached] [--json]

With `--json` each row also gives the ratio against the mean of a repeat's probes: the model's
figure is an expected time, and a request that pays few all-reduces, each either a few tenths
of a ms or about 4 ms on a shared host, has a median below its mean.

`--cached` keeps the host calibration cached from an earlier run for every repeat (faster;
the prediction then comes from another moment of the host).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

from kcloud.graph import zoo
from kcloud.hardware.host import measure_host_params
from kcloud.planner.api import resolve
from kcloud.planner.assign import build_plan
from kcloud.planner.baselines import _uniform
from kcloud.planner.evaluate import Mix
from kcloud.planner.goal import Goal
from kcloud.planner.plan import Plan
from kcloud.planner.search import make_context
from kcloud.precision import Precision
from kcloud.runtime.executor import RunReport, execute

SHAPES = {"1 worker": (1, 1), "2-stage pipeline": (1, 2), "tensor-parallel x2": (2, 1)}
TARGET = 0.20
LLM_TOKENS = (32, 8)  # prompt and generated tokens per request of an LLM


def _plan(model: str, batch: int, tp: int, pp: int) -> Plan | None:
    llm = zoo.is_zoo_model(model) and zoo.model_info(model).is_llm
    goal = Goal(objective="latency", batch=batch, precision=Precision.FP32,
                input_tokens=LLM_TOKENS[0] if llm else None,
                output_tokens=LLM_TOKENS[1] if llm else None)
    m, c = resolve(model, "local-cpu", goal)
    ctx = make_context(m, c, goal, micro_batches=[batch])
    path = _uniform(ctx, batch, 0, tp, pp)
    return None if path is None else build_plan(ctx, Mix(((ctx.evaluate(batch, path), 1),)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="mlp,tiny-resnet,tiny-gpt")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--probes", type=int, default=15)
    ap.add_argument("--cached", action="store_true", help="keep the cached host calibration")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    keys = [(model, shape) for model in a.models.split(",") for shape in SHAPES]
    repeats: list[dict[str, Any]] = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        hp = measure_host_params(force=not a.cached)
        calib_s = time.perf_counter() - t0
        plans = {k: p for k in keys if (p := _plan(k[0], a.batch, *SHAPES[k[1]])) is not None}
        runs: dict[tuple[str, str], RunReport] = {}
        for key, plan in plans.items():
            r = execute(plan, mode="real", n_micro=4, probes=a.probes, trace_path=None)
            if not r.reference_ok:
                raise SystemExit(f"{key}: outputs differ from the reference ({r.max_abs_error})")
            runs[key] = r
        repeats.append({"host": hp, "calibration_s": calib_s, "plans": plans, "runs": runs})

    rows = []
    for key in keys:
        pairs = [(rep["plans"][key], rep["runs"][key]) for rep in repeats if key in rep["runs"]]
        if not pairs:
            continue
        predicted = [p.predicted.latency_s for p, _ in pairs]
        measured = [r.measured["latency_s"] for _, r in pairs]
        means = [statistics.mean(r.measured["probe_latencies_s"]) for _, r in pairs]
        ratios = [p / m for p, m in zip(predicted, measured, strict=True)]
        ratio = statistics.median(ratios)
        mean_ratios = [p / m for p, m in zip(predicted, means, strict=True)]
        plan, run = pairs[len(pairs) // 2]
        rows.append({
            "model": key[0], "plan": key[1], "batch": a.batch,
            "predicted_latency_s": statistics.median(predicted),
            "measured_latency_s": statistics.median(measured),
            "predicted_runs_s": predicted, "measured_runs_s": measured, "ratios": ratios,
            "measured_mean_runs_s": means, "mean_ratios": mean_ratios,
            "mean_ratio": statistics.median(mean_ratios),
            "ratio": ratio, "within_target": abs(ratio - 1.0) <= TARGET,
            "stages": [{"layers": list(s.layers), "tp": s.tp,
                        "measured_compute_s": s.measured_compute_s,
                        "measured_allreduce_s": s.measured_allreduce_s,
                        "predicted_s": s.predicted_time_s} for s in run.stages],
        })
    hosts = [rep["host"] for rep in repeats]
    out = {
        "figures": "predicted = modeled (cost model, host parameters measured before each "
                   "repeat); measured = median latency of a repeat's probes; ratio = median "
                   "over the repeats of modeled / measured",
        "host_calibration_s": [rep["calibration_s"] for rep in repeats],
        "host_fit_error_pct": [h.fit_error_pct for h in hosts],
        "host_link_latency_s": [h.link_latency_s for h in hosts],
        "host_collective_latency_s": [h.collective_latency_s for h in hosts],
        "host_resume_s": [h.resume_s for h in hosts],
        "host_load_1min": os.getloadavg()[0], "target": f"within {TARGET:.0%}",
        "rows": rows,
    }
    if a.json:
        print(json.dumps(out))
        return
    def spread(xs: list[float], scale: float = 1.0, fmt: str = ".2f") -> str:
        return f"{min(xs) * scale:{fmt}}-{max(xs) * scale:{fmt}}"

    print(f"{a.repeats} repeats, each: host parameters measured (modeled inputs; "
          f"{spread(out['host_calibration_s'], 1.0, '.1f')} s; fit error of the timed chains "
          f"{spread(out['host_fit_error_pct'], 1.0, '.1f')} %; link "
          f"{spread(out['host_link_latency_s'], 1e3, '.3f')} ms; all-reduce "
          f"{spread(out['host_collective_latency_s'], 1e3, '.3f')} ms; resume "
          f"{spread(out['host_resume_s'], 1e3, '.3f')} ms), then every plan run with "
          f"{a.probes} latency probes; 1-min load {out['host_load_1min']:.2f}")
    print(f"{'model':<12} {'plan':<20} {'modeled':>12} {'measured':>12} {'ratio':>7}  "
          "ratio per repeat")
    for r in rows:
        flag = "" if r["within_target"] else f"  (outside {TARGET:.0%})"
        print(f"{r['model']:<12} {r['plan']:<20} {r['predicted_latency_s'] * 1e3:9.3f} ms "
              f"{r['measured_latency_s'] * 1e3:9.3f} ms {r['ratio']:7.2f}  "
              f"{' '.join(f'{x:.2f}' for x in r['ratios'])}{flag}")
        for s in r["stages"]:
            ar = (f", of which all-reduce {s['measured_allreduce_s'] * 1e3:.3f} ms measured"
                  if s["tp"] > 1 else "")
            print(f"{'':<12}   layers {s['layers'][0]}-{s['layers'][1]} x{s['tp']}: "
                  f"{s['predicted_s'] * 1e3:.3f} ms modeled, compute in the stream "
                  f"{s['measured_compute_s'] * 1e3:.3f} ms measured{ar}")
    inside = sum(r["within_target"] for r in rows)
    print(f"{inside} of {len(rows)} plans within {TARGET:.0%} (ratio = median over the repeats "
          "of modeled / measured request latency; modeled and measured columns: medians)")


if __name__ == "__main__":
    main()
