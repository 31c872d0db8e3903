"""Predicted vs measured latency on this machine's CPU cores (the `local-cpu` cluster).

For each model and plan shape (one worker, a 2-stage pipeline, a tensor-parallel pair), the
planner's predicted request latency (modeled, from the cost model with this host's measured
parameters) is compared with the latency the runtime measures: a request alone in the idle
pipeline, the median over the latency probes of all the repeated runs. Runs are interleaved so that
drift of a shared host hits every plan alike.

    python benchmarks/bench_prediction.py [--models mlp,tiny-resnet,tiny-gpt] [--batch 8]
        [--repeats 5] [--probes 7] [--cached] [--json]

`--cached` keeps the host calibration cached from an earlier run; by default the host is
measured again first (about 5-10 s), so that parameters and runs see the same machine state.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

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
    ap.add_argument("--probes", type=int, default=7)
    ap.add_argument("--cached", action="store_true", help="keep the cached host calibration")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    t0 = time.perf_counter()
    hp = measure_host_params(force=not a.cached)
    calib_s = time.perf_counter() - t0
    plans: dict[tuple[str, str], Plan] = {}
    for model in a.models.split(","):
        for shape, (tp, pp) in SHAPES.items():
            plan = _plan(model, a.batch, tp, pp)
            if plan is not None:
                plans[model, shape] = plan
    runs: dict[tuple[str, str], list[RunReport]] = {k: [] for k in plans}
    for _ in range(a.repeats):
        for key, plan in plans.items():
            r = execute(plan, mode="real", n_micro=4, probes=a.probes, trace_path=None)
            if not r.reference_ok:
                raise SystemExit(f"{key}: outputs differ from the reference ({r.max_abs_error})")
            runs[key].append(r)

    rows = []
    for (model, shape), plan in plans.items():
        # every probe of every run: runs spread the probes over the benchmark's minutes, so
        # that a burst of host interference during one run does not decide the figure
        probes = [x for r in runs[model, shape] for x in r.measured["probe_latencies_s"]]
        measured = statistics.median(probes)
        predicted = plan.predicted.latency_s
        stages = runs[model, shape][len(runs[model, shape]) // 2].stages
        rows.append({
            "model": model, "plan": shape, "batch": a.batch,
            "predicted_latency_s": predicted, "measured_latency_s": measured,
            "measured_runs_s": [r.measured["latency_s"] for r in runs[model, shape]],
            "ratio": predicted / measured,
            "within_target": abs(predicted / measured - 1.0) <= TARGET,
            "stages": [{"layers": list(s.layers), "tp": s.tp,
                        "measured_compute_s": s.measured_compute_s,
                        "measured_allreduce_s": s.measured_allreduce_s,
                        "predicted_s": s.predicted_time_s} for s in stages],
        })
    out = {
        "figures": "predicted = modeled (cost model, host parameters measured "
                   f"{hp.date}); measured = median request latency alone in the pipeline, over "
                   "the probes of all runs",
        "host_calibration_s": calib_s, "host_fit_error_pct": hp.fit_error_pct,
        "host_load_1min": os.getloadavg()[0], "target": f"within {TARGET:.0%}",
        "rows": rows,
    }
    if a.json:
        print(json.dumps(out))
        return
    print(f"host parameters measured in {calib_s:.1f} s (fit error of the timed chains "
          f"{hp.fit_error_pct:.1f} %); {a.repeats} runs x {a.probes} latency probes each; "
          f"1-min load {out['host_load_1min']:.2f}")
    print(f"{'model':<12} {'plan':<20} {'modeled':>12} {'measured':>12} {'ratio':>10}")
    for r in rows:
        flag = "" if r["within_target"] else f"  (outside {TARGET:.0%})"
        print(f"{r['model']:<12} {r['plan']:<20} {r['predicted_latency_s'] * 1e3:9.3f} ms "
              f"{r['measured_latency_s'] * 1e3:9.3f} ms {r['ratio']:10.2f}{flag}")
        for s in r["stages"]:
            ar = (f", of which all-reduce {s['measured_allreduce_s'] * 1e3:.3f} ms measured"
                  if s["tp"] > 1 else "")
            print(f"{'':<12}   layers {s['layers'][0]}-{s['layers'][1]} x{s['tp']}: "
                  f"{s['predicted_s'] * 1e3:.3f} ms modeled, compute in the stream "
                  f"{s['measured_compute_s'] * 1e3:.3f} ms measured{ar}")
    inside = sum(r["within_target"] for r in rows)
    print(f"{inside} of {len(rows)} plans within {TARGET:.0%} (ratio = modeled / measured "
          "request latency)")


if __name__ == "__main__":
    main()
