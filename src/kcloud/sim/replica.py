"""One replica's step costs, from its plan's stages (`kcloud.hardware.steps`).

A replica is a pipeline of stages; every step of the engine runs through all of them. Its
iteration takes the stages' times plus the hops of its activations between them. A pipeline of
p stages keeps p iterations in flight (p *lanes*, each an engine of its own over 1/p of the
KV-cache blocks), as a pipeline-parallel vLLM replica runs p micro-batches; a lane's iteration
time is the whole pipeline's latency.

A replica on this host's CPU cores (`host-cpu` devices) runs the engine's workers: each of its
steps also costs what the engine's own work around the kernels costs here (scheduling, the
command and result between processes, each row's layout and sample, the paged KV cache's
gathers), as `kcloud.runtime.step_costs` measured it (`kcloud.hardware.host.EngineStepCosts`),
charged as busy time at no extra dynamic energy; its decode rows' KV reads are priced as the
workers attend them, in groups of similar contexts padded to each group's longest
(`kcloud.planner.scheduling.decode_groups`).

Energy is split in two: the idle power of every device while its replica is powered on (the
fleet's ledger counts it over time), and the dynamic energy of each step (busy power minus idle
power, times the stage's time, per device), which this module gives per device type of the
replica (`groups`: the busy device-seconds and dynamic joules of its stages on that type).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kcloud.hardware.cost import Precisions
from kcloud.hardware.host import HOST_ID, EngineStepCosts, engine_step_costs
from kcloud.hardware.steps import StageTables, StepTables, offload_of, stage_tables_for


@dataclass
class ReplicaModel:
    """Step costs of one replica (shared by every replica of the same plan replica)."""

    stages: list[StageTables]
    hops: list[tuple[float, float, float]]  # per cut: (latency s, bytes per token, bandwidth)
    is_llm: bool
    device_types: list[str] = field(default_factory=list)  # per stage
    _dec: dict[int, tuple[float, float, tuple[tuple[float, float, float, float], ...]]] = (
        field(default_factory=dict))
    _fwd: dict[int, tuple[float, tuple[tuple[float, float], ...]]] = field(default_factory=dict)
    _mix: dict[tuple[int, int], Any] = field(default_factory=dict)
    # per stage: the engine's step costs on its devices, and the KV bytes a token keeps there
    engine: list[tuple[EngineStepCosts, float] | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.engine:
            self.engine = [None] * len(self.stages)
        self.device_types = [s.device.id for s in self.stages]
        self.tps = [s.tp for s in self.stages]
        self.idle_w = [s.idle_w for s in self.stages]  # per device
        self.groups: list[str] = list(dict.fromkeys(self.device_types))  # its device types
        # whether a stage runs the engine's CPU workers here (their step costs apply)
        self.engine_costs = any(e is not None for e in self.engine)
        self._group = [self.groups.index(t) for t in self.device_types]  # per stage

    @property
    def pp(self) -> int:
        return len(self.stages)

    @property
    def n_devices(self) -> int:
        return sum(self.tps)

    @property
    def idle_power_w(self) -> float:
        return sum(t * w for t, w in zip(self.tps, self.idle_w, strict=True))

    def hop_s(self, tokens: int) -> float:
        return sum(lat + tokens * per / bw for lat, per, bw in self.hops)

    # -- LLM ----------------------------------------------------------------------------------
    def decode(self, batch: int) -> tuple[float, float,
                                          tuple[tuple[float, float, float, float], ...]]:
        """A decode step of `batch` sequences: time = a + s x KV tokens, and per stage
        (a, s, dynamic energy a, dynamic energy s) per device."""
        hit = self._dec.get(batch)
        if hit is None:
            per = []
            for st, idle, eng in zip(self.stages, self.idle_w, self.engine, strict=True):
                lin = st.decode_linear(batch)
                xa = xs = 0.0
                if eng is not None:  # one attention group, no padding: a steady batch
                    xa = eng[0].extra_s(batch, 0.0, 0, 0.0, eng[1], groups=1)
                    xs = eng[0].extra_s(batch, 1.0, 0, 0.0, eng[1], groups=1) - xa
                per.append((lin.a + xa, lin.b + xs, lin.ea - idle * lin.a,
                            lin.eb - idle * lin.b))
            a = sum(p[0] for p in per) + self.hop_s(batch)
            s = sum(p[1] for p in per)
            hit = self._dec[batch] = (a, s, tuple(per))
        return hit

    def mixed(self, batch: int, kv_tokens: float, prefill_tokens: int, pairs: float,
              padded: float | None = None, groups: int = 0, *,
              steps: int = 1) -> tuple[float, list[tuple[float, float]]]:
        """An iteration with decode steps and prompt chunks: its time, and per device type
        (`groups`) its busy device-seconds and dynamic joules. A step is linear in its KV
        tokens and prompt pairs at a given (batch, prompt tokens) (`StageTables.step`): those
        coefficients are cached. With `steps`: that many iterations of the batch and prompt
        tokens whose KV tokens and pairs sum to `kv_tokens` and `pairs` (a run's steps of one
        shape, `kcloud.planner.scheduling.Run.totals`). On the engine's CPU workers
        (`engine_costs`) a step also costs what their measured step costs say of it
        (`EngineStepCosts.extra_s`: not linear, for KV past the cache, so never a run's
        steps), its decode rows' KV tokens `padded` (`kv_tokens` when not given) in attention
        `groups` (`StepPlan.decode_padding`)."""
        co = self._mix.get((batch, prefill_tokens)) or self._coefficients(batch, prefill_tokens)
        a, s, p = co[2]
        time = steps * a + s * kv_tokens + p * pairs
        out = [(steps * t0 + s * kv_tokens + p * pairs, steps * d0 + ds * kv_tokens + dp * pairs)
               for t0, s, p, d0, ds, dp in co[1]]
        if self.engine_costs:
            rows = batch + (1 if prefill_tokens else 0)  # a step's prompt work: mostly one chunk
            pk = kv_tokens if padded is None else padded
            for g, tp, eng in zip(self._group, self.tps, self.engine, strict=True):
                if eng is not None:
                    x = eng[0].extra_s(rows, pk, prefill_tokens, pairs, eng[1], groups)
                    time += x
                    out[g] = (out[g][0] + tp * x, out[g][1])
        return time, out

    def linear(self, batch: int, prefill_tokens: int) -> tuple[float, float, float]:
        """An iteration's time as a + s x KV tokens + p x prompt pairs at (batch, prompt
        tokens): (a, s, p)."""
        co = self._mix.get((batch, prefill_tokens)) or self._coefficients(batch, prefill_tokens)
        return co[2]

    def _coefficients(self, batch: int, prefill_tokens: int) -> tuple[
            float, tuple[tuple[float, float, float, float, float, float], ...],
            tuple[float, float, float]]:
        """(hop seconds, per device type the busy device-seconds and dynamic joules as
        (t0, per KV token, per prompt pair, d0, per KV token, per pair), the step's time as
        (a, per KV token, per pair))."""
        key = (batch, prefill_tokens)
        co = self._mix.get(key)
        if co is None:
            hop, per = self._mixed_coefficients(batch, prefill_tokens)
            groups = [[0.0] * 6 for _ in self.groups]
            for g, tp, c in zip(self._group, self.tps, per, strict=True):
                groups[g] = [x + tp * y for x, y in zip(groups[g], c, strict=True)]
            co = self._mix[key] = (hop, tuple(tuple(g) for g in groups),
                                   (sum(c[0] for c in per) + hop, sum(c[1] for c in per),
                                    sum(c[2] for c in per)))
        return co

    def _mixed_coefficients(self, batch: int, prefill_tokens: int) -> tuple[
            float, tuple[tuple[float, float, float, float, float, float], ...]]:
        per = []
        for st, idle in zip(self.stages, self.idle_w, strict=True):
            base = st.step(batch, 0.0, prefill_tokens, 0.0)
            kv = st.step(batch, 1.0, prefill_tokens, 0.0) if batch else base
            pr = st.step(batch, 0.0, prefill_tokens, 1.0) if prefill_tokens else base
            t0, e0 = base.time_s, base.energy_j
            s, es = kv.time_s - t0, kv.energy_j - e0
            p, ep = pr.time_s - t0, pr.energy_j - e0
            per.append((t0, s, p, e0 - idle * t0, es - idle * s, ep - idle * p))
        hop = self.hop_s(batch + prefill_tokens) if self.hops else 0.0
        return hop, tuple(per)

    # -- non-LLM ------------------------------------------------------------------------------
    def forward(self, batch: int) -> tuple[float, tuple[tuple[float, float], ...]]:
        """A forward pass of `batch` samples: its time, and per device type (`groups`) its busy
        device-seconds and dynamic joules."""
        hit = self._fwd.get(batch)
        if hit is None:
            t = self.hop_s(batch)
            groups = [(0.0, 0.0)] * len(self.groups)
            for g, st, tp, idle in zip(self._group, self.stages, self.tps, self.idle_w,
                                       strict=True):
                c = st.forward(batch)
                t += c.time_s
                b, d = groups[g]
                groups[g] = (b + tp * c.time_s, d + tp * (c.energy_j - idle * c.time_s))
            hit = self._fwd[batch] = (t, tuple(groups))
        return hit

    # -- capacity -----------------------------------------------------------------------------
    def kv_token_capacity(self, workspace_tokens: int) -> int:
        """KV tokens the replica holds: the tightest of its stages."""
        return min(s.kv_token_capacity(workspace_tokens) for s in self.stages)

    def nominal_rate(self, batch: int, context: int) -> float:
        """Requests' work per second it sustains at `batch` (tokens/s for an LLM at a mean
        `context`, samples/s otherwise): what a speed-aware router weighs replicas by."""
        if self.is_llm:
            a, s, _ = self.decode(batch)
            return batch / (a + s * batch * context) * self.pp
        t, _ = self.forward(batch)
        return batch / t * self.pp


def replica_models(plan: Any, cluster: Any, forward: Any, decode: Any,
                   calibration: Any = None) -> list[ReplicaModel]:
    """A ReplicaModel per replica of `plan` (a `kcloud.planner.Plan`) on `cluster`; replicas
    alike (the same stages on the same device types and links) share one, and so its cached
    step costs."""
    cache: dict[tuple[Any, ...], StepTables] = {}
    graph = decode if decode is not None else forward
    costs = engine_step_costs() if decode is not None and any(
        s.device_type.startswith(HOST_ID) for r in plan.replicas for s in r.stages) else None
    out = []
    alike: dict[tuple[Any, ...], ReplicaModel] = {}
    for r in plan.replicas:
        links = [cluster.link_between(a.devices[0], b.devices[0])
                 for a, b in zip(r.stages, r.stages[1:], strict=False)]
        offloads = [offload_of(s, cluster) for s in r.stages]
        key = (tuple((s.device_type, s.precision, s.start, s.end, len(s.devices),
                      None if o is None else (o[0].id, o[1], o[2]))
                     for s, o in zip(r.stages, offloads, strict=True)),
               tuple((ln.latency, ln.bandwidth) for ln in links))
        if key in alike:
            out.append(alike[key])
            continue
        stages = []
        for s, off in zip(r.stages, offloads, strict=True):
            dev = cluster.device_types[s.device_type]
            link = cluster.intra_link(s.device_type)
            stages.append(stage_tables_for(s, forward, decode, dev,
                                           (link.bandwidth, link.collective_s), calibration,
                                           cache, offload=off))
        hops = []
        for a, link in zip(r.stages, links, strict=False):
            cut = graph.layers[a.end - 1].cut_elems / graph.batch / (graph.seq_len or 1)
            act = Precisions.of(stages[0].tables.precision).act_bytes
            hops.append((link.latency, cut * act, link.bandwidth))
        engine = [(costs, st.tables.kv_bytes_per_token(st.start, st.end))
                  if costs is not None and st.device.id.startswith(HOST_ID) else None
                  for st in stages]
        out.append(alike.setdefault(key, ReplicaModel(stages, hops, decode is not None,
                                                      engine=engine)))
    return out
