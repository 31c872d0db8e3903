"""Fleet simulator speed, and K-Cloud beside Vidur on the same work.

    .venv/bin/python benchmarks/bench_sim.py [--sizes 10000,100000,1000000] [--json]

1. Simulated requests per wall-second (measured) for 10^4, 10^5, 10^6 requests of a Poisson
   stream with the Azure conversation trace's lengths, on the Vidur configuration below at a
   rate that keeps it busy but not saturated. Goal: over 1,000,000 requests per minute on one core.
2. Vidur's configuration (`../shared/reference/vidur/`: Llama-2-70B on A100, tensor parallel 2 x
   pipeline 2 per replica, 4 replicas, Sarathi chunked prefill with 512-token chunks and a batch
   cap of 128, round-robin routing, the whole Azure conversation trace clipped to 4,096 tokens
   per request), simulated by K-Cloud, printed beside Vidur's own results and speed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from kcloud.hardware.steps import StageSpan

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
if not SHARED.is_dir():
    SHARED = Path("/work/shared")
VIDUR = SHARED / "reference" / "vidur"
TRACE = SHARED / "traces" / "azure-llm-2023-conversation.csv"


@dataclass(frozen=True)
class _Replica:
    stages: tuple[StageSpan, ...]


@dataclass(frozen=True)
class _Plan:
    replicas: tuple[_Replica, ...]
    micro_batch: int = 1
    output_tokens: int | None = None


def vidur_fleet():
    """Llama-2-70B, 4 replicas of TP2 x PP2 on A100-80GB (4 per node, pairwise NVLink)."""
    from kcloud.graph.loaders import load_model_spec
    from kcloud.hardware.cluster import cluster_from_dict
    from kcloud.sim.replica import replica_models

    dev = "nvidia-a100-sxm-80gb"
    cluster = cluster_from_dict({"name": "a100x16", "nodes": [
        {"name": "a100", "count": 4, "devices": {dev: 4},
         "link": {"bandwidth_gbps": 300, "latency_us": 3, "name": "nvlink (pairwise)"}}]},
        "bench")
    pre = load_model_spec("llama-2-70b", batch=1, seq_len=1024, phase="prefill", kv_len=None)
    dec = load_model_spec("llama-2-70b", batch=1, seq_len=1, phase="decode", kv_len=1024)
    n = len(pre.layers)
    cut = n // 2 + 1  # embeddings first: 40 decoder blocks on each stage
    reps = []
    for r in range(4):
        node = f"a100-{r}"
        reps.append(_Replica((
            StageSpan(0, cut, dev, "fp16", (f"{node}/{dev}/0", f"{node}/{dev}/1")),
            StageSpan(cut, n, dev, "fp16", (f"{node}/{dev}/2", f"{node}/{dev}/3")))))
    return replica_models(_Plan(tuple(reps)), cluster, pre, dec)


def simulate(models, stream, router: str = "round-robin"):
    from kcloud.planner.scheduling import SchedulerConfig
    from kcloud.sim.fleet import Service, Simulator

    cap = min(m.kv_token_capacity(512) for m in models)
    sched = SchedulerConfig(token_budget=512, max_batch=128, block_size=16,
                            num_blocks=cap // 16)
    svc = Service("chat", models, stream, replicas=len(models), router=router, sched=sched)
    return Simulator([svc], bin_s=60.0).run()


def speed(models, sizes: list[int]) -> list[dict]:
    from kcloud.sim.streams import Lengths, read_trace, synthetic_stream

    tr = read_trace(TRACE)
    out = []
    for n in sizes:
        stream = synthetic_stream(5.5, limit=n, seed=1, lengths=Lengths(trace=tr))
        t0, c0 = time.perf_counter(), time.process_time()
        res = simulate(models, ((a, min(p, 4096 - o), o) for a, p, o in stream))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        out.append({"requests": n, "wall_s": wall, "cpu_s": cpu, "requests_per_s": n / wall,
                    "requests_per_min": 60 * n / wall,
                    "requests_per_cpu_min": 60 * n / cpu if cpu > 0 else None,
                    "events": res.events,
                    "completed": res.completed})
    return out


def vidur_side_by_side(models) -> dict:
    from kcloud.sim.streams import read_trace, trace_stream

    ref = json.loads((VIDUR / "azure-conv-llama2-70b-a100-tp2pp2-x4-sarathi.summary.json")
                     .read_text())
    t0 = time.perf_counter()
    res = simulate(models, trace_stream(read_trace(TRACE), max_tokens=4096))
    wall = time.perf_counter() - t0
    d = res.to_dict()["services"]["chat"]
    ours = {"ttft_s": d["ttft_s"], "tpot_s": d["tpot_s"], "e2e_s": d["e2e_s"],
            "queueing_s": d["queueing_s"], "makespan_s": res.span_s,
            "requests": res.requests, "wall_s": wall, "preemptions": d["preemptions"],
            "requests_per_min": 60 * res.requests / wall}
    def q(key: str) -> dict:
        return {f"p{round(float(k) * 100)}": v for k, v in ref[key].items()}
    theirs = {"ttft_s": q("prefill_e2e_time"),
              "tpot_s": q("decode_time_execution_plus_preemption_normalized"),
              "e2e_s": q("request_e2e_time"), "queueing_s": q("request_scheduling_delay"),
              "makespan_s": ref["sim_makespan_s"], "requests": ref["n_requests"],
              "wall_s": 164.0, "requests_per_min": 7100.0}
    return {"kcloud": ours, "vidur": theirs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    models = vidur_fleet()
    sp = speed(models, [int(x) for x in args.sizes.split(",")])
    vs = vidur_side_by_side(models)
    if args.json:
        print(json.dumps({"speed": sp, "vidur": vs}))
        return
    print("simulator speed (measured, one core; goal > 1,000,000 requests/min): wall time, and "
          "the process's CPU time (what a shared machine's other tenants leave out)")
    for r in sp:
        print(f"  {r['requests']:>9,} requests: {r['wall_s']:8.2f} s wall "
              f"{r['requests_per_min']:>12,.0f} requests/min; {r['cpu_s']:8.2f} s CPU "
              f"{r['requests_per_cpu_min']:>12,.0f} requests/CPU-min  ({r['events']:,} events)")
    print(f"  load average (1 min) at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} "
          "cores")
    print(f"  Vidur (reference, measured by its authors' code here): "
          f"{vs['vidur']['requests_per_min']:,.0f} requests/min")
    print()
    print("Llama-2-70B on A100, TP2 x PP2, 4 replicas, Sarathi chunk 512, Azure conversation "
          "trace (19,366 requests): K-Cloud (modeled) | Vidur (its results)")
    for key, label in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("e2e_s", "end to end"),
                       ("queueing_s", "scheduling delay")):
        k, v = vs["kcloud"][key], vs["vidur"][key]
        cells = "  ".join(f"{p} {k[p]:8.3f} | {v[p]:8.3f}" for p in ("p50", "p90", "p99"))
        print(f"  {label:<17} s: {cells}")
    print(f"  makespan s: {vs['kcloud']['makespan_s']:,.1f} | {vs['vidur']['makespan_s']:,.1f}; "
          f"wall s: {vs['kcloud']['wall_s']:.2f} (measured) | {vs['vidur']['wall_s']:.0f}; "
          f"preemptions {vs['kcloud']['preemptions']}")


if __name__ == "__main__":
    sys.exit(main())
