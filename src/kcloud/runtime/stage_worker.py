"""A resident worker of the engine: one per device of a stage (one per stage that runs whole).

It builds its own stage (the model from its name, seeded or from its directory's weights, then
its layers and its tensor-parallel shard), joins its replica's process group, allocates its
share of the KV blocks, and then executes the engine's step commands until told to stop,
holding weights, KV blocks and process groups across steps. A command is one step of the
replica: for an LLM, every scheduled sequence's new tokens packed in one row, their block
tables, and which rows sample; for other models, a batch of inputs. The first stage takes the
tokens (or inputs) from the command, every later stage its predecessor's hidden states over
torch.distributed (`comm`), and the last stage's lead returns the sampled tokens (or outputs).

The same `StageWorker` runs in a local process (`process_main`, taking commands from a queue)
or inside a Ray actor (`kcloud.runtime.engine`'s Ray path calls `setup` and `execute`).
"""

from __future__ import annotations

import contextlib
import os
import queue as queue_mod
import signal
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from kcloud.graph.models.transformer import Attention, Embeddings, PagedKV, StepLayout
from kcloud.planner.scheduling import decode_groups
from kcloud.runtime import lifecycle
from kcloud.runtime.backends import place
from kcloud.runtime.comm import TupleBroadcast, TupleReceiver, TupleSender
from kcloud.runtime.generate import GenStage, apply_eager_layout, stage_state
from kcloud.runtime.model import load_checkpoint, load_runnable
from kcloud.runtime.split import split_model
from kcloud.runtime.tensor_parallel import (
    CollectiveError,
    ParallelShard,
    ShardLayout,
    apply_layout,
    shard_state,
)
from kcloud.runtime.worker import Placed

HEARTBEAT_S = 0.5


@dataclass(frozen=True)
class StageSpec(Placed):
    """What one worker builds and where it sits (plain data: it travels to the worker)."""

    replica: int
    stage: int
    rank: int  # within its replica's process group
    world: int  # workers of the replica
    port: int  # the replica's rendezvous port (world > 1)
    device: str  # cluster slot
    device_type: str
    backend: str
    torch_device: str
    model: str
    llm: bool
    units: tuple[str, ...] = ()  # LLM stages: submodules in forward order
    bounds: tuple[tuple[int, int], ...] = ()  # other models: the replica's layer cuts
    micro_batch: int = 1
    seq_len: int | None = None
    phase: str | None = None
    layout: ShardLayout | None = None
    group: tuple[int, ...] = ()  # ranks of its tensor-parallel group (the first leads)
    tp_groups: tuple[tuple[int, ...], ...] = ()
    prev: int | None = None  # lead rank of the stage before
    next: int | None = None  # lead rank of the stage after
    kv_blocks: int = 0
    block_size: int = 16
    weights: str | None = None  # a local checkpoint loaded before the split
    pin_core: int | None = None
    comm_timeout_s: float = 60.0
    master_addr: str = "127.0.0.1"
    attention: int | None = None  # rank of the PIM worker its decode attention runs on
    serves: tuple[int, ...] = ()  # a PIM worker: the stage ranks whose attention it runs



@dataclass(frozen=True)
class Row:
    """One sequence in an LLM step: tokens [start, start + n), its block table, and how it
    samples when `sample` (its seed and the index of the token it draws)."""

    seq: int
    start: int
    n: int
    blocks: tuple[int, ...]
    sample: bool
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    index: int = 0


@dataclass(frozen=True)
class RunCommand:
    """A whole schedule of `kcloud run` for one worker (`kcloud.runtime.worker.WorkerSpec`)
    and, for a first stage, its micro-batches."""

    spec: Any
    feed: Any = None
    step: int = 0


@dataclass(frozen=True)
class StepCommand:
    step: int
    rows: tuple[Row, ...] = ()  # LLM
    tokens: tuple[int, ...] = ()  # LLM: the packed new tokens (first stage)
    inputs: Any = None  # other models: the batch's input tuple (first stage)


class StageWorker:
    """Builds one stage once, then executes step commands (see the module's docstring)."""

    def __init__(self, spec: StageSpec) -> None:
        self.spec = spec
        self.stage: Any = None
        self.dev = torch.device(spec.torch_device)
        self.pools: list[PagedKV] = []
        self.ar_log: list[tuple[int, int]] = []
        self.group: Any = None
        self.receiver: TupleReceiver | None = None
        self.sender: TupleSender | None = None
        self.shared: TupleBroadcast | None = None
        self._hops = False

    # -- build -----------------------------------------------------------------------------
    def setup(self) -> None:
        spec = self.spec
        torch.set_num_threads(1)
        if spec.pin_core is not None:
            with contextlib.suppress(AttributeError, OSError):
                os.sched_setaffinity(0, {spec.pin_core})
        if spec.serves:  # a PIM group's worker: no layers, the caches come with the calls
            self.group = self._join()
            return
        module, example = load_runnable(spec.model, batch=spec.micro_batch,
                                        seq_len=spec.seq_len, phase=spec.phase)
        if spec.weights is not None:
            load_checkpoint(module, spec.weights)
        if spec.llm:
            stage: Any = GenStage(module, spec.units)
            full = stage_state(module.state_dict(), spec.units)
            if spec.layout is not None:
                apply_eager_layout(stage, spec.layout, None, self.ar_log)
                full = shard_state(full, spec.layout, spec.tp_rank, prefix="")
        else:
            stage = split_model(module, example, spec.bounds).stages[spec.stage]
            full = stage.state_dict()
            if spec.layout is not None:
                apply_layout(stage.sub, spec.layout, None, self.ar_log)
                full = shard_state(full, spec.layout, spec.tp_rank, prefix="sub.")
        del module
        stage.load_state_dict(full)
        place(stage, self.dev)
        stage.eval()
        self.stage = stage
        if spec.llm:
            self._paged(stage)
        group = self._join()
        self.group = group
        for mod in stage.modules():
            if isinstance(mod, ParallelShard):
                mod.group = group
        self._hops = False

    def _connect(self) -> None:
        """The hops of serving steps, made at the first step (a run's schedule makes its own)."""
        spec, lead = self.spec, self.spec.leads
        self.receiver = TupleReceiver(spec.prev) if spec.prev is not None and lead else None
        self.sender = TupleSender(spec.next) if spec.next is not None and lead else None
        tp = len(spec.group) if spec.group else 1
        self.shared = TupleBroadcast(spec.group[0], self.group) if tp > 1 and \
            spec.prev is not None else None
        self._hops = True

    def _paged(self, stage: Any) -> None:
        if self.spec.kv_blocks < 1:  # a benchmark run: its generation keeps its own caches
            return
        """KV blocks for every attention module of the stage (its local KV heads)."""
        holder = PagedKV(0, 1, 1, 1, torch.float32, self.dev)  # positions for embeddings
        self.pools.append(holder)
        for m in stage.modules():
            if isinstance(m, Attention):
                dtype = m.q_proj.weight.dtype
                pool = PagedKV(self.spec.kv_blocks, self.spec.block_size, m.kv_heads,
                               m.head_dim, dtype, self.dev)
                m.paged = pool
                self.pools.append(pool)
            elif isinstance(m, Embeddings):
                m.paged = holder

    def _join(self) -> Any:
        spec = self.spec
        if spec.world == 1:
            return None
        timeout = timedelta(seconds=spec.comm_timeout_s)
        dist.init_process_group("gloo", init_method=f"tcp://{spec.master_addr}:{spec.port}",
                                rank=spec.rank, world_size=spec.world, timeout=timeout)
        group: Any = None
        for ranks in spec.tp_groups:  # every rank creates every group, in the same order
            pg = dist.new_group(list(ranks), timeout=timeout, backend="gloo")
            if spec.rank in ranks:
                group = pg
        dist.barrier()
        return group

    # -- a step ----------------------------------------------------------------------------
    def execute(self, cmd: StepCommand) -> Any:
        """Run one step; the last stage's lead returns its result (sampled tokens by sequence,
        or the batch's outputs), every other worker None."""
        if not self._hops:
            self._connect()
        with torch.inference_mode():
            if self.spec.llm:
                return self._llm_step(cmd)
            return self._forward_step(cmd)

    def run_schedule(self, cmd: RunCommand) -> Any:
        """A whole benchmark schedule of `kcloud run` (warm-up, latency probes, the timed
        stream or generation; `worker`'s loops) on this built stage: ("done", rank, outputs
        of the last stage's lead (bytes) or None, timed events), or ("error", rank,
        "where: what", caused by communication). Never raises."""
        from kcloud.runtime.worker import _detach, _generate, _one_line, _stream, _to_bytes, _Where

        wspec = cmd.spec
        where = _Where(step="start")
        try:
            if not dist.is_initialized():  # a one-worker run: its phases still barrier
                import socket

                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", 0))
                    port = sock.getsockname()[1]
                dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                        rank=0, world_size=1)
            if wspec.serves:  # a PIM group's worker: attention for its stage's ranks
                from kcloud.runtime.offload import serve

                t0 = time.perf_counter_ns()
                calls = serve(wspec.serves, where)
                where.step = "finish"
                return ("done", wspec.rank, None, [("A", 0, t0, time.perf_counter_ns(), calls)])
            feed = cmd.feed
            run = _generate if wspec.gen is not None else _stream
            outputs, events = run(wspec, self.stage, feed, self.group, self.ar_log, self.dev,
                                  where)
            last = wspec.next is None and wspec.leads
            return ("done", wspec.rank, _to_bytes(_detach(outputs)) if last else None, events)
        except BaseException as exc:
            step = where.step
            comm = step.startswith(("receive", "send", "finish", "barrier")) or isinstance(
                exc, (dist.DistBackendError, CollectiveError))
            return ("error", wspec.rank, f"{step}: {_one_line(exc)}", comm)

    def _incoming(self) -> tuple[Any, ...]:
        got = self.receiver.recv(True) if self.receiver is not None else None
        x = self.shared.share(got) if self.shared is not None else got
        assert x is not None
        return x

    def _llm_step(self, cmd: StepCommand) -> dict[int, int] | None:
        spec = self.spec
        layout, sample_at = _layout(cmd.rows, spec.block_size, self.dev)
        for pool in self.pools:
            pool.step = layout
        try:
            if spec.prev is None:
                x = torch.tensor([cmd.tokens], dtype=torch.long, device=self.dev)
            else:
                x = self._incoming()[0].to(self.dev)
            selected = False
            for unit in spec.units:
                if unit in ("norm", "head") and not selected:
                    x = x[:, sample_at]
                    selected = True
                x = self.stage.get_submodule(unit)(x)
        finally:
            for pool in self.pools:
                pool.step = None
        if not spec.leads:
            return None
        if self.sender is not None:
            self.sender.send((x,))
            return None
        logits = x[0].float()  # [sampling rows, vocab]
        rows = [r for r in cmd.rows if r.sample]
        return {r.seq: sample(logits[i], r) for i, r in enumerate(rows)}

    def _forward_step(self, cmd: StepCommand) -> Any:
        x = cmd.inputs if self.spec.prev is None else self._incoming()
        x = tuple(v.to(self.dev) if isinstance(v, torch.Tensor) else v for v in x)
        y = self.stage(*x)
        if not self.spec.leads:
            return None
        if self.sender is not None:
            self.sender.send(y)
            return None
        return tuple(v.detach().to("cpu") if isinstance(v, torch.Tensor) else v for v in y)

    def close(self) -> None:
        if self.sender is not None:
            with contextlib.suppress(Exception):
                self.sender.wait()
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def _layout(rows: tuple[Row, ...], block_size: int,
            dev: torch.device) -> tuple[StepLayout, torch.Tensor]:
    """The step's packed positions, KV slots, decode batch and prompt chunks (see
    `StepLayout`), and the packed indices of the tokens that sample."""
    positions: list[torch.Tensor] = []
    slots: list[torch.Tensor] = []
    dec_rows: list[int] = []
    dec_tables: list[torch.Tensor] = []  # each decode row's block table
    lengths: list[int] = []  # and its context
    chunks: list[tuple[int, int, torch.Tensor, int]] = []
    sample_at: list[int] = []
    first = 0
    for r in rows:
        pos = torch.arange(r.start, r.start + r.n)
        table = torch.tensor(r.blocks, dtype=torch.long)
        positions.append(pos)
        slots.append(table[pos // block_size] * block_size + pos % block_size)
        length = r.start + r.n
        if r.n == 1 and r.start > 0:  # a decode row (`kcloud.planner.scheduling.Scheduled`)
            dec_rows.append(first)
            dec_tables.append(table)
            lengths.append(length)
        else:
            used = -(-length // block_size)
            chunks.append((first, r.n, table[:used].to(dev), length))
        if r.sample:
            sample_at.append(first + r.n - 1)
        first += r.n
    decode = []
    for group in decode_groups(lengths):
        longest = lengths[group[0]]
        used = -(-longest // block_size)
        tables = torch.zeros(len(group), used, dtype=torch.long)  # padding: block 0, masked
        mask = torch.zeros(len(group), 1, 1, longest, dtype=torch.bool)
        for i, j in enumerate(group):
            blocks = -(-lengths[j] // block_size)
            tables[i, :blocks] = dec_tables[j][:blocks]
            mask[i, 0, 0, :lengths[j]] = True
        padded = lengths[group[-1]] < longest
        decode.append((torch.tensor([dec_rows[j] for j in group], dtype=torch.long, device=dev),
                       tables.to(dev), longest, mask.to(dev) if padded else None))
    layout = StepLayout(
        positions=torch.cat(positions).to(dev), slots=torch.cat(slots).to(dev),
        decode=tuple(decode), chunks=tuple(chunks))
    return layout, torch.tensor(sample_at, dtype=torch.long, device=dev)


def sample(logits: torch.Tensor, row: Row) -> int:
    """The next token from one row's logits: greedy at temperature 0, else a draw from the
    top-p nucleus at that temperature, seeded by (the sequence's seed, the token's index) so
    that the draw is the same whatever batch the sequence ran in, and after a preemption."""
    if row.temperature == 0.0:
        return int(logits.argmax())
    probs = torch.softmax(logits / row.temperature, dim=-1)
    if row.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < row.top_p  # the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    g = torch.Generator().manual_seed((row.seed * 1_000_003 + row.index) % (2**63))
    return int(torch.multinomial(probs, 1, generator=g))


# ---- a local worker process ------------------------------------------------------------------


def die_with_parent() -> None:
    """Ask the kernel to kill this process when its parent dies (Linux), whatever kills it."""
    lifecycle.set_parent_death_signal()


def process_main(spec: StageSpec, commands: Any, results: Any, parent: int) -> None:
    """The body of a local worker process: build, report ready, beat, then run commands.
    Results go to `results` as ("ready", rank), ("result", rank, step, value, seconds),
    ("beat", rank), ("error", rank, "where: what")."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver decides; Ctrl-C reaches it too
    if os.getppid() != parent:  # the parent died before the signal was set
        os._exit(1)
    rank = spec.rank
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            if os.getppid() != parent:
                os._exit(1)
            with contextlib.suppress(Exception):
                results.put(("beat", rank))

    threading.Thread(target=beat, daemon=True, name="kcloud-heartbeat").start()
    where = "setup"
    worker = StageWorker(spec)
    try:
        worker.setup()
        results.put(("ready", rank))
        while True:
            try:
                cmd = commands.get(timeout=1.0)
            except queue_mod.Empty:
                continue
            if cmd is None:
                break
            if isinstance(cmd, RunCommand):
                where = "run"
                results.put(("run", rank, worker.run_schedule(cmd)))
                continue
            where = f"step {cmd.step}"
            t0 = time.perf_counter()
            out = worker.execute(cmd)
            results.put(("result", rank, cmd.step, out, time.perf_counter() - t0))
        worker.close()
    except BaseException as exc:  # reported; the engine restarts the replica
        text = " ".join(str(exc).split())[:240]
        results.put(("error", rank, f"{where}: {type(exc).__name__}: {text}"))
        stop.set()
        time.sleep(0.2)  # let the queue's feeder thread flush
        os._exit(1)
    stop.set()
