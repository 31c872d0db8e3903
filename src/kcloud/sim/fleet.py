"""The fleet's discrete-event simulation.

Events in one heap: request arrivals (each service's stream, merged lazily), the end of a lane's
iteration, autoscaling ticks, replicas becoming ready, idle power-down checks. Each replica's
lanes schedule as the engine does, with the engine's own policy (`kcloud.planner.scheduling`:
iteration-level batching, chunked prefill, KV blocks, preemption; for a non-LLM model, dynamic
batching up to `max_batch` samples or `max_wait_s`). A run of iterations that no scheduling
decision changes (`Scheduler.steady_run`: decode steps, and beside them a prompt's full
chunks, its last chunk, then its decode steps) is advanced in one event: a step's time is
linear in its KV tokens and prompt pairs (`kcloud.hardware.steps`), which grow linearly from
step to step within each of those three parts, so step j of a part takes alpha + beta j
seconds and k steps k alpha + beta k (k - 1) / 2 in closed form; an arrival that could join a
later step cuts the run before it (`Scheduler.cut_run`). The result is the same as stepping
every iteration, at a fraction of the events.

A service may stand behind a serving front end (`Service.front_end`: an OpenAI-compatible HTTP
server before its engine, as `kcloud serve` is; `kcloud.hardware.host.FrontEndCosts`, measured by
`kcloud.sim.front_end`). Its event loop admits one request at a time, first come first served, for
the CPU time of the request and its prompt (`FrontEndCosts.admit_s`), before the request is routed;
`latency_s` is added to each request's time to first token and end to end (its way in and its
tokens' way out). The front end's CPU (each admission, and for each step that streams tokens
`delivery_s` plus `token_s` a token, beside a client on the same host) is taken from the workers of
the service's replicas on this host's CPU cores when their running steps leave no core free: those
steps last that much longer, shared equally (`Simulator._front_end_cpu`); devices elsewhere do not
wait.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from kcloud.planner.scheduling import (
    Batcher,
    CountedSeq,
    Run,
    Scheduler,
    SchedulerConfig,
    StepPlan,
)
from kcloud.sim.replica import ReplicaModel
from kcloud.sim.results import Ledger, ServiceStats

ROUTERS = ("round-robin", "least-outstanding", "speed-aware")

_ARRIVAL, _LANE, _TICK, _READY, _IDLE, _DUE, _ADMIT = range(7)


@dataclass(frozen=True)
class Slo:
    ttft_s: float | None = None
    tpot_s: float | None = None
    latency_s: float | None = None  # end to end (non-LLM services; optional for LLMs)

    def met(self, ttft: float, tpot: float, e2e: float) -> bool:
        return ((self.ttft_s is None or ttft <= self.ttft_s)
                and (self.tpot_s is None or tpot <= self.tpot_s)
                and (self.latency_s is None or e2e <= self.latency_s))


@dataclass(frozen=True)
class Autoscale:
    """Replicas added when the mean outstanding requests per replica exceed `up`, removed
    (drained, then powered off) below `down`; a new replica serves after `startup_s`."""

    min_replicas: int = 1
    max_replicas: int = 8
    up: float = 8.0
    down: float = 1.0
    interval_s: float = 10.0
    startup_s: float = 30.0


@dataclass
class Service:
    name: str
    models: list[ReplicaModel]  # one per replica slot (the plan's replicas, repeated)
    stream: Iterator[tuple[float, int, int]]
    slo: Slo = field(default_factory=Slo)
    replicas: int = 1  # replicas powered on at the start
    router: str = "least-outstanding"
    sched: SchedulerConfig | None = None  # LLM: per replica (blocks split over its lanes)
    max_batch: int = 8  # non-LLM: dynamic batching bound
    max_wait_s: float = 0.0  # non-LLM: how long a batch waits to fill
    autoscale: Autoscale | None = None
    power_down_idle_s: float | None = None  # power a replica off after this long idle
    wake_s: float = 0.0  # time to power an idle replica back on
    mean_context: int = 1024  # speed-aware routing: the context its rates are weighed at
    # its serving front end's costs (`kcloud.hardware.host.FrontEndCosts`), None: none modeled
    front_end: Any = None

    def __post_init__(self) -> None:
        if self.router not in ROUTERS:
            from kcloud.errors import KCloudError

            raise KCloudError(f"service {self.name}: unknown router '{self.router}'",
                              f"use one of: {', '.join(ROUTERS)}")

    @property
    def is_llm(self) -> bool:
        return self.models[0].is_llm


class _Lane:
    """One engine inside a replica (a pipeline of p stages runs p of them)."""

    __slots__ = ("batcher", "busy", "cur", "due", "end", "replica", "run", "sched", "version")

    def __init__(self, replica: _Replica, sched: Scheduler | None,
                 batcher: Batcher | None) -> None:
        self.replica = replica
        self.sched = sched
        self.batcher = batcher  # non-LLM
        self.due = -1.0  # non-LLM: when a wake-up to send a batch is pending
        self.busy = False
        self.version = 0
        self.end = 0.0
        self.cur: Any = None  # the iteration (or batch) in progress
        self.run: _RunTimes | None = None  # a run of steps in progress

    @property
    def outstanding(self) -> int:
        if self.sched is not None:
            return self.sched.outstanding
        assert self.batcher is not None
        return len(self.batcher.waiting) + (len(self.cur) if self.busy and self.cur else 0)

    def load(self, t: float) -> int:
        """Outstanding work at `t` as the engine's router weighs it (`Scheduler.load`: tokens;
        samples for a non-LLM model). In a run of steps (`run`), the steps done by
        `t` count as done, as they are when stepping one by one."""
        if self.sched is not None:
            rt = self.run
            if rt is None:
                return self.sched.load
            return self.sched.load - rt.run.tokens(rt.done_by(t - rt.t0))
        assert self.batcher is not None
        return self.batcher.load + (len(self.cur) if self.busy and self.cur else 0)


class _RunTimes:
    """A lane's run of steps (`kcloud.planner.scheduling.Run`), begun at `t0`, and its steps'
    times: step j of its full chunks (all of a decode-only run's) takes a1 + b1 j seconds
    (`ReplicaModel.linear`), its last chunk's (seconds, per stage) is `tail`, and its step i
    after that a3 + b3 i."""

    __slots__ = ("a1", "a3", "b1", "b3", "run", "t0", "tail")

    def __init__(self, t0: float, run: Run, m: ReplicaModel) -> None:
        self.t0 = t0
        self.run = run
        b, c = run.batch, run.chunk
        a, sk, sp = m.linear(b, c)
        # step j: kv0 + j b KV tokens, c (start + c) + j c^2 prompt pairs
        self.a1 = a + sk * run.kv0 + sp * c * (run.start + c)
        self.b1 = sk * b + sp * c * c
        self.tail = m.mixed(*run.shape(run.full)) if run.tail else None
        self.a3 = self.b3 = 0.0
        if run.after:
            a, sk, _ = m.linear(b + 1, 0)
            kv, grow = run.after_kv()
            self.a3, self.b3 = a + sk * kv, sk * grow

    def seconds(self, run: Run) -> float:
        """How long `run` (this run, or its first steps) takes."""
        t = _run_time(self.a1, self.b1, run.full)
        if self.tail is not None and run.tail:
            t += self.tail[0] + _run_time(self.a3, self.b3, run.after)
        return t

    def done_by(self, dt: float) -> int:
        """Its steps wholly done `dt` seconds after it began."""
        run = self.run
        t1 = _run_time(self.a1, self.b1, run.full)
        if dt < t1 or self.tail is None or not run.tail:
            return _steps_by(self.a1, self.b1, run.full, dt)
        dt -= t1 + self.tail[0]
        if dt < 0:
            return run.full
        return run.full + 1 + _steps_by(self.a3, self.b3, run.after, dt)


class _Replica:
    __slots__ = ("draining", "groups", "host_front_end", "idle_since", "index", "lanes",
                 "model", "on_since", "rate", "service", "state", "types")

    def __init__(self, service: int, index: int, model: ReplicaModel, svc: Service,
                 types: list[int], groups: list[int], rate: float) -> None:
        self.service, self.index, self.model = service, index, model
        cfg = svc.sched
        per = max(1, cfg.num_blocks // model.pp) if cfg is not None else 0
        self.lanes = [_Lane(self, cfg.scheduler(num_blocks=per) if cfg is not None else None,
                            None if cfg is not None else Batcher(svc.max_batch, svc.max_wait_s))
                      for _ in range(model.pp)]
        self.state = "off"  # off | starting | on | asleep
        self.draining = False
        self.on_since = -1.0
        self.idle_since = 0.0
        self.types = types  # ledger index per stage
        self.groups = groups  # ledger index per device type of its model (`ReplicaModel.groups`)
        self.rate = rate
        # on this host's cores beside a front end, whose CPU it may give up
        self.host_front_end = svc.front_end is not None and model.engine_costs

    @property
    def outstanding(self) -> int:
        return sum(lane.outstanding for lane in self.lanes)

    def load(self, t: float) -> int:
        return sum(lane.load(t) for lane in self.lanes)

    @property
    def routable(self) -> bool:
        return self.state != "off" and not self.draining


@dataclass
class SimResult:
    services: dict[str, ServiceStats]
    ledger: Ledger
    device_counts: dict[str, int]  # devices of each type in the fleet (all replica slots)
    domestic: dict[str, bool]
    price_per_hour: dict[str, float | None]
    span_s: float  # first arrival to last completion
    sim_wall_s: float
    events: int
    estimated: bool = False

    @property
    def requests(self) -> int:
        return sum(s.requests for s in self.services.values())

    @property
    def completed(self) -> int:
        return sum(s.completed for s in self.services.values())

    @property
    def dropped(self) -> int:
        return sum(s.dropped for s in self.services.values())

    @property
    def energy_j(self) -> float:
        lg = self.ledger
        return sum(lg.idle_j) + sum(lg.dyn_total)

    def device_seconds_on(self) -> dict[str, float]:
        return {t: float(sum(self.ledger.on[i])) for i, t in enumerate(self.ledger.types)}

    @property
    def cost_usd(self) -> float | None:
        """Device-hours powered on times the catalog's price (None: a device is unpriced)."""
        total = 0.0
        for t, sec in self.device_seconds_on().items():
            p = self.price_per_hour.get(t)
            if p is None:
                if sec > 0:
                    return None
                continue
            total += p * sec / 3600.0
        return total

    def domestic_share(self) -> dict[str, float]:
        lg = self.ledger
        devs = sum(self.device_counts.values())
        dom_devs = sum(n for t, n in self.device_counts.items() if self.domestic[t])
        energy = [lg.idle_j[i] + lg.dyn_total[i] for i in range(len(lg.types))]
        e_all = sum(energy)
        e_dom = sum(e for t, e in zip(lg.types, energy, strict=True) if self.domestic[t])
        w_all = sum(lg.busy_total)
        w_dom = sum(b for t, b in zip(lg.types, lg.busy_total, strict=True) if self.domestic[t])
        return {"devices": dom_devs / devs if devs else 0.0,
                "energy": e_dom / e_all if e_all else 0.0,
                "work": w_dom / w_all if w_all else 0.0}

    def to_dict(self) -> dict[str, Any]:
        span = self.span_s
        n = self.completed
        tokens = sum(s.tokens for s in self.services.values() if s.is_llm)
        e = self.energy_j
        lg = self.ledger
        per_type = {}
        for i, t in enumerate(lg.types):
            on = sum(lg.on[i])
            per_type[t] = {
                "devices": self.device_counts[t], "domestic": self.domestic[t],
                "utilization": lg.busy_total[i] / on if on else 0.0,
                "energy_j": lg.idle_j[i] + lg.dyn_total[i], "idle_energy_j": lg.idle_j[i],
                "avg_power_w": (lg.idle_j[i] + lg.dyn_total[i]) / span if span else 0.0,
            }
        return {
            "requests": self.requests, "completed": n, "dropped": self.dropped,
            "services": {k: s.to_dict(span) for k, s in self.services.items()},
            "energy_j": e,
            "energy_per_request_j": e / n if n else None,
            "energy_per_token_j": e / tokens if tokens else None,
            "avg_power_w": e / span if span else 0.0,
            "cost_usd": self.cost_usd,
            "domestic_share": self.domestic_share(),
            "device_types": per_type,
            "timeline": {"bin_s": lg.bin_s, **lg.series(span)},
            "span_s": span,
            "sim_wall_s": self.sim_wall_s,
            "events": self.events,
            "estimated": self.estimated,
            "figures": "modeled",
        }


class Simulator:
    def __init__(self, services: list[Service], *, bin_s: float = 10.0,
                 fast: bool = True) -> None:
        """`fast`: advance runs of iterations in one event (`Scheduler.steady_run`; the same
        result as stepping each, which `fast=False` does)."""
        if not services:
            raise ValueError("no services to simulate")
        self.services = services
        types: list[str] = []
        for svc in services:
            for m in svc.models:
                for t in m.device_types:
                    if t not in types:
                        types.append(t)
        self.ledger = Ledger(types, bin_s)
        self.stats = [ServiceStats(s.name, s.is_llm, {"ttft_s": s.slo.ttft_s,
                                                      "tpot_s": s.slo.tpot_s,
                                                      "latency_s": s.slo.latency_s})
                      for s in services]
        self.replicas: list[list[_Replica]] = []
        for si, svc in enumerate(services):
            reps = []
            for ri, m in enumerate(svc.models):
                b = svc.sched.max_batch if svc.sched else svc.max_batch
                reps.append(_Replica(si, ri, m, svc,
                                     [self.ledger.index[t] for t in m.device_types],
                                     [self.ledger.index[t] for t in m.groups],
                                     m.nominal_rate(min(b, 32), svc.mean_context)))
            self.replicas.append(reps)
        self.fast = fast
        self._rr = [0] * len(services)
        self._heap: list[tuple[float, int, int, Any, int]] = []
        self._n = 0
        self.now = 0.0
        self.events = 0
        self._rid = 0
        self._last = 0.0
        self._pending: list[tuple[float, int, int] | None] = [None] * len(services)
        self._fe_free = [0.0] * len(services)  # when each service's front end is next free
        self._admitting = [0] * len(services)  # requests its front end is admitting

    # -- events ---------------------------------------------------------------------------------
    def _push(self, t: float, kind: int, obj: Any, version: int = 0) -> None:
        self._n += 1
        heapq.heappush(self._heap, (t, self._n, kind, obj, version))

    def _power_on(self, r: _Replica, t: float, ready_at: float) -> None:
        r.on_since = t
        if ready_at > t:
            r.state = "starting"
            self._push(ready_at, _READY, r)
        else:
            r.state = "on"

    def _power_off(self, r: _Replica, t: float) -> None:
        if r.on_since >= 0:
            m = r.model
            for ti, n, w in zip(r.types, m.tps, m.idle_w, strict=True):
                self.ledger.powered(ti, r.on_since, t, n, w)
                self.stats[r.service].energy_j += n * w * (t - r.on_since)
        r.on_since = -1.0

    def run(self, until: float | None = None, horizon_s: float | None = None) -> SimResult:
        """Simulate until every request has completed or been dropped (or `until`); the
        fleet stays powered (idle) at least until `horizon_s`."""
        wall = time.perf_counter()
        for si, svc in enumerate(self.services):
            for r in self.replicas[si][:max(0, svc.replicas)]:
                self._power_on(r, 0.0, 0.0)
                r.idle_since = 0.0
                if svc.power_down_idle_s is not None:
                    self._push(svc.power_down_idle_s, _IDLE, r, 0)
            self._next_arrival(si)
            if svc.autoscale is not None:
                self._push(svc.autoscale.interval_s, _TICK, si)
        heap = self._heap
        pop = heapq.heappop
        while heap:
            t, _, kind, obj, version = pop(heap)
            if until is not None and t > until:
                break
            self.now = t
            self.events += 1
            if kind == _LANE:
                if version == obj.version:
                    self._lane_done(obj, t)
            elif kind == _ARRIVAL:
                self._arrive(obj, t, version)
            elif kind == _ADMIT:
                self._admitting[obj.service] -= 1
                self._admit(obj, t)
            elif kind == _TICK:
                self._tick(obj, t)
            elif kind == _READY:
                if obj.state == "starting":
                    obj.state = "on"
                    for lane in obj.lanes:
                        self._kick(lane, t)
            elif kind == _IDLE:
                self._idle_check(obj, t, version)
            elif kind == _DUE and obj.due == t:
                obj.due = -1.0
                self._kick(obj, t)
        end = max(self._last, horizon_s or 0.0)
        if until is not None:
            end = min(end, until) if self._heap else end
        for reps in self.replicas:
            for r in reps:
                if r.on_since >= 0:
                    self._power_off(r, max(end, r.on_since))
        counts: dict[str, int] = {}
        dom: dict[str, bool] = {}
        price: dict[str, float | None] = {}
        estimated = False
        for reps in self.replicas:
            for r in reps:
                for st in r.model.stages:
                    d = st.device
                    counts[d.id] = counts.get(d.id, 0) + st.tp
                    dom[d.id] = d.domestic
                    price[d.id] = d.price_per_hour.value if d.price_per_hour else None
                    estimated |= bool(d.estimated_fields)
        for s in self.stats:
            for q in (s.ttft, s.tpot, s.e2e, s.queue):
                q.flush()
        return SimResult({s.name: st for s, st in zip(self.services, self.stats, strict=True)},
                         self.ledger, counts, dom, price, end, time.perf_counter() - wall,
                         self.events, estimated)

    def _idle_everywhere(self) -> bool:
        for reps in self.replicas:
            for r in reps:
                for lane in r.lanes:
                    if lane.busy or lane.outstanding:
                        return False
        return True

    # -- arrivals and routing -------------------------------------------------------------------
    def _next_arrival(self, si: int) -> None:
        nxt = next(self.services[si].stream, None)
        self._pending[si] = nxt
        if nxt is not None:
            self._push(nxt[0], _ARRIVAL, si)

    def _arrive(self, si: int, t: float, _: int) -> None:
        req = self._pending[si]
        assert req is not None
        self._next_arrival(si)
        svc = self.services[si]
        st = self.stats[si]
        st.requests += 1
        _, prompt, out = req
        seq = CountedSeq(self._rid, si, t, prompt, out)
        self._rid += 1
        fe = svc.front_end
        if fe is not None:  # admitted by the front end, one at a time
            done = max(t, self._fe_free[si]) + fe.admit_s(prompt)
            self._fe_free[si] = done
            self._admitting[si] += 1
            self._push(done, _ADMIT, seq)
            return
        self._admit(seq, t)

    def _admit(self, seq: CountedSeq, t: float) -> None:
        """Route an admitted request to a replica's lane (or count it dropped)."""
        si = seq.service
        svc = self.services[si]
        st = self.stats[si]
        if svc.front_end is not None:  # the CPU its admission took
            self._front_end_cpu(si, svc.front_end.admit_s(seq.prompt0))
        r = self._route(si, seq, t)
        if r is None:
            st.dropped += 1
            return
        lanes = r.lanes
        lane = lanes[0]
        if len(lanes) > 1:
            least = lane.outstanding
            for ln in lanes:
                o = ln.outstanding
                if o < least:
                    lane, least = ln, o
        sch = lane.sched
        if sch is not None and sch.fits(seq.prompt0, seq.out) is not None:
            st.dropped += 1  # longer than the replica's context or KV cache can ever hold
            return
        if r.state == "asleep":
            self._power_on(r, t, t + svc.wake_s)
        if sch is not None:
            was_empty = not sch.waiting
            sch.add(seq)
            if lane.busy:
                if lane.run is not None and was_empty:
                    self._cut_run(lane, t)
            else:
                self._kick(lane, t)
        else:
            assert lane.batcher is not None
            lane.batcher.add(seq)
            if not lane.busy:
                self._kick(lane, t)

    def _route(self, si: int, seq: CountedSeq, t: float) -> _Replica | None:
        svc = self.services[si]
        reps = [r for r in self.replicas[si] if r.state != "off" and not r.draining]
        if not reps:
            starting = [r for r in self.replicas[si] if r.state == "starting"]
            return starting[0] if starting else None
        if svc.router == "round-robin":
            i = self._rr[si] % len(reps)
            self._rr[si] = i + 1
            return reps[i]
        if svc.router == "least-outstanding":  # as the engine routes (`Engine._route`)
            return min(reps, key=lambda r: r.load(t))
        return min(reps, key=lambda r: (r.outstanding + 1) / r.rate)

    # -- lanes ----------------------------------------------------------------------------------
    def _kick(self, lane: _Lane, t: float) -> None:
        """Start the lane's next iteration if it has work and its replica is on."""
        r = lane.replica
        if lane.busy or r.state != "on":
            return
        m = r.model
        sch = lane.sched
        if sch is None:  # dynamic batching of a non-LLM model
            bat = lane.batcher
            assert bat is not None
            batch = bat.take(t)
            if not batch:
                due = bat.due(t)
                if due is not None and lane.due != due:
                    lane.due = due
                    self._push(due, _DUE, lane)
                self._lane_idle(lane, t)
                return
            for s in batch:
                s.started = t
            dt, per = m.forward(len(batch))
            self._account(r, t, t + dt, per)
            lane.cur = batch
            lane.run = None
            self._start(lane, t + dt)
            return
        # a run of steps is priced as KV tokens and prompt pairs growing linearly: not on the
        # engine's CPU workers, whose steps read KV padded in groups that change as contexts grow
        run = sch.steady_run() if self.fast and not m.engine_costs else None
        if run is not None:
            if run.admitted:
                s = sch.running[run.batch]
                if s.started < 0:
                    s.started = t
            rt = lane.run = _RunTimes(t, run, m)
            lane.cur = None
            self._start(lane, t + rt.seconds(run))
            return
        n0 = len(sch.running)
        plan = sch.schedule()
        if plan.preempted:
            self.stats[r.service].preemptions += len(plan.preempted)
        elif len(sch.running) > n0:  # admitted this step (none are when one was preempted)
            for s in sch.running[n0:]:
                if s.started < 0:
                    s.started = t
        if not plan.rows:
            self._lane_idle(lane, t)
            return
        if m.engine_costs:
            groups, padded = plan.decode_padding()
            dt, per = m.mixed(*plan.shape(), padded, groups)
        else:
            dt, per = m.mixed(*plan.shape())
        self._account(r, t, t + dt, per)
        lane.cur = plan
        lane.run = None
        self._start(lane, t + dt)

    def _front_end_cpu(self, si: int, seconds: float) -> None:
        """Service `si`'s front end uses `seconds` of CPU now. When the running steps of its
        replicas on this host's cores leave no core free, they give it up, shared equally: each
        lasts its share longer (none when a core is free, or on devices elsewhere)."""
        lanes = [ln for r in self.replicas[si] if r.host_front_end for ln in r.lanes
                 if ln.busy]
        if not lanes or seconds <= 0:
            return
        busy = sum(ln.replica.model.n_devices / ln.replica.model.pp for ln in lanes)
        share = min(1.0, max(0.0, busy - self.services[si].front_end.cores + 1))
        if share <= 0:
            return
        each = seconds * share / len(lanes)
        for ln in lanes:
            ln.end += each
            ln.version += 1
            self._push(ln.end, _LANE, ln, ln.version)

    def _start(self, lane: _Lane, end: float) -> None:
        lane.busy = True
        lane.end = end
        lane.version += 1
        self._n += 1
        heapq.heappush(self._heap, (end, self._n, _LANE, lane, lane.version))

    def _lane_idle(self, lane: _Lane, t: float) -> None:
        lane.busy = False
        lane.cur = None
        lane.run = None
        r = lane.replica
        if r.outstanding == 0:
            r.idle_since = t
            svc = self.services[r.service]
            if r.draining:
                r.draining = False
                self._power_off(r, t)
                r.state = "off"
            elif svc.power_down_idle_s is not None:
                self._push(t + svc.power_down_idle_s, _IDLE, r, int(t * 1e6))

    def _cut_run(self, lane: _Lane, t: float) -> None:
        """A sequence arrived at `t`: end the lane's run before the first later step that
        could admit it (`Scheduler.cut_run`)."""
        rt = lane.run
        assert rt is not None and lane.sched is not None
        cut = lane.sched.cut_run(rt.run, rt.done_by(t - rt.t0))
        if cut is None:
            return
        rt.run = cut
        self._start(lane, rt.t0 + rt.seconds(cut))

    def _lane_done(self, lane: _Lane, t: float) -> None:
        r = lane.replica
        sch = lane.sched
        streamed = 0  # tokens a single step streamed (to its front end)
        if sch is None:
            self._finish(r, lane.cur, t)
        elif lane.run is not None:
            rt = lane.run
            run, t0, m = rt.run, rt.t0, r.model
            first = tail_at = t0 + rt.a1  # where its first step ends, and its last chunk's
            kv, pairs = run.totals()
            per = m.mixed(run.batch, kv, run.chunk, pairs, steps=run.full)[1]
            if run.tail and rt.tail is not None:
                tail_at = t0 + _run_time(rt.a1, rt.b1, run.full) + rt.tail[0]
                if not run.full:
                    first = tail_at
                per = [(b0 + b1, d0 + d1)
                       for (b0, d0), (b1, d1) in zip(per, rt.tail[1], strict=True)]
                k = run.after
                if k:
                    kv, grow = run.after_kv()
                    kv_sum = k * kv + grow * (k * (k - 1) / 2)
                    per = [(b0 + b1, d0 + d1) for (b0, d0), (b1, d1) in
                           zip(per, m.mixed(run.batch + 1, kv_sum, 0, 0.0, steps=k)[1],
                               strict=True)]
            self._account(r, t0, t, per)
            self._finish(r, sch.advance_run(run, first, tail_at), t)
        else:
            plan: StepPlan = lane.cur
            for seq, _, _, sample in plan.rows:
                if sample:
                    streamed += 1
                    if seq.first_token < 0:
                        seq.first_token = t
            self._finish(r, sch.update(plan), t)
        lane.busy = False
        self._kick(lane, t)
        if streamed and r.host_front_end:  # its tokens are streamed while the next steps run
            fe = self.services[r.service].front_end
            self._front_end_cpu(r.service, fe.delivery_s + fe.token_s * streamed)

    def _account(self, r: _Replica, t0: float, t1: float, per: Any) -> None:
        """Work from t0 to t1: per device type of the replica, busy device-seconds and dynamic
        joules (`ReplicaModel.mixed`, `ReplicaModel.forward`)."""
        self.stats[r.service].energy_j += self.ledger.work_types(r.groups, t0, t1, per)

    def _finish(self, r: _Replica, done: list[CountedSeq], t: float) -> None:
        if not done:
            return
        svc = self.services[r.service]
        st = self.stats[r.service]
        slo = svc.slo
        llm = svc.is_llm
        way = svc.front_end.latency_s if svc.front_end is not None else 0.0
        for s in done:
            e2e = t - s.arrival + way
            if llm:
                ttft = s.first_token - s.arrival + way
                tpot = (t - s.first_token) / (s.out - 1) if s.out > 1 else 0.0
                st.ttft.add(ttft)
                if s.out > 1:
                    st.tpot.add(tpot)
                st.tokens += s.out
                st.prompt_tokens += s.prompt0
            else:
                ttft = tpot = 0.0
                st.tokens += 1
            st.e2e.add(e2e)
            st.queue.add(s.started - s.arrival)
            st.completed += 1
            if slo.met(ttft, tpot, e2e):
                st.met_slo += 1
                st.good_tokens += s.out
        if t > self._last:
            self._last = t

    # -- autoscaling and power ------------------------------------------------------------------
    def _tick(self, si: int, t: float) -> None:
        svc = self.services[si]
        a = svc.autoscale
        assert a is not None
        reps = self.replicas[si]
        active = [r for r in reps if r.state in ("on", "starting", "asleep") and not r.draining]
        load = sum(r.outstanding for r in active) / max(1, len(active))
        if (load > a.up or not active) and len(active) < min(a.max_replicas, len(reps)):
            spare = next((r for r in reps if r.state == "off"), None)
            if spare is not None:
                spare.draining = False
                self._power_on(spare, t, t + a.startup_s)
        elif load < a.down and len(active) > a.min_replicas:
            victim = min((r for r in active if r.state == "on"), key=lambda r: r.outstanding,
                         default=None)
            if victim is not None:
                if victim.outstanding == 0 and not any(ln.busy for ln in victim.lanes):
                    self._power_off(victim, t)
                    victim.state = "off"
                else:
                    victim.draining = True
        if (any(p is not None for p in self._pending) or any(self._admitting)
                or not self._idle_everywhere()):
            self._push(t + a.interval_s, _TICK, si)

    def _idle_check(self, r: _Replica, t: float, _: int) -> None:
        svc = self.services[r.service]
        if (r.state == "on" and r.outstanding == 0 and not any(ln.busy for ln in r.lanes)
                and svc.power_down_idle_s is not None
                and t - r.idle_since >= svc.power_down_idle_s - 1e-9):
            self._power_off(r, t)
            r.state = "asleep"


def _run_time(alpha: float, beta: float, k: int) -> float:
    """Seconds of k steps that take alpha + beta j seconds each (j from 0)."""
    return k * alpha + beta * (k * (k - 1) / 2)


def _steps_by(alpha: float, beta: float, most: int, dt: float) -> int:
    """Steps (of at most `most`) of alpha + beta j seconds wholly done within `dt`."""
    if dt <= 0:
        return 0
    qa = beta / 2
    qb = alpha - qa
    if qa <= 0:
        k = int(dt / qb) if qb > 0 else 0
    else:
        k = int((-qb + math.sqrt(qb * qb + 4 * qa * dt)) / (2 * qa))
    k = min(k, most)
    while k > 0 and _run_time(alpha, beta, k) > dt:
        k -= 1
    while k < most and _run_time(alpha, beta, k + 1) <= dt:
        k += 1
    return k
