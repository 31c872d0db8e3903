"""torch's own pipeline runtime (`torch.distributed.pipelining`) on the same 2-stage split as
K-Cloud's executor, for bench_runtime.py: 2 processes on 127.0.0.1, gloo, one thread each,
forward only (no loss function, so no backward), a GPipe or 1F1B schedule.

The model and its weights come from `load_runnable` (seeded: the same as K-Cloud's workers
build) and the stages from `split_model`, so both runtimes run the same two fx submodules.
Both keep freed memory in the process heap (`keep_heap`), as K-Cloud's workers do.
"""

from __future__ import annotations

import os
import queue as queue_mod
import socket
import statistics
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kcloud.hardware.host import keep_heap

SCHEDULES = ("gpipe", "1f1b")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, port: int, spec: str, micro_batch: int, cut: int, n_micro: int,
            steps: int, schedule: str, results: Any) -> None:
    torch.set_num_threads(1)
    keep_heap()
    try:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        from kcloud.runtime.model import load_runnable, micro_batches
        from kcloud.runtime.split import n_layers, split_model

        module, example = load_runnable(spec, batch=micro_batch)
        n = n_layers(module, example)
        split = split_model(module, example, [(0, cut), (cut, n)])
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=2, timeout=timedelta(seconds=60))
        stage = PipelineStage(split.stages[rank], rank, 2, torch.device("cpu"))
        cls = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
        sched = cls(stage, n_micro)  # no loss_fn: forward only
        feeds = micro_batches(example, n_micro)
        batch = torch.cat([f[0] for f in feeds])  # the schedule cuts it into n_micro again
        times: list[float] = []
        cpu: list[float] = []
        out: Any = None
        with torch.no_grad():
            for i in range(steps + 1):  # the first step warms up (and builds the buffers)
                dist.barrier()
                t0, c0 = time.perf_counter(), time.process_time()
                out = sched.step(batch) if rank == 0 else sched.step()
                dist.barrier()  # both stages done
                if i:
                    times.append(time.perf_counter() - t0)
                    cpu.append(time.process_time() - c0)
            err = None
            if rank == 1:
                got = out[0] if isinstance(out, (tuple, list)) else out
                ref = torch.cat([module(*f) for f in feeds])
                err = float((got - ref).abs().max())
        dist.destroy_process_group()
        results.put(("done", rank, times, err, cpu))
    except BaseException as exc:  # reported to the driver
        results.put(("error", rank, f"{type(exc).__name__}: {exc}", None))


def run(spec: str, *, micro_batch: int, cut: int, n_micro: int, steps: int = 3,
        schedule: str = "gpipe", timeout_s: float = 120.0) -> dict[str, Any]:
    """Throughput of torch's pipeline runtime on `spec` cut at layer `cut` (measured)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, daemon=True, name=f"torch-pp-{r}",
                         args=(r, port, spec, micro_batch, cut, n_micro, steps, schedule,
                               results))
             for r in range(2)]
    got: dict[int, tuple[Any, ...]] = {}
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        while len(got) < 2:
            try:
                msg = results.get(timeout=0.2)
            except queue_mod.Empty:
                if time.monotonic() > deadline:
                    raise RuntimeError("torch pipelining did not finish in time") from None
                if any(p.exitcode not in (None, 0) for p in procs):
                    raise RuntimeError("a torch pipelining worker died") from None
                continue
            if msg[0] == "error":
                raise RuntimeError(f"torch pipelining rank {msg[1]}: {msg[2]}")
            got[msg[1]] = msg
    finally:
        _reap(procs)
        results.close()
        results.cancel_join_thread()
    step_s = statistics.median(got[0][2])
    return {"throughput": micro_batch * n_micro / step_s, "step_s": step_s,
            "per_micro_s": step_s / n_micro, "max_abs_error": got[1][3], "steps_s": got[0][2],
            "cpu_s": [got[0][4], got[1][4]],
            "schedule": schedule, "figures": "measured"}


def _reap(procs: list[Any]) -> None:
    for p in procs:
        if p.pid is not None:
            p.join(timeout=5.0)
    for p in procs:
        if p.pid is not None and p.is_alive():
            p.terminate()
            p.join(timeout=2.0)
            if p.is_alive():
                p.kill()
                p.join(timeout=2.0)


if __name__ == "__main__":  # a quick check: python benchmarks/_torch_pipelining.py
    from pathlib import Path

    here = Path(__file__).resolve().parent / "bench_runtime.py"
    os.environ.setdefault("KCLOUD_BENCH_WIDTH", "1024")
    os.environ.setdefault("KCLOUD_BENCH_BLOCKS", "8")
    for s in SCHEDULES:
        print(s, run(f"{here}:wide_mlp", micro_batch=64, cut=4, n_micro=32, schedule=s))
