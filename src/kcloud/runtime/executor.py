"""Executing a Plan with worker processes over torch.distributed (gloo, 127.0.0.1).

One worker per stage of each replica, one thread each. Micro-batches stream through each
replica's pipeline: a worker receives a micro-batch's tuple from the stage before, runs its
stage, and sends its tuple on (a header of kinds, dtypes and shapes first, then the tensors).
Data-parallel replicas take consecutive slices of the batch. The driver checks the outputs
against the single-process model, and reports measured times per stage and a timeline.

A stage with tensor-parallel degree > 1 runs whole on the first device of its group: sharding
is not executed yet (the report says so).
"""

from __future__ import annotations

import io
import os
import pickle
import queue as queue_mod
import re
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kcloud.errors import KCloudError
from kcloud.planner.plan import Plan
from kcloud.runtime import backends
from kcloud.runtime.model import layer_graph, load_runnable, micro_batches
from kcloud.runtime.split import flat_tensors, split_model
from kcloud.runtime.trace import write_trace

FP32_TOLERANCE = 1e-4


# ---- wire format ---------------------------------------------------------------------------

_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
           torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]
_DTYPE_CODE = {d: i for i, d in enumerate(_DTYPES)}
_TENSOR, _OBJECT = 0, 1


def send_tuple(values: tuple[Any, ...], dst: int) -> None:
    """Send a tuple: its header length, the header (kind, dtype, ndim, dims per item), then
    each item (a tensor, or any other value pickled into bytes)."""
    header: list[int] = [len(values)]
    payload: list[torch.Tensor] = []
    for v in values:
        if isinstance(v, torch.Tensor) and v.dtype in _DTYPE_CODE:
            t = v.detach().to("cpu").contiguous()
            header += [_TENSOR, _DTYPE_CODE[t.dtype], t.dim(), *t.shape]
        else:
            t = torch.frombuffer(bytearray(pickle.dumps(v)), dtype=torch.uint8)
            header += [_OBJECT, _DTYPE_CODE[torch.uint8], 1, t.numel()]
        payload.append(t)
    h = torch.tensor(header, dtype=torch.int64)
    dist.send(torch.tensor([h.numel()], dtype=torch.int64), dst)
    dist.send(h, dst)
    for t in payload:
        if t.numel():
            dist.send(t, dst)


def recv_tuple(src: int) -> tuple[Any, ...]:
    n = torch.empty(1, dtype=torch.int64)
    dist.recv(n, src)
    h = torch.empty(int(n.item()), dtype=torch.int64)
    dist.recv(h, src)
    header = h.tolist()
    out: list[Any] = []
    i = 1
    for _ in range(header[0]):
        kind, code, ndim = header[i], header[i + 1], header[i + 2]
        shape = header[i + 3 : i + 3 + ndim]
        i += 3 + ndim
        t = torch.empty(shape, dtype=_DTYPES[code])
        if t.numel():
            dist.recv(t, src)
        out.append(t if kind == _TENSOR else pickle.loads(t.numpy().tobytes()))
    return tuple(out)


def _to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _from_bytes(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


# ---- workers -------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSpec:
    rank: int
    world: int
    port: int
    replica: int
    stage: int
    device: str  # cluster slot
    device_type: str
    backend: str
    torch_device: str
    model: str
    micro_batch: int
    seq_len: int | None
    phase: str | None
    bounds: tuple[tuple[int, int], ...]
    n_micro: int
    prev: int | None  # rank of the stage before (None: first stage)
    next: int | None  # rank of the stage after (None: last stage)
    comm_timeout_s: float

    @property
    def label(self) -> str:
        return f"stage {self.stage} of replica {self.replica} on {self.device}"


def _one_line(exc: BaseException) -> str:
    text = re.sub(r"\s+", " ", str(exc)).strip()
    if len(text) > 240:
        text = text[:237] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _worker(spec: WorkerSpec, state: str, inputs: str | None, results: Any) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(spec.port)
    step = "setup"
    try:
        module, example = load_runnable(spec.model, batch=spec.micro_batch,
                                        seq_len=spec.seq_len, phase=spec.phase)
        stage = split_model(module, example, spec.bounds).stages[spec.stage]
        del module
        stage.load_state_dict(_from_bytes(Path(state).read_bytes()))
        dev = torch.device(spec.torch_device)
        stage.to(dev)
        feed = _from_bytes(Path(inputs).read_bytes()) if inputs is not None else None
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{spec.port}",
                                rank=spec.rank, world_size=spec.world,
                                timeout=timedelta(seconds=spec.comm_timeout_s))
        dist.barrier()
        events: list[tuple[str, int, int, int]] = []  # (action, micro-batch, start, end) ns
        outputs: list[Any] = []
        clock = time.perf_counter_ns
        with torch.inference_mode():
            for m in range(spec.n_micro):
                if spec.prev is None:
                    assert feed is not None
                    x = feed[m]
                else:
                    step = f"receive of micro-batch {m}"
                    t0 = clock()
                    x = recv_tuple(spec.prev)
                    events.append(("R", m, t0, clock()))
                step = f"micro-batch {m}"
                t0 = clock()
                x = tuple(v.to(dev) if isinstance(v, torch.Tensor) else v for v in x)
                y = stage(*x)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                events.append(("F", m, t0, clock()))
                if spec.next is not None:
                    step = f"send of micro-batch {m}"
                    t0 = clock()
                    send_tuple(y, spec.next)
                    events.append(("S", m, t0, clock()))
                else:
                    outputs.append(_detach(y[0]))
        step = "finish"
        results.put(("done", spec.rank, _to_bytes(outputs) if spec.next is None else None,
                     events))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException as exc:  # reported to the driver, which stops the run
        comm = step.startswith(("receive", "send", "finish")) or isinstance(
            exc, dist.DistBackendError)
        results.put(("error", spec.rank, f"{step}: {_one_line(exc)}", comm))
        results.close()
        results.join_thread()
        sys.exit(1)


def _detach(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().to("cpu")
    if isinstance(v, (tuple, list)):
        return type(v)(_detach(x) for x in v)
    if isinstance(v, dict):
        return {k: _detach(x) for k, x in v.items()}
    return v


# ---- report --------------------------------------------------------------------------------


@dataclass
class StageReport:
    replica: int
    stage: int
    layers: tuple[int, int]
    device_type: str
    devices: tuple[str, ...]
    backend: str
    figures: str  # "measured" (cpu, cuda) | "modeled" (emulated)
    measured_compute_s: float  # median per micro-batch, on the host or device it ran on
    measured_recv_s: float
    measured_send_s: float
    modeled_time_s: float | None  # emulated stages: the cost model's time per micro-batch
    predicted_time_s: float  # the plan's (modeled)
    tp: int
    note: str = ""

    @property
    def time_s(self) -> float:
        """The stage's time per micro-batch, as its `figures` say."""
        if self.modeled_time_s is not None:
            return self.modeled_time_s
        return self.measured_compute_s

    def to_dict(self) -> dict[str, Any]:
        return {
            "replica": self.replica, "stage": self.stage, "layers": list(self.layers),
            "device_type": self.device_type, "devices": list(self.devices),
            "backend": self.backend, "figures": self.figures, "time_s": self.time_s,
            "measured_compute_s": self.measured_compute_s,
            "measured_recv_s": self.measured_recv_s, "measured_send_s": self.measured_send_s,
            "modeled_time_s": self.modeled_time_s, "predicted_time_s": self.predicted_time_s,
            "tp": self.tp, "note": self.note,
        }


@dataclass
class RunReport:
    model: str
    mode: str
    micro_batch: int
    n_micro: int  # micro-batches per replica
    replicas: int
    max_abs_error: float
    reference_ok: bool
    measured: dict[str, Any]
    predicted: dict[str, Any]
    stages: list[StageReport]
    trace_file: str | None
    emulated: dict[str, Any] | None = None  # real stages measured + emulated stages modeled
    notes: list[str] = field(default_factory=list)
    outputs: list[Any] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "model": self.model, "mode": self.mode, "micro_batch": self.micro_batch,
            "micro_batches": self.n_micro, "replicas": self.replicas,
            "max_abs_error": self.max_abs_error, "reference_ok": self.reference_ok,
            "measured": self.measured, "predicted": self.predicted,
            "trace_file": self.trace_file, "stages": [s.to_dict() for s in self.stages],
            "notes": self.notes,
        }
        if self.emulated is not None:
            d["emulated"] = self.emulated
        return d


# ---- driver --------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else 0.0


def execute(
    plan: Plan,
    *,
    mode: str = "emulated",
    n_micro: int | None = None,
    trace_path: str | os.PathLike[str] | None = "kcloud-trace.json",
    timeout_s: float = 600.0,
    comm_timeout_s: float = 60.0,
) -> RunReport:
    """Run `plan` with one worker process per stage; check against the single-process model."""
    if mode not in backends.MODES:
        raise KCloudError(f"unknown mode '{mode}'", "use --mode real or --mode emulated")
    n = n_micro if n_micro is not None else max(1, plan.batch // plan.micro_batch)
    if n < 1:
        raise KCloudError(f"--batches must be positive, got {n}", "pass --batches 1 or more")
    if mode == "real":
        backends.check_real([s.device_type for r in plan.replicas for s in r.stages])

    module, example = load_runnable(plan.model, batch=plan.micro_batch, seq_len=plan.seq_len,
                                    phase=plan.phase)
    feeds = micro_batches(example, n * len(plan.replicas))
    specs: list[WorkerSpec] = []
    states: list[bytes] = []
    inputs: list[bytes | None] = []
    notes: list[str] = []
    port = _free_port()
    world = sum(len(r.stages) for r in plan.replicas)
    rank = 0
    for ri, rep in enumerate(plan.replicas):
        bounds = tuple((s.start, s.end) for s in rep.stages)
        split = split_model(module, example, bounds)
        if split.n_layers != plan.n_layers:
            raise KCloudError(
                f"{plan.model} has {split.n_layers} layers here but the plan has "
                f"{plan.n_layers}", "re-create the plan for this model with `kcloud plan`")
        for si, st in enumerate(rep.stages):
            be = backends.choose(st.device_type, mode, st.devices[0])
            last = si == len(rep.stages) - 1
            specs.append(WorkerSpec(
                rank=rank, world=world, port=port, replica=ri, stage=si, device=st.devices[0],
                device_type=st.device_type, backend=be.name, torch_device=be.torch_device,
                model=plan.model, micro_batch=plan.micro_batch, seq_len=plan.seq_len,
                phase=plan.phase, bounds=bounds, n_micro=n,
                prev=None if si == 0 else rank - 1, next=None if last else rank + 1,
                comm_timeout_s=comm_timeout_s,
            ))
            states.append(_to_bytes(split.stages[si].state_dict()))
            inputs.append(_to_bytes(feeds[ri * n:(ri + 1) * n]) if si == 0 else None)
            rank += 1
    if any(s.tp > 1 for r in plan.replicas for s in r.stages):
        notes.append("tensor-parallel stages ran whole on the first device of their group; "
                     "tensor-parallel sharding is not executed yet")

    # The cost model's times of emulated stages (before starting workers: errors come early).
    modeled: dict[int, float] = {}
    graph = None
    for sp in specs:
        if sp.backend == "emulated":
            st = plan.replicas[sp.replica].stages[sp.stage]
            if graph is None:
                graph = layer_graph(plan.model, batch=plan.micro_batch, seq_len=plan.seq_len,
                                    phase=plan.phase)
            modeled[sp.rank] = _modeled_stage_time(graph, st.device_type, st.precision,
                                                   plan.micro_batch, st.start, st.end, st.tp)

    results = _run_workers(specs, states, inputs, timeout_s)

    # Reference: the whole model in this process, micro-batch by micro-batch.
    outputs: list[Any] = []
    for ri, _ in enumerate(plan.replicas):
        last_rank = max(s.rank for s in specs if s.replica == ri)
        data = results[last_rank][0]
        assert data is not None
        outputs.extend(_from_bytes(data))
    err = 0.0
    with torch.inference_mode():
        for x, got in zip(feeds, outputs, strict=True):
            ref = module(*x)
            for a, b in zip(flat_tensors(ref), flat_tensors(got), strict=True):
                if a.shape != b.shape:
                    err = float("inf")
                elif a.numel():
                    err = max(err, float((a.float() - b.float()).abs().max()))

    stages = _stage_reports(plan, specs, results, modeled)
    if modeled:
        notes.append("emulated stages computed in fp32 on the host CPU; their times (at the "
                     "plan's precision) are modeled")
    timeline = {s.rank: results[s.rank][1] for s in specs}
    measured = _measured(plan, specs, timeline, n)
    trace_file = None
    if trace_path is not None:
        trace_file = str(write_trace(trace_path, specs, timeline, stages))
    unit = measured["unit"]
    pred = plan.predicted
    report = RunReport(
        model=plan.model, mode=mode, micro_batch=plan.micro_batch, n_micro=n,
        replicas=len(plan.replicas), max_abs_error=err, reference_ok=err < FP32_TOLERANCE,
        measured=measured,
        predicted={"latency_s": pred.latency_s, "throughput": pred.throughput,
                   "unit": pred.unit, "figures": "modeled"},
        stages=stages, trace_file=trace_file, notes=notes, outputs=outputs,
    )
    if any(s.figures == "modeled" for s in stages):
        report.emulated = _emulated_figures(plan, stages, unit)
    return report


def _run_workers(specs: list[WorkerSpec], states: list[bytes], inputs: list[bytes | None],
                 timeout_s: float) -> dict[int, tuple[bytes | None, list[Any]]]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    # Weights and inputs go through files, so that starting a worker never blocks on a pipe.
    tmp = tempfile.TemporaryDirectory(prefix="kcloud-run-")
    args = []
    for s, st, x in zip(specs, states, inputs, strict=True):
        sp = Path(tmp.name) / f"state{s.rank}.pt"
        sp.write_bytes(st)
        xp = None
        if x is not None:
            xp = Path(tmp.name) / f"inputs{s.rank}.pt"
            xp.write_bytes(x)
        args.append((s, str(sp), None if xp is None else str(xp), results))
    procs = [ctx.Process(target=_worker, args=a, daemon=True,
                         name=f"kcloud-stage-r{a[0].replica}s{a[0].stage}") for a in args]
    done: dict[int, tuple[bytes | None, list[Any]]] = {}
    errors: list[tuple[int, str, bool]] = []
    failed_at: float | None = None
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        while len(done) < len(specs):
            try:
                msg = results.get(timeout=0.1)
            except queue_mod.Empty:
                msg = None
            if msg is not None:
                if msg[0] == "done":
                    done[msg[1]] = (msg[2], msg[3])
                else:
                    errors.append((msg[1], msg[2], msg[3]))
                    failed_at = failed_at or time.monotonic()
            for s, p in zip(specs, procs, strict=True):
                if p.exitcode not in (None, 0) and s.rank not in done and \
                        not any(e[0] == s.rank for e in errors) and failed_at is None:
                    failed_at = time.monotonic()  # give its message a moment to arrive
            now = time.monotonic()
            if failed_at is not None and now - failed_at > 0.5:
                break
            if now > deadline:
                raise KCloudError(f"the run did not finish within {timeout_s:.0f} s",
                                  "run fewer micro-batches (--batches) or check the stages")
        if len(done) < len(specs):
            raise _failure(specs, procs, errors, done)
        return done
    finally:
        _reap(procs)
        results.close()
        results.cancel_join_thread()
        tmp.cleanup()


def _failure(specs: list[WorkerSpec], procs: list[Any], errors: list[tuple[int, str, bool]],
             done: dict[int, Any]) -> KCloudError:
    # A stage's own failure first, then a stage that died, then the communication errors
    # a failure causes in its peers.
    own = [e for e in errors if not e[2]]
    if own:
        r, text, _ = own[0]
        s = specs[r]
        return KCloudError(f"{s.label} ({s.device_type}, {s.backend}) failed in {text}",
                           "fix the model or the plan and run again")
    reported = {e[0] for e in errors}
    for s, p in zip(specs, procs, strict=True):
        if p.exitcode not in (None, 0) and s.rank not in done and s.rank not in reported:
            return KCloudError(f"{s.label} ({s.device_type}, {s.backend}) died with exit "
                               f"code {p.exitcode}", "check the stage's memory and the model")
    if errors:
        r, text, _ = errors[0]
        s = specs[r]
        return KCloudError(f"{s.label} ({s.device_type}, {s.backend}) failed in {text}",
                           "check the stages before and after it")
    return KCloudError("a worker stopped without a result", "run again")


def _reap(procs: list[Any]) -> None:
    end = time.monotonic() + 2.0
    for p in procs:
        if p.pid is not None:
            p.join(timeout=max(0.0, end - time.monotonic()))
    for p in procs:
        if p.pid is not None and p.is_alive():
            p.terminate()
    for p in procs:
        if p.pid is not None:
            p.join(timeout=1.0)
            if p.is_alive():
                p.kill()
                p.join(timeout=1.0)


def _measured(plan: Plan, specs: list[WorkerSpec], timeline: dict[int, list[Any]],
              n: int) -> dict[str, Any]:
    lat: list[float] = []
    starts: list[int] = []
    ends: list[int] = []
    for ri, _ in enumerate(plan.replicas):
        ranks = sorted(s.rank for s in specs if s.replica == ri)
        first = {m: t0 for a, m, t0, _ in timeline[ranks[0]] if a == "F"}
        last = {m: t1 for a, m, _, t1 in timeline[ranks[-1]] if a == "F"}
        for m in range(n):
            lat.append((last[m] - first[m]) / 1e9)
            starts.append(first[m])
            ends.append(last[m])
    span = (max(ends) - min(starts)) / 1e9
    items = plan.micro_batch * n * len(plan.replicas)
    unit = "samples/s"
    if plan.predicted.unit == "tokens/s" and plan.seq_len:
        items *= plan.seq_len
        unit = "tokens/s"
    return {"latency_s": _median(lat), "throughput": items / span if span > 0 else 0.0,
            "unit": unit, "wall_s": span, "figures": "measured"}


def _stage_reports(plan: Plan, specs: list[WorkerSpec], results: dict[int, Any],
                   modeled: dict[int, float]) -> list[StageReport]:
    out: list[StageReport] = []
    for s in specs:
        st = plan.replicas[s.replica].stages[s.stage]
        ev = results[s.rank][1]

        def med(action: str, ev: list[Any] = ev) -> float:
            return _median([(t1 - t0) / 1e9 for a, _, t0, t1 in ev if a == action])

        mt = modeled.get(s.rank)
        note = "tensor-parallel sharding not executed; ran whole on " + st.devices[0] \
            if st.tp > 1 else ""
        out.append(StageReport(
            replica=s.replica, stage=s.stage, layers=(st.start, st.end),
            device_type=st.device_type, devices=st.devices, backend=s.backend,
            figures="modeled" if mt is not None else "measured",
            measured_compute_s=med("F"), measured_recv_s=med("R"), measured_send_s=med("S"),
            modeled_time_s=mt, predicted_time_s=st.time_s, tp=st.tp, note=note,
        ))
    return out


def _modeled_stage_time(graph: Any, device_type: str, precision: str, batch: int,
                        start: int, end: int, tp: int) -> float:
    from kcloud.hardware.catalog import get_device
    from kcloud.hardware.cost import default_calibration, layer_table
    from kcloud.precision import Precision
    from kcloud.predict import resolve_precision

    dev = get_device(device_type)
    params = default_calibration().params(dev)
    used, _ = resolve_precision(dev, Precision.parse(precision))  # nearest lossless one
    table = layer_table(graph, dev, used, batch, params, tp=tp)
    return float(table.stage(start, end).time_s)


def _emulated_figures(plan: Plan, stages: list[StageReport], unit: str) -> dict[str, Any]:
    """Pipeline figures with each stage at its own time (measured where real, modeled where
    emulated), plus its measured send and receive times."""
    lat = 0.0
    thr = 0.0
    for ri, _ in enumerate(plan.replicas):
        mine = [s for s in stages if s.replica == ri]
        lat = max(lat, sum(s.time_s + s.measured_send_s for s in mine))
        slowest = max(max(s.time_s, s.measured_send_s) for s in mine)
        items = plan.micro_batch * (plan.seq_len if unit == "tokens/s" and plan.seq_len else 1)
        thr += items / slowest if slowest > 0 else 0.0
    return {"latency_s": lat, "throughput": thr, "unit": unit,
            "figures": "measured real stages + modeled emulated stages"}
