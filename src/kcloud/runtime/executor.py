"""Executing a Plan: the driver. It splits and shards the stages, starts one worker per device
(`kcloud.runtime.worker`) over torch.distributed (gloo, 127.0.0.1), and reports.

One worker per device of each stage of each replica, one thread each. Micro-batches stream
through each replica's pipeline: the first worker of a stage's group receives a micro-batch's
tuple from the stage before (one flat frame per hop; see `kcloud.runtime.comm`),
broadcasts it to its tensor-parallel peers, every worker runs its shard of the stage (the row
Linears all-reduce over the group), and the first worker sends the tuple on without waiting for it
to arrive, so that the next micro-batch's compute overlaps the hop. Data-parallel
replicas take consecutive slices of the batch. The driver checks the outputs against the
single-process model, and reports measured times per stage and a timeline.

Workers are processes on this host (`execute`), or Ray actors placed on the nodes that declare
the plan's device types (`execute(..., ray_address=...)`); both are the engine's workers.

Plans of zoo LLMs with output tokens generate them (`_generate`, `kcloud.runtime.generate`):
each stage runs its submodules eagerly with a KV cache per micro-batch; the prompt, then one
decode step per token, step-major over the micro-batches, the last stage's lead sending each
greedy token back to the first stage's lead (the token hop).
"""

from __future__ import annotations

import math
import os
import socket
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from kcloud.errors import KCloudError
from kcloud.inputs import MAX_RUN_INPUT_BYTES
from kcloud.planner.actions import Action, Kind, from_events, render
from kcloud.planner.plan import Plan
from kcloud.runtime import backends
from kcloud.runtime.engine import Engine
from kcloud.runtime.generate import (
    GenSpec,
    check_length,
    generates,
    reference_generate,
)
from kcloud.runtime.model import layer_graph, load_checkpoint, load_runnable, micro_batches
from kcloud.runtime.split import flat_tensors
from kcloud.runtime.stage_worker import RunCommand, StageSpec
from kcloud.runtime.trace import save_trace, trace_events, write_trace
from kcloud.runtime.worker import (
    WorkerResult,
    WorkerSpec,
    _from_bytes,
)

FP32_TOLERANCE = 1e-4


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
    measured_allreduce_s: float = 0.0  # all-reduces per micro-batch (inside the compute)
    sharded: bool = False  # tensor-parallel sharding executed over the group
    # Generation: a micro-batch's time covers its whole generation; these split it per step.
    measured_prefill_s: float | None = None  # median prefill of a micro-batch
    measured_decode_s: float | None = None  # median decode step of a micro-batch
    predicted_prefill_s: float | None = None  # the cost model's (modeled)
    predicted_decode_s: float | None = None  # at the plan's mean KV length (modeled)

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
            "tp": self.tp, "sharded": self.sharded,
            "measured_allreduce_s": self.measured_allreduce_s, "note": self.note,
            **({"measured_prefill_s": self.measured_prefill_s,
                "measured_decode_s": self.measured_decode_s,
                "predicted_prefill_s": self.predicted_prefill_s,
                "predicted_decode_s": self.predicted_decode_s}
               if self.measured_prefill_s is not None else {}),
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
    schedule: dict[str, list[str]] = field(default_factory=dict)  # device -> actions run
    executor: str = "processes"  # "processes" | "ray"
    energy: dict[str, Any] | None = None  # modeled power x stage times
    generated: bool = False  # `outputs` are generated token ids [batch, steps] per micro-batch

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "model": self.model, "mode": self.mode, "micro_batch": self.micro_batch,
            "micro_batches": self.n_micro, "replicas": self.replicas,
            "max_abs_error": self.max_abs_error, "reference_ok": self.reference_ok,
            "measured": self.measured, "predicted": self.predicted,
            "trace_file": self.trace_file, "stages": [s.to_dict() for s in self.stages],
            "notes": self.notes, "schedule": self.schedule, "executor": self.executor,
        }
        if self.emulated is not None:
            d["emulated"] = self.emulated
        if self.energy is not None:
            d["energy"] = self.energy
        if self.generated:
            d["generated_token_ids"] = [t.tolist() for t in self.outputs]
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
    worker_timeout_s: float = 10.0,
    ray_address: str | None = None,
    warmup: int = 2,
    probes: int | None = None,
    weights: str | os.PathLike[str] | None = None,
    prompt_only: bool = False,
) -> RunReport:
    """Run `plan` with one worker per device of each stage; check against the single-process
    model. `ray_address` ("local", "auto" or host:port) runs the workers as Ray actors.
    `warmup` untimed micro-batches go through every stage first, then `probes` requests (of
    batch / micro-batch micro-batches; default 3, or 1 for a generation) go one at a time
    through the pipeline, each after every worker sat idle for `IDLE_BEFORE_REQUEST_S`, to
    measure latency, then all the micro-batches stream through to
    measure throughput. `weights` is a local
    checkpoint (state dict) loaded into the model before it is split.

    A zoo LLM plan with output tokens generates them (greedy, a KV cache per micro-batch in
    every stage; see `generate`): a probe or stream item is then a whole generation, and the
    check compares the tokens and every step's logits. `prompt_only` runs the prompt alone."""
    if mode not in backends.MODES:
        raise KCloudError(f"unknown mode '{mode}'", "use --mode real or --mode emulated")
    n = n_micro if n_micro is not None else max(1, plan.batch // plan.micro_batch)
    if n < 1:
        raise KCloudError(f"--batches must be positive, got {n}", "pass --batches 1 or more")
    if mode == "real":
        backends.check_real([s.device_type for r in plan.replicas for s in r.stages])

    if warmup < 0:
        raise KCloudError(f"--warmup must be 0 or more, got {warmup}", "pass --warmup 0 or more")
    per_request = min(n, max(1, math.ceil(plan.batch / plan.micro_batch)))
    module, example = load_runnable(plan.model, batch=plan.micro_batch, seq_len=plan.seq_len,
                                    phase=plan.phase)
    if weights is not None:
        load_checkpoint(module, weights)
    need = n * len(plan.replicas) * sum(t.numel() * t.element_size() for t in example
                                        if isinstance(t, torch.Tensor))
    if need > MAX_RUN_INPUT_BYTES:  # the micro-batches are made here, before the workers
        raise KCloudError(f"{n:,} micro-batches per replica hold {need / 2**30:,.1f} GiB of "
                          f"inputs, more than a run makes ({MAX_RUN_INPUT_BYTES / 2**30:g} GiB)",
                          "run fewer micro-batches (--batches)")
    feeds = micro_batches(example, n * len(plan.replicas))
    notes: list[str] = []
    graph = layer_graph(plan.model, batch=plan.micro_batch, seq_len=plan.seq_len,
                        phase=plan.phase)
    gen = generates(plan.model, plan.output_tokens, prompt_only)
    steps = (plan.output_tokens or 0) if gen else 0
    prompt = int(example[0].shape[1]) if gen else 0
    dec_graph = None
    if probes is None:
        probes = 1 if gen else 3
    if probes < 0:
        raise KCloudError(f"--probes must be 0 or more, got {probes}", "pass --probes 0 or more")
    if gen:
        check_length(module, plan.model, prompt, steps)
        dec_graph = layer_graph(plan.model, batch=plan.micro_batch, seq_len=1, phase="decode",
                                kv_len=prompt + steps // 2)

    # The workers, their layers, shards and ranks (`layout`: errors before any starts).
    # Emulated replicas of one configuration (the same layers and shards, all emulated)
    # compute alike: one of them runs, with the micro-batches of the first, and the others
    # take its outputs and timeline (their own times stay the cost model's).
    computed, copy_of = sample_replicas(plan, mode)
    run_plan = plan if not copy_of else replace(
        plan, replicas=tuple(plan.replicas[i] for i in computed))
    w = None if weights is None else str(weights)
    engine = Engine(run_plan, mode=mode, weights=w, serving=False, generate=gen,
                    comm_timeout_s=comm_timeout_s, start_timeout_s=timeout_s,
                    ray_address=ray_address, worker_timeout_s=worker_timeout_s)
    lay = engine.layout
    notes += lay.notes
    layouts = {(computed[ri], si): v for (ri, si), v in lay.layouts.items()}
    for r, i in copy_of.items():
        layouts.update({(r, si): layouts[i, si] for si in range(len(plan.replicas[r].stages))
                        if (i, si) in layouts})
    stage_specs = [s for rep in lay.replicas for s in rep if not s.serves]
    run_specs = [_run_spec(s, [x for x in lay.replicas[s.replica] if not x.serves], n=n,
                           warmup=warmup, probes=probes, per_request=per_request,
                           steps=steps if gen else None, comm_timeout_s=comm_timeout_s)
                 for s in stage_specs]
    # the PIM groups' workers of stages that offload their decode attention (`offload`)
    pim_specs = [_run_spec(s, [], n=n, warmup=warmup, probes=probes, per_request=per_request,
                           steps=None, comm_timeout_s=comm_timeout_s)
                 for rep in lay.replicas for s in rep if s.serves]
    specs = _all_specs(plan, run_specs, computed, copy_of)
    feed_of = {r: copy_of.get(r, r) for r in range(len(plan.replicas))}
    feeds = [x for r in range(len(plan.replicas))
             for x in feeds[feed_of[r] * n:(feed_of[r] + 1) * n]]
    inputs: list[Any] = [feeds[computed[s.replica] * n:(computed[s.replica] + 1) * n]
                         if s.stage == 0 else None for s in run_specs]
    if copy_of:
        notes.append(f"{len(computed)} of {len(plan.replicas)} replicas computed on the host; "
                     f"the other {len(copy_of)} (emulated, of the same layers and shards as a "
                     "computed one) took its outputs and timeline, their times modeled")

    # The cost model's times of emulated stages (before starting workers: errors come early).
    # ... and the power each stage's devices draw (the cost model's, for the energy figures).
    modeled: dict[int, float] = {}
    power: dict[int, tuple[float, float]] = {}  # lead rank -> (busy W, idle W) per device
    step_costs: dict[int, tuple[float, float]] = {}  # lead rank -> (prefill, decode step) s
    power_estimated = False  # built on a power figure without a primary source
    stage_costs: dict[tuple[Any, ...], Any] = {}
    for sp in specs:
        if not sp.leads:
            continue
        st = plan.replicas[sp.replica].stages[sp.stage]
        key = (st.device_type, st.precision, st.start, st.end, st.tp)
        if st.attention_offload is not None and dec_graph is not None:
            # the dense side and the PIM side together: the plan's own composition
            off = _offload_costs(plan, st, graph, dec_graph)
            power[sp.rank] = off[2], off[3]
            power_estimated = True
            step_costs[sp.rank] = off[0], off[1]
            if sp.backend == "emulated":
                modeled[sp.rank] = off[0] + (steps - 1) * off[1]
            continue
        if key not in stage_costs:  # replicas of one device type share their figures
            stage_costs[key] = _stage_cost(graph, st.device_type, st.precision,
                                           plan.micro_batch, st.start, st.end, st.tp)
            if dec_graph is not None:
                stage_costs[("decode", *key)] = _stage_cost(
                    dec_graph, st.device_type, st.precision, plan.micro_batch, st.start,
                    st.end, st.tp)
        cost, dev = stage_costs[key]
        power[sp.rank] = (cost.power_w(dev), dev.idle_power_w.value)
        power_estimated |= dev.max_power_w.estimated or dev.idle_power_w.estimated
        if dec_graph is not None:
            dec, _ = stage_costs[("decode", *key)]
            step_costs[sp.rank] = (cost.time_s, dec.time_s)
        if sp.backend == "emulated":  # a generation: its prefill, then steps - 1 decode steps
            modeled[sp.rank] = cost.time_s + (
                (steps - 1) * step_costs[sp.rank][1] if gen else 0.0)

    ran = _run_on_engine(engine, run_specs + pim_specs, inputs + [None] * len(pim_specs),
                         timeout_s)
    for ps in pim_specs:
        st = plan.replicas[computed[ps.replica]].stages[ps.stage]
        calls = ran[ps.rank][1][0][4] if ran[ps.rank][1] else 0
        notes.append(f"stage {ps.stage} of replica {computed[ps.replica]}: decode attention "
                     f"ran in the worker of its PIM group ({st.attention_offload.count} x "  # type: ignore[union-attr]
                     f"{ps.device_type}, {ps.backend}) at rank {ps.rank}: {calls:,} attention "
                     "calls, queries and new K/V out and outputs back over torch.distributed; "
                     "its KV cache there; the stage's times modeled with the PIM side "
                     "(kcloud.hardware.steps)")
    results = _spread(ran, plan, specs, run_specs, computed, copy_of)

    # Reference: the whole model in this process, micro-batch by micro-batch.
    outputs: list[Any] = []
    for ri, _ in enumerate(plan.replicas):
        last_stage = len(plan.replicas[ri].stages) - 1
        lead = next(s.rank for s in specs if s.replica == ri and s.stage == last_stage
                    and s.leads)
        data = results[lead][0]
        assert data is not None
        outputs.extend(_from_bytes(data))
    err = 0.0
    same_tokens = True
    with torch.inference_mode():
        for k, (x, got) in enumerate(zip(feeds, outputs, strict=True)):
            if k // n in copy_of:  # a copy of a computed replica's outputs
                continue
            if gen:  # the same tokens, and every step's logits close
                ref_tokens, ref_logits = reference_generate(module, x[0], steps)
                same_tokens &= torch.equal(ref_tokens, got[0])
                pairs = [(ref_logits, got[1])]
            else:
                pairs = list(zip(flat_tensors(module(*x)), flat_tensors(got), strict=True))
            for a, b in pairs:
                if a.shape != b.shape:
                    err = float("inf")
                elif a.numel():
                    err = max(err, float((a.float() - b.float()).abs().max()))
    if gen:
        outputs = [got[0] for got in outputs]  # the generated token ids per micro-batch

    stages = _stage_reports(plan, specs, results, modeled, step_costs if gen else None, steps)
    if modeled:
        notes.append("emulated stages computed in fp32 on the host CPU; their times (at the "
                     "plan's precision) are modeled")
    if gen and any(lay is not None for lay in layouts.values()):
        notes.append("tensor-parallel stages (generation): attention split by heads and KV "
                     "heads (o_proj summed over the group), MLP by hidden features, token "
                     "embeddings and the vocabulary head by vocabulary; norms run replicated "
                     "on every device of the group")
    elif any(lay is not None for lay in layouts.values()):
        notes.append("tensor-parallel stages: MLP and attention-head Linears, convolution "
                     "output channels, token embeddings and vocabulary heads sharded over "
                     "their group; norms, pooling and other layers run replicated on every "
                     "device of the group")
    if gen:
        notes.append(f"generated {steps} tokens per sequence (greedy): the prompt's prefill "
                     f"gives the first, then {steps - 1} decode steps, each stage keeping a "
                     "KV cache per micro-batch, as the plan counts them; throughput counts "
                     "generated tokens, as the plan's does")
    elif plan.output_tokens:
        notes.append(f"this run executes the prompt (prefill) only; the plan's predicted "
                     f"figures include {plan.output_tokens} decode steps per request, so "
                     "measured and predicted are not comparable for this plan")
    timeline = {s.rank: results[s.rank][1] for s in specs}
    measured = (_gen_measured(plan, specs, timeline, n, per_request, steps) if gen
                else _measured(plan, specs, timeline, n, per_request))
    trace_file = None
    if trace_path is not None:
        trace_file = str(_write_gen_trace(trace_path, specs, timeline, modeled, step_costs)
                         if gen
                         else write_trace(trace_path, specs, timeline, modeled))
    unit = measured["unit"]
    pred = plan.predicted
    report = RunReport(
        model=plan.model, mode=mode, micro_batch=plan.micro_batch, n_micro=n,
        replicas=len(plan.replicas), max_abs_error=err, reference_ok=err < FP32_TOLERANCE,
        measured=measured,
        predicted={"latency_s": pred.latency_s, "throughput": pred.throughput,
                   # the plan counts generated tokens when it generates: say so, as measured does
                   "unit": "output tokens/s" if plan.output_tokens and pred.unit == "tokens/s"
                   else pred.unit, "figures": "modeled"},
        stages=stages, trace_file=trace_file, notes=notes, outputs=outputs,
        schedule={s.device: _actions(timeline[s.rank])
                  for s in specs},
        executor="ray" if ray_address is not None else "processes", generated=gen,
    )
    if gen:
        report.reference_ok = same_tokens and err < FP32_TOLERANCE
        report.measured["tokens_match"] = same_tokens
        report.predicted.update(_gen_predicted(plan, specs, step_costs))
    items = plan.micro_batch * steps if gen else None
    hops = steps if gen else 1
    if any(s.figures == "modeled" for s in stages):
        report.emulated = _emulated_figures(plan, stages, unit, items, hops)
    report.energy = _energy_figures(plan, specs, stages, power, unit, items, hops)
    report.energy["estimated"] = power_estimated
    return report


def _actions(events: list[tuple[Any, ...]]) -> list[str]:
    """A worker's actions in the order it ran them, written as `Plan.schedule` writes them
    (`kcloud.planner.actions`): `R<m>`, `F<m>` (`F<m>+AR` when its stage all-reduced over the
    group), `S<m>`; a generation's `P<m>`, `D<m>.<step>`, `RT`/`ST` token hops."""
    return render(from_events(events))


# ---- generation: layouts, figures, trace -----------------------------------------------------


def _gen_measured(plan: Plan, specs: list[WorkerSpec], timeline: dict[int, list[Any]],
                  n: int, per_request: int, steps: int) -> dict[str, Any]:
    """A generation's figures. A request runs from the first stage's prefill start to its
    last token on the last stage; `ttft_s` to its first token, `tpot_s` per token after
    that. Latency figures: the median probe request alone in the pipeline (the median
    micro-batch of the stream when there were none); `loaded_*`: the median micro-batch in the
    stream, queueing included. Throughput: generated tokens of the stream over its span."""
    lat: list[float] = []  # per micro-batch, in the stream
    ttft: list[float] = []
    tpot: list[float] = []
    p_lat: list[float] = []  # per request, alone in the pipeline
    p_ttft: list[float] = []
    p_tpot: list[float] = []
    starts: list[int] = []
    ends: list[int] = []
    per = max(1, min(per_request, n))
    for ri, rep in enumerate(plan.replicas):
        leads = {s.stage: s.rank for s in specs if s.replica == ri and s.leads}
        head, tail = timeline[leads[0]], timeline[leads[len(rep.stages) - 1]]
        begin = {m: t0 for a, m, t0, _, _ in head if a == "P"}
        first = {m: t1 for a, m, _, t1, _ in tail if a == "P"}
        done = {m: t1 for a, m, _, t1, t in tail if a in ("P", "D") and t == steps - 1}
        for m in range(n):
            lat.append((done[m] - begin[m]) / 1e9)
            ttft.append((first[m] - begin[m]) / 1e9)
            if steps > 1:
                tpot.append((done[m] - first[m]) / 1e9 / (steps - 1))
            starts.append(begin[m])
            ends.append(done[m])
        p_begin = [t0 for a, _, t0, _, _ in head if a == "LP"][::per]
        p_first = [t1 for a, _, _, t1, _ in tail if a == "LP"]
        p_done = [t1 for a, _, _, t1, t in tail if a in ("LP", "LD") and t == steps - 1]
        for r, b in enumerate(p_begin):
            f, d = max(p_first[r * per:(r + 1) * per]), max(p_done[r * per:(r + 1) * per])
            p_lat.append((d - b) / 1e9)
            p_ttft.append((f - b) / 1e9)
            if steps > 1:
                p_tpot.append((d - f) / 1e9 / (steps - 1))
    span = (max(ends) - min(starts)) / 1e9
    tokens = plan.micro_batch * n * len(plan.replicas) * steps
    probed = bool(p_lat)
    return {"latency_s": _median(p_lat if probed else lat),
            "ttft_s": _median(p_ttft if probed else ttft),
            "tpot_s": _median(p_tpot if probed else tpot) if steps > 1 else None,
            "throughput": tokens / span if span > 0 else 0.0, "unit": "output tokens/s",
            "wall_s": span, "generated_tokens": tokens, "output_tokens": steps,
            "loaded_latency_s": _median(lat), "loaded_ttft_s": _median(ttft),
            "loaded_tpot_s": _median(tpot) if steps > 1 else None,
            "latency_probes": len(p_lat), "probe_latencies_s": p_lat, "figures": "measured"}


def _gen_predicted(plan: Plan, specs: list[WorkerSpec],
                   step_costs: dict[int, tuple[float, float]]) -> dict[str, Any]:
    """The cost model's time to first token and per output token, from its stage times
    (the slowest replica; transfers excluded)."""
    ttft = tpot = 0.0
    for ri, _ in enumerate(plan.replicas):
        mine = [step_costs[s.rank] for s in specs if s.replica == ri and s.leads]
        ttft = max(ttft, sum(p for p, _ in mine))
        tpot = max(tpot, sum(d for _, d in mine))
    return {"ttft_s": ttft, "tpot_s": tpot,
            "ttft_tpot_figures": "modeled: the stages' prefill and decode-step compute summed, "
                                 "transfers excluded"}


def _gen_name(action: str, m: int, step: int) -> str:
    """`P<m>` (prefill), `D<m>.<step>` (decode step), hops `R`/`S` (hidden state) and
    `RT`/`ST` (token) as `<action><m>.<step>`; `L` prefixes a latency probe's."""
    return str(Action(Kind(action), m, step))


_GEN_TRACE = {"P": ("F", "prefill compute"), "D": ("F", "decode compute"),
              "LP": ("L", "latency-probe prefill compute"),
              "LD": ("L", "latency-probe decode compute"), "R": ("R", "recv"),
              "S": ("S", "send"), "RT": ("R", "recv token"), "ST": ("S", "send token"),
              "AR": ("AR", "allreduce")}


def _write_gen_trace(path: str | os.PathLike[str], specs: list[WorkerSpec],
                     timeline: dict[int, list[Any]], modeled: dict[int, float],
                     step_costs: dict[int, tuple[float, float]]) -> Path:
    """The Chrome trace of a generation run: `trace_events`' rows and spans, named and
    labelled per step (prefill or decode, its step); an emulated stage's computes carry the
    cost model's time of their step."""
    plain = {r: [(_GEN_TRACE[a][0], m, t0, t1) for a, m, t0, t1, _ in ev]
             for r, ev in timeline.items()}
    events = trace_events(specs, plain, {})
    spans = iter((s.rank, e) for s in specs for e in timeline.get(s.rank, []))
    for e in events:
        if e["ph"] != "X":
            continue
        rank, (a, m, _, _, t) = next(spans)
        e["name"] = _gen_name(a, m, t)
        e["cat"] = _GEN_TRACE[a][1]
        e["args"].update(step=t, phase="prefill" if t == 0 else "decode")
        if rank in modeled and a in ("P", "D") and rank in step_costs:
            e["args"]["modeled_time_s"] = step_costs[rank][0 if a == "P" else 1]
    return save_trace(path, events)


class Results:
    """What the workers of a run report, and when a failure ends it: once one worker fails,
    the others get half a second for their own messages (a failure's cause comes before the
    communication errors it causes in its peers), then the run stops."""

    GRACE_S = 0.5

    def __init__(self, specs: list[WorkerSpec], timeout_s: float) -> None:
        self.specs = specs
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.done: dict[int, tuple[bytes | None, list[Any]]] = {}
        self.errors: list[tuple[int, str, bool]] = []
        self.died: dict[int, str] = {}  # rank -> how its worker ended
        self.failed_at: float | None = None

    def take(self, res: WorkerResult) -> None:
        """A worker's result: ("done", rank, outputs, events) or ("error", rank, text, comm)."""
        if res[0] == "done":
            self.done[res[1]] = (res[2], res[3])
        else:
            self.errors.append((res[1], res[2], res[3]))
            self.failed()

    def lost(self, rank: int, how: str) -> None:
        """A worker that ended without a result."""
        self.died[rank] = how
        self.failed()

    def failed(self) -> None:
        self.failed_at = self.failed_at or time.monotonic()

    def reported(self, rank: int) -> bool:
        return rank in self.done or any(e[0] == rank for e in self.errors)

    def over(self) -> bool:
        """Whether to stop waiting (every worker done, or a failure's grace has passed);
        raises past the run's time limit."""
        now = time.monotonic()
        if len(self.done) == len(self.specs):
            return True
        if self.failed_at is not None and now - self.failed_at > self.GRACE_S:
            return True
        if now > self.deadline:
            raise KCloudError(f"the run did not finish within {self.timeout_s:g} s",
                              "run fewer micro-batches (--batches) or raise --timeout")
        return False

    def outcome(self) -> dict[int, tuple[bytes | None, list[Any]]]:
        """Every worker's result, or the run's one-line error."""
        if len(self.done) < len(self.specs):
            raise failure(self.specs, self.errors, self.done, self.died)
        return self.done


def sample_replicas(plan: Plan, mode: str) -> tuple[list[int], dict[int, int]]:
    """The replicas a run computes, and each other replica's computed twin: replicas whose
    stages are all emulated and have the same layers and widths compute alike on the host."""
    computed: list[int] = []
    seen: dict[tuple[Any, ...], int] = {}
    copy_of: dict[int, int] = {}
    for ri, rep in enumerate(plan.replicas):
        emulated = all(backends.choose(st.device_type, mode, st.devices[0]).name == "emulated"
                       for st in rep.stages)
        key = tuple((st.start, st.end, st.tp, st.attention_offload is not None)
                    for st in rep.stages)  # host numerics: fp32
        if emulated and key in seen:
            copy_of[ri] = seen[key]
            continue
        if emulated:
            seen[key] = ri
        computed.append(ri)
    return computed, copy_of


def _all_specs(plan: Plan, run_specs: list[WorkerSpec], computed: list[int],
               copy_of: dict[int, int]) -> list[WorkerSpec]:
    """Every replica's workers (ranks numbered over the whole plan): a computed replica's
    are the ones that ran, a copy's are its twin's on its own devices."""
    by_replica: dict[int, list[WorkerSpec]] = {}
    for s in run_specs:
        by_replica.setdefault(computed[s.replica], []).append(s)
    out: list[WorkerSpec] = []
    for ri, rep in enumerate(plan.replicas):
        twin = by_replica[copy_of.get(ri, ri)]
        first = len(out)
        base = twin[0].rank
        for s in twin:
            st = rep.stages[s.stage]
            out.append(replace(
                s, rank=first + s.rank - base, replica=ri, device=st.devices[s.tp_rank],
                device_type=st.device_type,
                group=tuple(first + g - base for g in s.group),
                prev=None if s.prev is None else first + s.prev - base,
                next=None if s.next is None else first + s.next - base))
    return out


def _spread(ran: dict[int, tuple[bytes | None, list[Any]]], plan: Plan, specs: list[WorkerSpec],
            run_specs: list[WorkerSpec], computed: list[int],
            copy_of: dict[int, int]) -> dict[int, tuple[bytes | None, list[Any]]]:
    """The results of every replica's workers: the computed ones', and each copy's twin's."""
    by_slot = {(computed[s.replica], s.stage, s.tp_rank): ran[s.rank] for s in run_specs}
    return {s.rank: by_slot[copy_of.get(s.replica, s.replica), s.stage, s.tp_rank]
            for s in specs}


def _run_spec(s: StageSpec, replica: list[StageSpec], *, n: int, warmup: int, probes: int,
              per_request: int, steps: int | None, comm_timeout_s: float) -> WorkerSpec:
    """The schedule of one engine worker in a run: its micro-batches, warm-up and probes; for
    a generation, its steps and the token hop between the last and the first stage."""
    gspec = None
    if steps is not None:
        leads = {x.stage: x.rank for x in replica if x.leads}
        last = max(leads)
        feedback = None if last == 0 else leads[last] if s.stage == 0 else \
            leads[0] if s.stage == last else None
        gspec = GenSpec(steps=steps, units=s.units, layout=s.layout, feedback=feedback)
    return WorkerSpec(
        rank=s.rank, world=s.world, port=0, replica=s.replica, stage=s.stage,
        device=s.device, device_type=s.device_type, backend=s.backend,
        torch_device=s.torch_device, model=s.model, micro_batch=s.micro_batch,
        seq_len=s.seq_len, phase=s.phase, bounds=s.bounds, n_micro=n, prev=s.prev,
        next=s.next, comm_timeout_s=comm_timeout_s, group=s.group, tp_groups=s.tp_groups,
        layout=None if gspec is not None else s.layout, n_warmup=warmup, n_probe=probes,
        per_request=per_request, pin_core=s.pin_core, gen=gspec, attention=s.attention,
        serves=s.serves)


def _run_on_engine(engine: Engine, specs: list[WorkerSpec], inputs: list[Any],
                   timeout_s: float) -> dict[int, tuple[bytes | None, list[Any]]]:
    """Start the engine's workers (each builds its own stage), run every worker's schedule
    on them, collect their results; the workers are stopped on every way out."""
    got = Results(specs, timeout_s)
    try:
        engine.start()
        engine.run({s.rank: RunCommand(s, x) for s, x in zip(specs, inputs, strict=True)},
                   got, timeout_s)
        return got.outcome()
    finally:
        engine.stop()


def failure(specs: list[WorkerSpec], errors: list[tuple[int, str, bool]],
            done: dict[int, Any], died: dict[int, str]) -> KCloudError:
    """The one-line error of a failed run: a stage's own failure first, then a worker that
    died (`died`: rank -> how), then the communication errors a failure causes in its peers."""
    own = [e for e in errors if not e[2]]
    if own:
        r, text, _ = own[0]
        s = specs[r]
        return KCloudError(f"{s.label} ({s.device_type}, {s.backend}) failed in {text}",
                           "fix the model or the plan and run again")
    reported = {e[0] for e in errors}
    for s in specs:
        if s.rank in died and s.rank not in done and s.rank not in reported:
            return KCloudError(f"{s.label} ({s.device_type}, {s.backend}) died with "
                               f"{died[s.rank]}", "check the stage's memory and the model")
    if errors:
        r, text, _ = errors[0]
        s = specs[r]
        return KCloudError(f"{s.label} ({s.device_type}, {s.backend}) failed in {text}",
                           "check the stages before and after it")
    return KCloudError("a worker stopped without a result", "run again")


def _measured(plan: Plan, specs: list[WorkerSpec], timeline: dict[int, list[Any]],
              n: int, per_request: int) -> dict[str, Any]:
    """Latency: the median request alone in the pipeline (the latency probes; the median
    micro-batch of the stream when there were none). Throughput: items of the stream over
    its span. `loaded_latency_s`: the median micro-batch in the stream, queueing included."""
    lat: list[float] = []  # per micro-batch, in the stream
    probe: list[float] = []  # per request, alone in the pipeline
    starts: list[int] = []
    ends: list[int] = []
    for ri, rep in enumerate(plan.replicas):
        leads = {s.stage: s.rank for s in specs if s.replica == ri and s.leads}
        head, tail = timeline[leads[0]], timeline[leads[len(rep.stages) - 1]]
        first = {m: t0 for a, m, t0, _ in head if a == "F"}
        last = {m: t1 for a, m, _, t1 in tail if a == "F"}
        for m in range(n):
            lat.append((last[m] - first[m]) / 1e9)
            starts.append(first[m])
            ends.append(last[m])
        # probe requests: consecutive runs of "L" events, per_request micro-batches each
        p_start = [t0 for a, _, t0, _ in head if a == "L"][::per_request]
        p_end = [t1 for a, _, _, t1 in tail if a == "L"][per_request - 1::per_request]
        probe += [(b - a) / 1e9 for a, b in zip(p_start, p_end, strict=False)]
    span = (max(ends) - min(starts)) / 1e9
    items = plan.micro_batch * n * len(plan.replicas)
    unit = "samples/s"
    if plan.predicted.unit == "tokens/s" and plan.seq_len:
        items *= plan.seq_len
        unit = "prompt tokens/s" if plan.output_tokens else "tokens/s"
    return {"latency_s": _median(probe) if probe else _median(lat),
            "throughput": items / span if span > 0 else 0.0, "unit": unit, "wall_s": span,
            "loaded_latency_s": _median(lat), "latency_probes": len(probe),
            "probe_latencies_s": probe,
            "figures": "measured"}


def _durations(ev: list[Any], *actions: str) -> list[float]:
    """Seconds of each event of `actions` in a worker's timeline."""
    return [(e[3] - e[2]) / 1e9 for e in ev if e[0] in actions]


def _per_micro(ev: list[Any], *actions: str) -> float:
    """The median over micro-batches of the seconds spent in `actions`."""
    tot: dict[int, float] = {}
    for e in ev:
        if e[0] in actions:
            tot[e[1]] = tot.get(e[1], 0.0) + (e[3] - e[2]) / 1e9
    return _median(list(tot.values()))


def _stage_reports(plan: Plan, specs: list[WorkerSpec], results: dict[int, Any],
                   modeled: dict[int, float],
                   step_costs: dict[int, tuple[float, float]] | None = None,
                   steps: int = 0) -> list[StageReport]:
    """One report per stage, from the worker that leads its group. A generation
    (`step_costs`: modeled prefill and decode step per lead) reports compute per micro-batch
    (its whole generation), per prefill and per decode step, and its hops per step."""
    out: list[StageReport] = []
    for s in specs:
        if not s.leads:
            continue
        st = plan.replicas[s.replica].stages[s.stage]
        ev = results[s.rank][1]
        mt = modeled.get(s.rank)
        sharded = (s.gen.layout if s.gen is not None else s.layout) is not None
        note = ""
        if st.tp > 1:
            note = (f"sharded over {len(s.group)} workers" if sharded
                    else f"tensor-parallel sharding not executed; ran whole on {st.devices[0]}")
        gen: dict[str, Any] = {}
        if step_costs is not None:
            gen = {"measured_prefill_s": _median(_durations(ev, "P")),
                   "measured_decode_s": _median(_durations(ev, "D")) if steps > 1 else None,
                   "predicted_prefill_s": step_costs[s.rank][0],
                   "predicted_decode_s": step_costs[s.rank][1]}
        computes, recvs, sends = (("P", "D"), ("R", "RT"), ("S", "ST")) if gen else \
            (("F",), ("R",), ("S",))
        out.append(StageReport(
            replica=s.replica, stage=s.stage, layers=(st.start, st.end),
            device_type=st.device_type, devices=st.devices, backend=s.backend,
            figures="modeled" if mt is not None else "measured",
            measured_compute_s=_per_micro(ev, *computes),
            measured_recv_s=_median(_durations(ev, *recvs)),
            measured_send_s=_median(_durations(ev, *sends)),
            modeled_time_s=mt, predicted_time_s=st.time_s, tp=st.tp, note=note,
            measured_allreduce_s=_per_micro(ev, "AR"), sharded=sharded, **gen,
        ))
    return out


def _offload_costs(plan: Plan, st: Any, prefill: Any,
                   decode: Any) -> tuple[float, float, float, float]:
    """(prefill s, decode step s, busy W, idle W per device) of a stage whose decode attention
    runs on its PIM group, from `kcloud.hardware.steps` (as the planner priced it)."""
    from kcloud.hardware.cluster import load_cluster
    from kcloud.hardware.steps import offload_of, stage_tables_for

    cl = load_cluster(plan.cluster)
    dev = cl.device_types[st.device_type]
    link = cl.intra_link(st.device_type)
    tables = stage_tables_for(st, prefill, decode, dev, (link.bandwidth, link.collective_s),
                              offload=offload_of(st, cl))
    b = plan.micro_batch
    pre = tables.forward(b)
    dec = tables.step(b, b * tables.tables.captured_kv_tokens)
    return pre.time_s, dec.time_s, dec.busy_w, tables.idle_w


def _stage_cost(graph: Any, device_type: str, precision: str, batch: int,
                start: int, end: int, tp: int) -> tuple[Any, Any]:
    """The cost model's figures of one stage (per device of its group), and the device."""
    from kcloud.hardware.catalog import get_device
    from kcloud.hardware.cost import default_calibration, layer_table
    from kcloud.precision import Precision
    from kcloud.predict import resolve_precision

    dev = get_device(device_type)
    params = default_calibration().params(dev)
    used, _ = resolve_precision(dev, Precision.parse(precision))  # nearest lossless one
    table = layer_table(graph, dev, used, batch, params, tp=tp)
    return table.stage(start, end), dev


def _energy_figures(plan: Plan, specs: list[WorkerSpec], stages: list[StageReport],
                    power: dict[int, tuple[float, float]], unit: str,
                    items: int | None = None, hops: int = 1) -> dict[str, Any]:
    """Energy per item as the planner counts it, from this run's stage times: each device
    draws the cost model's busy power while its stage works (measured time where the stage
    ran for real, modeled where emulated) and its idle power for the rest of the period (the
    slowest stage or send of its replica). `items` per micro-batch (default: its samples or
    prompt tokens); `hops`: sends per micro-batch (a generation's steps)."""
    leads = {(s.replica, s.stage): s.rank for s in specs if s.leads}
    if items is None:
        items = plan.micro_batch * (plan.seq_len if "tokens" in unit and plan.seq_len else 1)
    joules = 0.0  # per micro-batch of every replica
    seconds = 0.0
    for ri, _ in enumerate(plan.replicas):
        mine = [s for s in stages if s.replica == ri]
        period = max(max(s.time_s, hops * s.measured_send_s) for s in mine)
        seconds = max(seconds, period)
        for s in mine:
            busy_w, idle_w = power[leads[ri, s.stage]]
            busy = min(s.time_s, period)
            joules += s.tp * (busy_w * busy + idle_w * (period - busy))
    per_item = joules / (items * len(plan.replicas))
    return {"energy_per_item_j": per_item, "power_w": joules / seconds if seconds else 0.0,
            "unit": "J/" + unit.split("/")[0].split()[-1].rstrip("s"),
            "predicted_energy_per_item_j": plan.predicted.energy_per_item_j,
            "figures": "modeled: cost-model power x stage times (measured where real)"}


def _emulated_figures(plan: Plan, stages: list[StageReport], unit: str,
                      items: int | None = None, hops: int = 1) -> dict[str, Any]:
    """Pipeline figures with each stage at its own time (measured where real, modeled where
    emulated), plus its measured send and receive times (`hops` sends per micro-batch: a
    generation's steps); `items` per micro-batch as in `_energy_figures`."""
    lat = 0.0
    thr = 0.0
    if items is None:
        items = plan.micro_batch * (plan.seq_len if unit == "tokens/s" and plan.seq_len else 1)
    for ri, _ in enumerate(plan.replicas):
        mine = [s for s in stages if s.replica == ri]
        lat = max(lat, sum(s.time_s + hops * s.measured_send_s for s in mine))
        slowest = max(max(s.time_s, hops * s.measured_send_s) for s in mine)
        thr += items / slowest if slowest > 0 else 0.0
    return {"latency_s": lat, "throughput": thr, "unit": unit,
            "figures": "measured real stages + modeled emulated stages"}
