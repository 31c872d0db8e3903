"""The timed schedules of `kcloud run` that an engine worker (`stage_worker.StageWorker`)
runs on the stage it built: micro-batches streamed through its stage (`_stream`) or tokens
generated (`_generate`), timing every action. The driver side is `executor`.
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from kcloud.errors import one_line
from kcloud.graph.models.transformer import KVCache
from kcloud.hardware.host import IDLE_BEFORE_REQUEST_S
from kcloud.runtime.comm import TupleBroadcast, TupleReceiver, TupleSender
from kcloud.runtime.generate import (
    WARMUP_STEPS,
    GenSpec,
    gen_schedule,
    greedy,
)
from kcloud.runtime.tensor_parallel import (
    ShardLayout,
)


def _to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _from_bytes(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


# ---- workers -------------------------------------------------------------------------------


class Placed:
    """Where a worker sits: its stage, replica, device, rank and tensor-parallel group (the
    engine's `StageSpec` and a run's `WorkerSpec` share these)."""

    stage: int
    replica: int
    device: str
    rank: int
    group: tuple[int, ...]

    @property
    def label(self) -> str:
        return f"stage {self.stage} of replica {self.replica} on {self.device}"

    @property
    def tp_rank(self) -> int:
        return self.group.index(self.rank) if self.group else 0

    @property
    def leads(self) -> bool:
        """The first worker of its group: receives, sends and returns the outputs."""
        return self.tp_rank == 0


@dataclass(frozen=True)
class WorkerSpec(Placed):
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
    prev: int | None  # first rank of the stage before (None: first stage)
    next: int | None  # first rank of the stage after (None: last stage)
    comm_timeout_s: float
    group: tuple[int, ...] = ()  # ranks of this stage's tensor-parallel group (first leads)
    tp_groups: tuple[tuple[int, ...], ...] = ()  # every group of more than one rank, in order
    layout: ShardLayout | None = None  # how this stage is sharded over `group`
    master_addr: str = "127.0.0.1"
    n_warmup: int = 0  # untimed micro-batches first (first-touch allocation, connections)
    n_probe: int = 0  # requests sent one at a time through the idle pipeline (latency)
    per_request: int = 1  # micro-batches per request
    pin_core: int | None = None  # the CPU core a local worker runs on
    gen: GenSpec | None = None  # generate (prompt, then decode steps) instead of one pass
    attention: int | None = None  # rank of the PIM worker its decode attention runs on
    serves: tuple[int, ...] = ()  # a PIM worker: the stage ranks whose attention it runs



def _one_line(exc: BaseException) -> str:
    return one_line(exc, 240)


# A worker's result: ("done", rank, outputs (bytes) or None, events) or
# ("error", rank, "where: what", caused by communication).
WorkerResult = tuple[Any, ...]


@dataclass
class _Where:
    """What a worker is doing: the start of its one-line error when it fails."""

    step: str = "setup"


def _stream(spec: WorkerSpec, stage: Any, feed: list[Any] | None, group: Any,
            ar_log: list[tuple[int, int]], dev: torch.device,
            where: _Where) -> tuple[list[Any], list[tuple[str, int, int, int]]]:
    """One forward pass per micro-batch through the stage (`schedule`): the outputs (last
    stage's lead) and the timed events (action, micro-batch, start, end)."""
    tp = len(spec.group) if spec.group else 1
    src = spec.group[0] if spec.group else spec.rank
    events: list[tuple[str, int, int, int]] = []  # (action, micro-batch, start, end) ns
    outputs: list[Any] = []
    clock = time.perf_counter_ns
    receiver = TupleReceiver(spec.prev) if spec.prev is not None and spec.leads else None
    sender = TupleSender(spec.next) if spec.next is not None and spec.leads else None
    shared = TupleBroadcast(src, group) if tp > 1 and spec.prev is not None else None
    items = schedule(spec)
    n_msgs = sum(1 for a, _ in items if a != "B")
    k = 0
    with torch.inference_mode():
        for n, (action, m) in enumerate(items):
            if action == "B":  # what follows starts from an empty pipeline
                _between_phases(where, items, n)
                continue
            k += 1
            what = _micro(action, m)
            keep = action != "W"
            if spec.prev is None:
                assert feed is not None
                x = feed[m]
            else:
                where.step = f"receive of {what}"
                t0 = clock()
                got = receiver.recv(k < n_msgs) if receiver is not None else None
                x = shared.share(got) if shared is not None else got
                assert x is not None
                if action == "F":
                    events.append(("R", m, t0, clock()))
            where.step = what
            t0 = clock()
            ar_log.clear()
            x = tuple(v.to(dev) if isinstance(v, torch.Tensor) else v for v in x)
            y = stage(*x)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if keep:
                events.append(("F" if action == "F" else "L", m, t0, clock()))
            if action == "F":
                events.extend(("AR", m, a, b) for a, b in ar_log)
            if not spec.leads:
                continue
            if sender is not None:  # returns once posted: the next compute overlaps it
                where.step = f"send of {what}"
                t0 = clock()
                sender.send(y)
                if action == "F":
                    events.append(("S", m, t0, clock()))
            elif action == "F":
                outputs.append(_detach(y[0]))
    where.step = "finish"
    if sender is not None:
        sender.wait()
    return outputs, events


def _between_phases(where: _Where, items: Sequence[tuple[Any, ...]], n: int) -> None:
    """The barrier of all workers at `items[n]`, between run phases. When a latency probe
    follows, every worker then sits idle for `IDLE_BEFORE_REQUEST_S`: the probe is a request
    reaching a quiet pipeline, whatever its number of stages (the planner counts what its
    first pass loses)."""
    where.step = "barrier between run phases"
    dist.barrier()
    if n + 1 < len(items) and items[n + 1][0] == "L":
        time.sleep(IDLE_BEFORE_REQUEST_S)


GenEvent = tuple[str, int, int, int, int]  # (action, micro-batch, start ns, end ns, step)


def _generate(spec: WorkerSpec, stage: Any, feed: list[Any] | None, group: Any,
              ar_log: list[tuple[int, int]], dev: torch.device,
              where: _Where) -> tuple[list[Any], list[GenEvent]]:
    """Greedy generation through the pipeline (`gen_schedule`): step 0 of a micro-batch is
    its prompt, each later step the token the last stage chose before, which its lead sends
    back to the first stage's lead (the token hop). Every hop is one non-blocking frame with
    its receive posted ahead. Returns, on the last stage's lead, (token ids [batch, steps],
    last-position logits [steps, batch, vocab]) per micro-batch of the stream, and the timed
    events: P (prefill) and D (decode step) computes, R/S hidden-state hops, RT/ST token hops,
    AR collectives; LP/LD the computes of the latency probes."""
    gen = spec.gen
    assert gen is not None
    tp = len(spec.group) if spec.group else 1
    src = spec.group[0] if spec.group else spec.rank
    first, last, lead = spec.prev is None, spec.next is None, spec.leads
    receiver = TupleReceiver(spec.prev) if spec.prev is not None and lead else None
    sender = TupleSender(spec.next) if spec.next is not None and lead else None
    tok_in = TupleReceiver(gen.feedback) if first and gen.feedback is not None and lead \
        else None
    tok_out = TupleSender(gen.feedback) if last and gen.feedback is not None and lead \
        else None
    # what the lead receives (hidden states, or the fed-back token), for the whole group
    shared = TupleBroadcast(src, group) if tp > 1 and (
        not first or gen.feedback is not None) else None
    items = gen_schedule(spec.n_micro, spec.n_warmup, spec.n_probe, spec.per_request,
                         gen.steps)
    n_hidden = sum(1 for it in items if it[0] != "B")
    n_tokens = sum(1 for it in items if it[0] != "B" and it[2] > 0)
    k_hidden = k_tokens = 0
    caches: list[dict[str, KVCache]] = []  # per slot of the micro-batches generated together
    kept: dict[int, torch.Tensor] = {}  # slot -> next token (a one-stage pipeline)
    tokens: dict[int, list[torch.Tensor]] = {}
    logits: dict[int, list[torch.Tensor]] = {}
    events: list[GenEvent] = []
    clock = time.perf_counter_ns
    remote = None
    if spec.attention is not None:  # its decode attention runs in the PIM group's worker
        from kcloud.runtime.offload import install

        remote = install(stage, spec.attention)
    with torch.inference_mode():
        for n, (kind, m, t, j) in enumerate(items):
            if kind == "B":  # what follows starts from an empty pipeline, with new caches
                if remote is not None:
                    remote.barrier()
                _between_phases(where, items, n)
                caches = []
                continue
            if t == 0:
                caches.append(stage.new_caches())
            what = _gen_what(kind, m, t)
            timed = kind == "F"
            if first and t == 0:
                assert feed is not None
                x = feed[m][0]
            elif first and gen.feedback is None:  # one stage: each rank chose the token
                x = kept.pop(j)
            else:
                where.step = f"receive of {what}"
                t0 = clock()
                got: tuple[Any, ...] | None = None
                if not first and receiver is not None:
                    k_hidden += 1
                    got = receiver.recv(k_hidden < n_hidden)
                elif first and tok_in is not None:
                    k_tokens += 1
                    got = tok_in.recv(k_tokens < n_tokens)
                x_in = shared.share(got) if shared is not None else got
                assert x_in is not None
                x = x_in[0]
                if timed:
                    events.append(("RT" if first else "R", m, t0, clock(), t))
            where.step = what
            t0 = clock()
            ar_log.clear()
            y = stage(x.to(dev), caches[j])
            if last:
                lg, tok = greedy(y)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t1 = clock()
            action = "P" if t == 0 else "D"
            if kind != "W":
                events.append(("L" + action if kind == "L" else action, m, t0, t1, t))
            if timed:
                events.extend(("AR", m, a, b, t) for a, b in ar_log)
            more = t + 1 < (min(gen.steps, WARMUP_STEPS) if kind == "W" else gen.steps)
            if last and first and more:  # the same token on every rank of the group (the
                kept[j] = tok  # logits are gathered whole): it needs no broadcast
            if not lead:
                continue
            if sender is not None:  # returns once posted: the next compute overlaps it
                where.step = f"send of {what}"
                t0 = clock()
                sender.send((y,))
                if timed:
                    events.append(("S", m, t0, clock(), t))
                continue
            if timed:
                tokens.setdefault(m, []).append(_detach(tok))
                logits.setdefault(m, []).append(_detach(lg))
            if more and tok_out is not None:
                where.step = f"send of the token of {what}"
                t0 = clock()
                tok_out.send((tok,))
                if timed:
                    events.append(("ST", m, t0, clock(), t))
    where.step = "finish"
    if remote is not None:
        remote.stop()
    for s in (sender, tok_out):
        if s is not None:
            s.wait()
    outputs = [(torch.cat(tokens[m], 1), torch.stack(logits[m])) for m in sorted(tokens)]
    return outputs, events


def _gen_what(kind: str, m: int, t: int) -> str:
    micro = _micro(kind, m)
    return f"prefill of {micro}" if t == 0 else f"decode step {t} of {micro}"


def _micro(action: str, m: int) -> str:
    return {"W": "warm-up micro-batch", "L": "latency-probe micro-batch"}.get(
        action, "micro-batch") + f" {m}"


def schedule(spec: WorkerSpec) -> list[tuple[str, int]]:
    """What every worker of a run does, in order: (action, micro-batch). "W": warm-up
    (untimed), "L": the micro-batches of one request alone in the pipeline (its latency),
    "F": the timed stream (throughput), "B": a barrier of all workers between phases. The
    order of a generation (`gen_schedule`) with one step per micro-batch."""
    items = gen_schedule(spec.n_micro, spec.n_warmup, spec.n_probe, spec.per_request, 1)
    return [(kind, m) for kind, m, _, _ in items]


def _detach(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().to("cpu")
    if isinstance(v, (tuple, list)):
        return type(v)(_detach(x) for x in v)
    if isinstance(v, dict):
        return {k: _detach(x) for k, x in v.items()}
    return v


