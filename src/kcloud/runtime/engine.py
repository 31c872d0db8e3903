"""The engine: a plan's workers started once and kept up, driven step by step.

`Engine(plan, mode=...)` starts one resident worker per device of each stage of each replica
(`stage_worker`), then a caller drives it: `submit` a request (an LLM prompt's token ids and
its sampling parameters, or a non-LLM input), `step` (schedule, execute, update: returns what
each request produced), `abort` one, `stop` all. Each replica has its own process group, its
own KV blocks and its own scheduler (`scheduler`: continuous batching with chunked prefill and
preemption for LLMs, dynamic batching for other models); a request goes to the least-loaded
replica. The HTTP server (`kcloud.serve`) and `kcloud run` are clients of this one interface.

Faults: a worker that dies, raises or stops beating (hung) fails its replica: the replica's
requests that have not produced a token yet go back to a queue (another replica's, or this one
once it is up again), those that have end with an error, and the replica restarts by itself.
Workers die with the engine's process, whatever kills it (`stage_worker.die_with_parent`).

In emulated mode (devices absent from this host) each step's results are released when the cost
model's time of that step has passed, so a client sees the modeled device's pace; its figures
are labelled modeled.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue as queue_mod
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.multiprocessing as mp

from kcloud.errors import KCloudError
from kcloud.planner.plan import Plan
from kcloud.runtime import backends, lifecycle
from kcloud.runtime.scheduler import (
    Batcher,
    BlockManager,
    Item,
    SamplingParams,
    Scheduler,
    Sequence,
    StepPlan,
)
from kcloud.runtime.stage_worker import Row, StageSpec, StepCommand, process_main

BLOCK_SIZE = 16


class Overloaded(KCloudError):
    """The waiting queue is full: try again later."""


class RequestError(KCloudError):
    """A request this engine can never run (too long for the context or the KV cache)."""


@dataclass
class Event:
    """What one request produced in a step: new tokens (LLM) or its output (other models);
    `finished` with its reason ("length", "stop", "abort", "error"), and the error's text."""

    id: int
    tokens: list[int] = field(default_factory=list)
    output: Any = None
    finished: bool = False
    reason: str | None = None
    error: str | None = None
    engine_s: float | None = None  # on a finished request: the wall time of the steps it ran in


@dataclass
class _Worker:
    spec: StageSpec
    commands: Any
    proc: Any = None
    ready: bool = False
    beat: float = 0.0


@dataclass
class _Replica:
    index: int
    specs: list[StageSpec]
    scheduler: Scheduler | None
    batcher: Batcher | None
    workers: list[_Worker] = field(default_factory=list)
    incarnation: int = 0
    state: str = "starting"  # starting | idle | busy | failed
    started: float = 0.0
    step: int = 0
    inflight: StepPlan | list[Item] | None = None
    t_step: float = 0.0
    modeled_s: float | None = None
    release: tuple[float, Any] | None = None  # (when, result): paced emulated results
    failures: list[float] = field(default_factory=list)
    last_error: str = ""

    @property
    def last_rank(self) -> int:
        last = max(s.stage for s in self.specs)
        return next(s.rank for s in self.specs if s.stage == last and s.leads)

    @property
    def healthy(self) -> bool:
        return self.state in ("idle", "busy")

    @property
    def load(self) -> int:
        sched = self.scheduler or self.batcher
        assert sched is not None
        return sched.load


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Engine:
    """See the module's docstring."""

    def __init__(
        self, plan: Plan, *, mode: str = "emulated", max_batch: int | None = None,
        max_queue: int = 1024, kv_blocks: int | None = None, block_size: int = BLOCK_SIZE,
        token_budget: int = 256, max_wait_s: float = 0.005, weights: str | None = None,
        worker_timeout_s: float = 10.0, start_timeout_s: float = 180.0,
        pace: bool = True, modeled_step: Callable[[int, Any], float | None] | None = None,
        serving: bool = True, generate: bool = True, comm_timeout_s: float = 60.0,
        ray_address: str | None = None,
    ) -> None:
        if mode not in backends.MODES:
            raise KCloudError(f"unknown mode '{mode}'", "use --mode real or --mode emulated")
        if mode == "real":
            backends.check_real([s.device_type for r in plan.replicas for s in r.stages])
        from kcloud.runtime.layout import is_llm_plan, stage_plan  # torch-heavy: when used

        self.plan = plan
        self.mode = mode
        self.max_queue = max_queue
        self.worker_timeout_s = worker_timeout_s
        self.start_timeout_s = start_timeout_s
        self.pace = pace and mode == "emulated"
        self.modeled_step = modeled_step
        llm = is_llm_plan(plan) and generate
        self.max_batch = max_batch or (max(plan.micro_batch, 64) if llm else plan.micro_batch)
        self.serving = serving
        layout = stage_plan(plan, mode, weights=weights, block_size=block_size,
                            kv_blocks=kv_blocks, max_seqs=self.max_batch, serving=serving,
                            generate=generate, comm_timeout_s=comm_timeout_s)
        self.layout = layout
        self.llm = layout.llm
        self.max_len = layout.max_len
        self.eos = layout.eos
        self.kv_blocks = layout.kv_blocks
        self.block_size = block_size
        self.token_budget = token_budget
        self.notes = layout.notes
        self.figures = "measured" if all(
            backends.choose(s.device_type, mode, s.devices[0]).real
            for r in plan.replicas for s in r.stages) else "modeled"
        self._ids = itertools.count(1)
        self._ctx = mp.get_context("spawn")
        self._results = self._ctx.Queue()
        self._where: dict[int, tuple[_Replica, Sequence | Item]] = {}
        self._engine_s: dict[int, float] = {}  # request -> wall time of its steps so far
        self.replicas: list[_Replica] = []
        self.preemptions = 0
        self.restarts = 0
        self.completed = 0
        self.failed_requests = 0
        for ri, specs in enumerate(layout.replicas):
            sched = Scheduler(BlockManager(self.kv_blocks, block_size), max_batch=self.max_batch,
                              token_budget=token_budget, max_len=self.max_len) \
                if self.llm and serving else None
            batcher = Batcher(self.max_batch, max_wait_s) if not self.llm and serving else None
            self.replicas.append(_Replica(ri, specs, sched, batcher))
        if self.pace and self.modeled_step is None and serving and self.figures == "modeled":
            self.modeled_step = _pacer(plan, mode, self.llm)
        self._stopped = False
        self.ray_address = ray_address
        self._ray: Any = None  # the Ray connection, when the workers are Ray actors
        self._rendezvous: tuple[str, int] | None = None  # a run's one process group on Ray
        self.placement: dict[int, str] = {}  # rank -> Ray node address
        self.runs: list[Any] = []  # the results of `run` schedules, as they come
        # when a list: (replica, step, seconds from its command to its result) of every LLM
        # step (`kcloud.runtime.step_costs` times the engine with it)
        self.step_times: list[tuple[int, StepPlan, float]] | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Start every replica's workers and wait until they are ready (or fail)."""
        shared = None if self.serving else _free_port()  # a run: one process group
        if self.ray_address is not None:
            from kcloud.runtime.ray_executor import RayConnection

            self._ray = RayConnection(self.ray_address, [s.device_type for r in self.replicas
                                                         for s in r.specs],
                                      min(self.start_timeout_s, 120.0))
        for rep in self.replicas:
            self._launch(rep, shared)
        deadline = time.monotonic() + self.start_timeout_s
        while any(r.state == "starting" for r in self.replicas):
            if time.monotonic() > deadline:
                self.stop()
                raise KCloudError(f"the workers were not ready within {self.start_timeout_s:.0f}"
                                  " s", "check the plan's stages and this host's memory")
            self._poll(0.1)
            dead = [r for r in self.replicas if r.state == "failed"]
            if dead:
                err = dead[0].last_error
                self.stop()
                if not self.serving:
                    raise KCloudError(err, "fix the model or the plan and run again")
                raise KCloudError(f"replica {dead[0].index} did not start: {err}",
                                  "fix the model or the plan and start again")

    def _launch(self, rep: _Replica, port: int | None = None) -> None:
        rep.incarnation += 1
        if self._ray is not None:
            self._launch_ray(rep)
            return
        port = port or _free_port()
        rep.workers = []
        for spec in rep.specs:
            spec = _with(spec, port=port)
            w = _Worker(spec, self._ctx.Queue())
            w.proc = self._ctx.Process(
                target=process_main,
                args=(spec, w.commands, _Tagged(self._results, rep.index, rep.incarnation),
                      os.getpid()),
                daemon=True, name=f"kcloud-r{rep.index}s{spec.stage}t{spec.tp_rank}")
            w.beat = time.monotonic()
            rep.workers.append(w)
        lifecycle.start([w.proc for w in rep.workers])  # children ignore Ctrl-C from birth
        rep.state = "starting"
        rep.started = time.monotonic()
        rep.inflight = None
        rep.release = None

    def _launch_ray(self, rep: _Replica) -> None:
        """The replica's workers as resident Ray actors on the nodes of their device types."""
        import queue

        from kcloud.runtime.ray_executor import RayProc

        actors = self._ray.actors(rep.specs)
        rdv = self._rendezvous or self._ray.rendezvous(actors[0])
        if not self.serving:
            self._rendezvous = rdv
        rep.workers = []
        for spec, actor in zip(rep.specs, actors, strict=True):
            spec = _with(spec, master_addr=rdv[0], port=rdv[1], pin_core=None,
                         torch_device="cuda:0" if spec.backend == "cuda" else spec.torch_device)
            w = _Worker(spec, queue.Queue())
            w.proc = RayProc(self._ray, actor, spec, w.commands,
                             _Tagged(self._results, rep.index, rep.incarnation))
            w.beat = time.monotonic()
            rep.workers.append(w)
        for w in rep.workers:
            w.proc.start()
        rep.state = "starting"
        rep.started = time.monotonic()
        rep.inflight = None
        rep.release = None

    def stop(self) -> None:
        """Stop every worker (those that do not stop within a second are killed)."""
        if self._stopped:
            return
        self._stopped = True
        for rep in self.replicas:
            for w in rep.workers:
                with contextlib.suppress(Exception):
                    w.commands.put(None)
        for rep in self.replicas:
            _reap([w.proc for w in rep.workers])
            for w in rep.workers:
                with contextlib.suppress(Exception):
                    w.commands.close()
                    w.commands.cancel_join_thread()
        for rep in self.replicas:
            for w in rep.workers:
                node = getattr(w.proc, "node", None)
                if node is not None:
                    self.placement[w.spec.rank] = node
        if self._ray is not None:
            self._ray.close()
        with contextlib.suppress(Exception):
            self._results.close()
            self._results.cancel_join_thread()

    def __enter__(self) -> Engine:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- requests --------------------------------------------------------------------------
    @property
    def waiting(self) -> int:
        return sum(len((r.scheduler or r.batcher).waiting) for r in self.replicas)  # type: ignore[union-attr]

    def check(self, prompt_len: int, max_tokens: int) -> str | None:
        """Why an LLM request of these lengths can never run (None when it can)."""
        rep = self.replicas[0]
        assert rep.scheduler is not None
        return rep.scheduler.fits(prompt_len, max_tokens)

    def submit(self, prompt: list[int], params: SamplingParams, restartable: bool = False) -> int:
        """Queue an LLM request; its id. Raises RequestError (never runs) or Overloaded.
        `restartable`: none of its tokens reach the client before it ends (not streamed), so
        a fault after some were generated starts it over (an Event with reason "retry")."""
        if not self.llm:
            raise RequestError("this model takes inputs, not a prompt", "use /v1/infer")
        why = self.check(len(prompt), params.max_tokens)
        if why is not None:
            raise RequestError(why, "shorten the prompt or lower max_tokens")
        if not prompt:
            raise RequestError("the prompt is empty", "give at least one token")
        self._admit()
        seq = Sequence(next(self._ids), list(prompt), params, self.eos, time.monotonic(),
                       restartable=restartable)
        rep = self._route()
        assert rep.scheduler is not None
        rep.scheduler.add(seq)
        self._where[seq.id] = (rep, seq)
        return seq.id

    def submit_input(self, value: tuple[Any, ...], size: int) -> int:
        """Queue a non-LLM request: an input tuple with `size` samples on its batch axis."""
        if self.llm:
            raise RequestError("this model takes a prompt", "use /v1/completions")
        if size > self.max_batch:
            raise RequestError(f"{size} samples exceed the batch limit of {self.max_batch}",
                               f"send at most {self.max_batch} samples per request")
        self._admit()
        item = Item(next(self._ids), value, size, time.monotonic())
        rep = self._route()
        assert rep.batcher is not None
        rep.batcher.add(item)
        self._where[item.id] = (rep, item)
        return item.id

    def _admit(self) -> None:
        if self.waiting >= self.max_queue:
            raise Overloaded(f"{self.waiting} requests are waiting, the most this server "
                             "queues", "retry later")
        if not any(r.healthy or r.state == "starting" for r in self.replicas):
            raise Overloaded("no replica is running", "retry later")

    def _route(self) -> _Replica:
        """The least-loaded replica (outstanding tokens or samples), healthy ones first."""
        live = [r for r in self.replicas if r.healthy] or \
            [r for r in self.replicas if r.state == "starting"] or self.replicas
        return min(live, key=lambda r: (r.load, r.index))

    def abort(self, rid: int) -> bool:
        """Drop a request (its KV blocks freed); False when it is unknown or already done."""
        got = self._where.pop(rid, None)
        self._engine_s.pop(rid, None)
        if got is None:
            return False
        rep, what = got
        if isinstance(what, Sequence):
            what.finish_reason = "abort"
            assert rep.scheduler is not None
            rep.scheduler.remove(what)
        else:
            assert rep.batcher is not None
            rep.batcher.remove(what)
        return True

    @property
    def busy(self) -> bool:
        return any((r.scheduler or r.batcher).busy or r.inflight is not None  # type: ignore[union-attr]
                   for r in self.replicas)

    # -- the loop --------------------------------------------------------------------------
    def step(self, timeout: float = 0.05) -> list[Event]:
        """One turn of the loop: start a step on every idle replica with work, then wait up to
        `timeout` for results; the events of the requests that progressed."""
        events: list[Event] = []
        now = time.monotonic()
        for rep in self.replicas:
            if rep.state == "idle":
                self._launch_step(rep, now)
        wait = timeout
        due = [r.release[0] for r in self.replicas if r.release is not None]
        due += [d for r in self.replicas if r.batcher is not None and r.state == "idle"
                for d in [r.batcher.due(now)] if d is not None]
        if due:
            wait = max(0.0, min(wait, min(due) - now))
        if any(r.state == "idle" and r.scheduler is not None and r.scheduler.busy
               for r in self.replicas):
            wait = 0.0
        events += self._poll(wait)
        now = time.monotonic()
        for rep in self.replicas:
            if rep.release is not None and rep.release[0] <= now:
                _, result = rep.release
                rep.release = None
                events += self._finish_step(rep, result)
        return events

    def _launch_step(self, rep: _Replica, now: float) -> None:
        rep.step += 1
        if rep.scheduler is not None:
            plan = rep.scheduler.schedule()
            self.preemptions += len(plan.preempted)
            if not plan.rows:
                return
            rows: list[Row] = []
            tokens: list[int] = []
            for r in plan.rows:
                p = r.seq.params
                rows.append(Row(r.seq.id, r.start, r.n, tuple(r.seq.blocks), r.sample,
                                p.temperature, p.top_p, p.seed, len(r.seq.output)))
                tokens += r.seq.tokens[r.start:r.start + r.n]
            cmd = StepCommand(rep.step, tuple(rows), tuple(tokens))
            rep.inflight = plan
        else:
            assert rep.batcher is not None
            items = rep.batcher.take(now)
            if not items:
                return
            cmd = StepCommand(rep.step, inputs=_concat([i.value for i in items]))
            rep.inflight = items
        rep.modeled_s = self.modeled_step(rep.index, rep.inflight) if (
            self.pace and self.modeled_step is not None) else None
        rep.t_step = time.monotonic()
        for w in rep.workers:
            w.commands.put(cmd)
        rep.state = "busy"

    def _poll(self, wait: float) -> list[Event]:
        events: list[Event] = []
        try:
            msg = self._results.get(timeout=wait) if wait > 0 else self._results.get_nowait()
        except queue_mod.Empty:
            msg = None
        while msg is not None:
            events += self._take(msg)
            try:
                msg = self._results.get_nowait()
            except queue_mod.Empty:
                msg = None
        events += self._watch()
        return events

    def wake(self) -> None:
        """End a `step`'s wait now (from another thread: new work arrived)."""
        self._results.put(("wake",))

    def _take(self, msg: tuple[Any, ...]) -> list[Event]:
        if msg[0] == "wake":
            return []
        ri, inc, kind, rank, *rest = msg
        rep = self.replicas[ri]
        if inc != rep.incarnation or rep.state == "failed":
            return []  # from a replica's earlier incarnation
        w = next(x for x in rep.workers if x.spec.rank == rank)
        w.beat = time.monotonic()
        if kind == "ready":
            w.ready = True
            if all(x.ready for x in rep.workers) and rep.state == "starting":
                rep.state = "idle"
                rep.failures = [t for t in rep.failures if time.monotonic() - t < 60]
        elif kind == "run":
            self.runs.append(rest[0])
        elif kind == "error":
            return self._fail(rep, f"{w.spec.label} ({w.spec.device_type}, "
                                   f"{w.spec.backend}) failed in {rest[0]}")
        elif kind == "result" and rank == rep.last_rank and rep.state == "busy":
            step, value, _ = rest
            if step != rep.step:
                return []
            if self.step_times is not None and isinstance(rep.inflight, StepPlan):
                self.step_times.append((ri, rep.inflight, time.monotonic() - rep.t_step))
            if rep.modeled_s is not None:
                when = rep.t_step + rep.modeled_s
                if when > time.monotonic():
                    rep.release = (when, value)
                    return []
            return self._finish_step(rep, value)
        return []

    def _finish_step(self, rep: _Replica, value: Any) -> list[Event]:
        events: list[Event] = []
        inflight = rep.inflight
        rep.inflight = None
        rep.state = "idle"
        wall = time.monotonic() - rep.t_step  # the step as the engine saw it (IPC and pacing in)
        spent = self._engine_s
        if rep.scheduler is not None:
            assert isinstance(inflight, StepPlan)
            done = rep.scheduler.update(inflight, value)
            for sid in {r.seq.id for r in inflight.rows}:
                spent[sid] = spent.get(sid, 0.0) + wall
            for r in inflight.rows:
                if r.sample and r.seq.id in value and r.seq.id in self._where:
                    ev = Event(r.seq.id, [r.seq.output[-1]])
                    if r.seq.finished:
                        ev.finished, ev.reason = True, r.seq.finish_reason
                        ev.engine_s = spent.get(r.seq.id)
                    events.append(ev)
            for seq in done:
                self._where.pop(seq.id, None)
                spent.pop(seq.id, None)
                self.completed += 1
        else:
            assert isinstance(inflight, list)
            outs = _split(value, [i.size for i in inflight])
            for item, out in zip(inflight, outs, strict=True):
                if self._where.pop(item.id, None) is not None:
                    events.append(Event(item.id, output=out, finished=True, reason="done",
                                        engine_s=spent.pop(item.id, 0.0) + wall))
                    self.completed += 1
        return events

    def _watch(self) -> list[Event]:
        """Workers that died or stopped beating fail their replica; failed replicas restart."""
        events: list[Event] = []
        now = time.monotonic()
        for rep in self.replicas:
            if rep.state == "failed" or (not self.serving and rep.state != "starting"):
                continue  # a run watches its own workers once they are up (`run`)
            for w in rep.workers:
                code = w.proc.exitcode
                if code is not None and not self._stopped:
                    how = getattr(w.proc, "how", None) or (
                        f"signal {-code}" if code < 0 else f"exit code {code}")
                    events += self._fail(rep, f"{w.spec.label} ({w.spec.device_type}, "
                                              f"{w.spec.backend}) died with {how}")
                    break
                if rep.state == "starting":
                    if now - rep.started > self.start_timeout_s:
                        events += self._fail(rep, f"{w.spec.label} ({w.spec.device_type}, "
                                                  f"{w.spec.backend}) was not ready within "
                                                  f"{self.start_timeout_s:.0f} s")
                        break
                    continue
                if now - w.beat > self.worker_timeout_s:
                    events += self._fail(rep, f"{w.spec.label} ({w.spec.device_type}, "
                                              f"{w.spec.backend}) stopped responding for "
                                              f"{now - w.beat:.0f} s (hung)")
                    break
        for rep in self.replicas:
            if rep.state == "failed" and not self._stopped and len(rep.failures) <= 3 \
                    and self.serving:
                self._launch(rep)
                self.restarts += 1
        return events

    def _fail(self, rep: _Replica, why: str) -> list[Event]:
        """Fail a replica: its workers killed, its requests requeued or ended with `why`."""
        rep.state = "failed"
        rep.last_error = why
        rep.failures.append(time.monotonic())
        rep.release = None
        rep.inflight = None
        for w in rep.workers:
            with contextlib.suppress(Exception):
                w.proc.kill()
        _reap([w.proc for w in rep.workers])
        events: list[Event] = []
        others = [r for r in self.replicas if r is not rep and r.healthy]
        sched: Any = rep.scheduler or rep.batcher
        if sched is None:  # a run's workers: nothing queued here
            return events
        pending = list(sched.running) if rep.scheduler is not None else []
        pending += list(sched.waiting)
        for what in pending:
            started = isinstance(what, Sequence) and bool(what.output)
            if started and what.restartable:  # type: ignore[union-attr]
                what.output = []  # type: ignore[union-attr]
                events.append(Event(what.id, reason="retry"))
                started = False
            gone = len(rep.failures) > 3
            if started or gone:
                self._where.pop(what.id, None)
                self._engine_s.pop(what.id, None)
                sched.remove(what)  # type: ignore[arg-type]
                if isinstance(what, Sequence):
                    what.finish_reason = "error"
                self.failed_requests += 1
                events.append(Event(what.id, finished=True, reason="error", error=why))
                continue
            sched.remove(what)  # type: ignore[arg-type]
            if isinstance(what, Sequence):
                what.computed = 0
                what.finish_reason = None
            target = min(others, key=lambda r: r.load) if others else rep
            (target.scheduler or target.batcher).add(what)  # type: ignore[union-attr, arg-type]
            self._where[what.id] = (target, what)
        return events

    # -- a benchmark run (`kcloud run`) ------------------------------------------------------
    def run(self, commands: dict[int, Any], collect: Any, timeout_s: float) -> None:
        """Send each worker (by rank) its whole schedule, then hand what comes back to
        `collect` (`take(result)`, `lost(rank, how)`, `over()`), watching for workers that
        die or stop beating, until `collect.over()`."""
        workers = {w.spec.rank: w for r in self.replicas for w in r.workers}
        for rank, cmd in commands.items():
            workers[rank].commands.put(cmd)
        now = time.monotonic()
        for w in workers.values():
            w.beat = now
        lost: set[int] = set()
        while not collect.over():
            self.runs.clear()
            self._poll(0.1)
            for res in self.runs:
                collect.take(res)
            now = time.monotonic()
            for rank, w in workers.items():
                if rank in lost or collect.reported(rank):
                    continue
                code = w.proc.exitcode
                if code not in (None, 0):
                    lost.add(rank)
                    how = getattr(w.proc, "how", None)
                    collect.lost(rank, how or (f"signal {-code}" if code < 0
                                               else f"exit code {code}"))
                elif now - w.beat > self.worker_timeout_s:
                    raise KCloudError(
                        f"{w.spec.label} ({w.spec.device_type}, {w.spec.backend}) stopped "
                        f"responding: no heartbeat for {now - w.beat:.1f} s (stopped or hung)",
                        "check that process, or raise --worker-timeout")

    def worker_pids(self) -> list[dict[str, Any]]:
        return [{"replica": r.index, "stage": w.spec.stage, "tp_rank": w.spec.tp_rank,
                 "device": w.spec.device, "pid": w.proc.pid, "state": r.state}
                for r in self.replicas for w in r.workers]

    # -- figures ---------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        used = free = running = 0
        for r in self.replicas:
            if r.scheduler is not None:
                used += r.scheduler.blocks.used
                free += len(r.scheduler.blocks.free)
                running += len(r.scheduler.running)
            elif isinstance(r.inflight, list):
                running += sum(i.size for i in r.inflight)
        return {"waiting": self.waiting, "running": running, "kv_blocks_used": used,
                "kv_blocks_free": free, "preemptions": self.preemptions,
                "restarts": self.restarts, "replicas_up": sum(r.healthy for r in self.replicas),
                "replicas": len(self.replicas)}


def _pacer(plan: Plan, mode: str, llm: bool,
           emulated_only: bool = True) -> Callable[[int, Any], float | None]:
    """The cost model's seconds of one step of a replica (`kcloud.hardware.steps`, the
    composition predict, the planner and the simulator use): the sum over its emulated stages
    (all of them: `emulated_only=False`) of their step at this step's batch, KV tokens and
    prompt chunks."""
    from kcloud.hardware.catalog import get_device
    from kcloud.hardware.steps import stage_tables_for, step_cost
    from kcloud.runtime.model import layer_graph

    forward = layer_graph(plan.model, batch=plan.micro_batch, seq_len=plan.seq_len,
                          phase=plan.phase if llm else None)
    decode = None
    if llm:
        kv = min((plan.seq_len or 1) + (plan.output_tokens or 0) // 2,
                 (forward.meta.get("max_seq_len") or 1 << 30) - 1)
        decode = layer_graph(plan.model, batch=plan.micro_batch, seq_len=1, phase="decode",
                             kv_len=kv)
    cache: dict[tuple[Any, ...], Any] = {}
    tables = [[stage_tables_for(st, forward, decode, get_device(st.device_type), None,
                                cache=cache)
               for st in rep.stages
               if not emulated_only
               or backends.choose(st.device_type, mode, st.devices[0]).name == "emulated"]
              for rep in plan.replicas]

    def seconds(replica: int, work: Any) -> float | None:
        stages = tables[replica]
        if not stages:
            return None
        if isinstance(work, StepPlan):
            batch, kv, tok, pairs = work.shape()
            return sum(step_cost(t, batch, kv, prefill_tokens=tok,
                                 prefill_pairs=pairs).time_s for t in stages)
        return sum(step_cost(t, sum(i.size for i in work)).time_s for t in stages)

    return seconds


class _Tagged:
    """The engine's one result queue as a worker sees it: each message tagged with the
    replica and its incarnation (messages of a replaced incarnation are ignored)."""

    def __init__(self, q: Any, replica: int, incarnation: int) -> None:
        self.q, self.replica, self.incarnation = q, replica, incarnation

    def put(self, msg: tuple[Any, ...]) -> None:
        self.q.put((self.replica, self.incarnation, *msg))


def _with(spec: StageSpec, **changes: Any) -> StageSpec:
    from dataclasses import replace

    return replace(spec, **changes)


def _concat(values: list[tuple[Any, ...]]) -> tuple[Any, ...]:
    import torch

    return tuple(torch.cat([v[i] for v in values]) if isinstance(values[0][i], torch.Tensor)
                 else values[0][i] for i in range(len(values[0])))


def _split(value: tuple[Any, ...], sizes: list[int]) -> list[tuple[Any, ...]]:
    import torch

    outs: list[list[Any]] = [[] for _ in sizes]
    for v in value:
        parts = torch.split(v, sizes) if isinstance(v, torch.Tensor) else [v] * len(sizes)
        for o, p in zip(outs, parts, strict=True):
            o.append(p)
    return [tuple(o) for o in outs]


def _reap(procs: list[Any]) -> None:
    end = time.monotonic() + 1.0
    for p in procs:
        if p is not None and p.pid is not None:
            p.join(timeout=max(0.0, end - time.monotonic()))
    for p in procs:
        if p is not None and p.pid is not None and p.is_alive():
            p.kill()
            p.join(timeout=1.0)
