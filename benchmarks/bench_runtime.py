"""Runtime benchmark: a 2-stage pipeline of a compute-bound MLP on 2 one-thread workers vs one
worker, and the per-hop overhead of a micro-batch of small tensors. All figures measured.

    python benchmarks/bench_runtime.py [--width 1024] [--blocks 8] [--micro-batch 64]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from torch import nn

from kcloud.planner.plan import Plan, Predicted, Replica, Stage
from kcloud.runtime.executor import RunReport, execute
from kcloud.runtime.model import load_runnable
from kcloud.runtime.split import n_layers

HERE = Path(__file__).resolve()
HOST = "host-cpu:1core"


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(self.lin(x)))


class WideMLP(nn.Module):
    def __init__(self, width: int, blocks: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(Block(width) for _ in range(blocks)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def wide_mlp(batch: int = 64) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The compute-bound model; sizes from the environment, so workers rebuild the same one."""
    width = int(os.environ.get("KCLOUD_BENCH_WIDTH", "1024"))
    blocks = int(os.environ.get("KCLOUD_BENCH_BLOCKS", "8"))
    return WideMLP(width, blocks), (torch.randn(batch, width),)


def small_mlp(batch: int = 1) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Four tiny blocks: a hop of a 1 x 16 tensor costs more than the compute."""
    return WideMLP(16, 4), (torch.randn(batch, 16),)


def _matmuls(rank: int, width: int, batch: int, n: int, out: Any) -> None:
    torch.set_num_threads(1)
    a, b = torch.randn(batch, width), torch.randn(width, width)
    t0 = time.perf_counter()
    for _ in range(n):
        a @ b
    out.put(time.perf_counter() - t0)


def host_parallel_ceiling(width: int, batch: int, n: int = 100) -> float:
    """How much faster two one-thread processes do twice the matmuls than one (measured):
    the best a 2-stage pipeline can do on this host."""
    ctx = mp.get_context("spawn")
    times = {}
    for k in (1, 2):
        q = ctx.Queue()
        ps = [ctx.Process(target=_matmuls, args=(i, width, batch, n, q)) for i in range(k)]
        for p in ps:
            p.start()
        times[k] = max(q.get(timeout=120) for _ in ps)
        for p in ps:
            p.join(timeout=10)
    return 2 * times[1] / times[2]


def _plan(spec: str, micro_batch: int, cut: int | None) -> Plan:
    module, inputs = load_runnable(spec, batch=micro_batch)
    n = n_layers(module, inputs)
    pts = [0, n] if cut is None else [0, cut, n]
    stages = tuple(Stage(a, b, HOST, (f"local/{HOST}/{i}",), "fp32")
                   for i, (a, b) in enumerate(itertools.pairwise(pts)))
    return Plan(model=spec, cluster="local-cpu", objective="throughput", batch=micro_batch,
                micro_batch=micro_batch, seq_len=None, phase="forward", n_layers=n,
                replicas=(Replica(stages),),
                predicted=Predicted(0.0, 0.0, "samples/s", 0.0, 0.0, 0.0, None, 0.0))


def _run(plan: Plan, n_micro: int) -> RunReport:
    r = execute(plan, n_micro=n_micro, trace_path=None)
    if not r.reference_ok:
        raise SystemExit(f"outputs differ from the reference: {r.max_abs_error}")
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=32)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    os.environ["KCLOUD_BENCH_WIDTH"] = str(a.width)
    os.environ["KCLOUD_BENCH_BLOCKS"] = str(a.blocks)
    spec = f"{HERE}:wide_mlp"
    one = _run(_plan(spec, a.micro_batch, None), a.batches)
    two = _run(_plan(spec, a.micro_batch, a.blocks // 2), a.batches)
    speedup = two.measured["throughput"] / one.measured["throughput"]
    ceiling = host_parallel_ceiling(a.width, a.micro_batch)

    small = f"{HERE}:small_mlp"
    s1 = _run(_plan(small, 1, None), 200)
    s2 = _run(_plan(small, 1, 2), 200)
    hop_latency = s2.measured["latency_s"] - s1.measured["latency_s"]
    hop_send = s2.stages[0].measured_send_s
    out = {
        "figures": "measured",
        "model": f"MLP {a.blocks} x Linear({a.width}, {a.width}), micro-batch {a.micro_batch}",
        "one_worker_throughput": one.measured["throughput"],
        "two_stage_throughput": two.measured["throughput"],
        "unit": "samples/s",
        "speedup": speedup,
        "host_parallel_ceiling": ceiling,
        "stage_compute_s": [s.measured_compute_s for s in two.stages],
        "one_worker_compute_s": one.stages[0].measured_compute_s,
        "hop_send_s_small": hop_send,
        "hop_latency_s_small": hop_latency,
    }
    if a.json:
        print(json.dumps(out))
        return
    print(f"{out['model']}, {a.batches} micro-batches (measured)")
    print(f"  1 worker  (1 thread):      {out['one_worker_throughput']:10.1f} samples/s")
    print(f"  2 stages  (1 thread each): {out['two_stage_throughput']:10.1f} samples/s")
    print(f"  speedup: {speedup:.2f}x (target >= 1.6x); this host runs two one-thread "
          f"matmul processes {ceiling:.2f}x as fast as one (the ceiling here)")
    print("  stage compute per micro-batch: "
          + ", ".join(f"{t * 1e3:.2f} ms" for t in out["stage_compute_s"])
          + f" (whole model on one worker: {out['one_worker_compute_s'] * 1e3:.2f} ms)")
    print(f"per-hop overhead, 1 x 16 fp32 micro-batch: send {hop_send * 1e6:.0f} us, "
          f"added latency {hop_latency * 1e6:.0f} us (measured)")


if __name__ == "__main__":
    main()
