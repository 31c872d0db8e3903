"""The plan space of one replica, as cost matrices over layer ranges.

An *option* is a way to run a stage: `tp` devices of one type inside one node, at that type's
precision. For a micro-batch of `b` items, `StageSpace` holds, per option and per layer range
[i, j), the modeled stage time, the busy energy, the tensor-parallel collective time and the
memory per device (all from `kcloud.hardware.cost`, the same model `kcloud predict` uses), and
per cut the time to move the cut activation over the node link or the network. An LLM pipeline
of more than one stage also sends each chosen token from its last stage back to its first, once
per decode step (`feedback`).

An LLM stage on NPUs or GPUs may offload its decode attention to PIM devices beside them: an
option then also names a PIM type and a count (`Option.pim`, `Option.pim_count`), priced by
`kcloud.hardware.steps.OffloadGroup` (the same composition `plan_cost` uses). Every node that
holds the stage's type holds that PIM type too, and an option of tp devices takes at most
tp x (the PIM devices per NPU/GPU device of those nodes): any node that holds the stage's
devices holds its PIM group, so the DP's node accounting stays that of the stage's devices.

`stage_matrices` is `LayerTable.stage` written over every range at once with prefix sums; the
tests hold the two equal.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property, reduce
from typing import TYPE_CHECKING

import numpy as np

from kcloud.hardware.cluster import Cluster, Link
from kcloud.hardware.cost import (
    Calibration,
    LayerTable,
    Precisions,
    default_calibration,
    refill_time_s,
    tp_max_degree,
    usable_memory,
)
from kcloud.hardware.device import Device, DeviceKind
from kcloud.hardware.steps import (
    Offload,
    OffloadGroup,
    StepTables,
    dense_only,
    generation_cost,
    offload_tables,
)
from kcloud.planner.goal import Goal
from kcloud.planner.model import ModelGraphs
from kcloud.precision import Precision
from kcloud.predict import PREFILL_CHUNK_TOKENS, default_precision

if TYPE_CHECKING:
    from kcloud.planner.dp import Path
    from kcloud.planner.evaluate import Template

TP_DEGREES = (1, 2, 4, 8)
INTRA, NET = 0, 1  # link kinds between consecutive stages
TOKEN_BYTES = 8  # a generated token id (int64) on its way back to the first stage


@dataclass(frozen=True)
class DeviceType:
    """One device type of the cluster as the planner uses it."""

    index: int
    device: Device
    precision: Precision
    count: int  # devices of this type in the cluster
    node_cap: int  # devices of this type every node that has it holds a multiple of
    tps: tuple[int, ...]  # tensor-parallel degrees a stage of this type may use
    link: Link  # inside a node (collectives, and stages placed on one node)
    nodes: tuple[str, ...]  # the nodes that hold this type
    # PIM types every node of this type holds, with the fewest PIM devices per device of
    # this type on those nodes (an NPU/GPU type may offload decode attention to them)
    pim_ratio: tuple[tuple[int, float], ...] = ()

    @property
    def id(self) -> str:
        return self.device.id

    @property
    def price_per_hour(self) -> float | None:
        return self.device.price_per_hour.value if self.device.price_per_hour else None

    @property
    def domestic(self) -> bool:
        return self.device.domestic


@dataclass(frozen=True)
class Option:
    index: int
    type: int  # index into the device types
    tp: int
    pim: int = -1  # the PIM type its decode attention runs on (-1: none)
    pim_count: int = 0

    @property
    def offload(self) -> bool:
        return self.pim >= 0


OFFLOAD_COUNTS = 3  # PIM group sizes per option: the largest a node allows, its half, quarter


def offload_counts(ratio: float, tp: int) -> tuple[int, ...]:
    """PIM group sizes for a stage of `tp` devices with `ratio` PIM devices per device."""
    top = math.floor(ratio * tp + 1e-9)
    if top < 1:
        return ()
    c = 1 << (top.bit_length() - 1)
    return tuple(x for x in (c, c // 2, c // 4) if x >= 1)[:OFFLOAD_COUNTS]


def build_types(cluster: Cluster, model: ModelGraphs, goal: Goal, *,
                require_price: bool = False,
                allow: frozenset[str] | None = None) -> tuple[list[DeviceType], list[str]]:
    """The cluster's device types that can run `model` at `goal`'s precision, with notes."""
    notes: list[str] = []
    types: list[DeviceType] = []
    most = tp_max_degree(model.forward)
    for dev_id, dev in sorted(cluster.device_types.items()):
        if allow is not None and dev_id not in allow:
            continue
        if goal.precision is not None:
            used = dev.resolve_precision(goal.precision)
            if used is None:
                notes.append(f"{dev_id} left out: cannot run {goal.precision.value}")
                continue
            if used != goal.precision:
                notes.append(f"{dev_id} has no {goal.precision.value}: runs at {used.value}")
        else:
            used = default_precision(dev, model.is_llm)
        if require_price and dev.price_per_hour is None:
            notes.append(f"{dev_id} left out of the cost objective: the catalog gives no price")
            continue
        per_node = [c for n in cluster.nodes for d, c in n.devices if d == dev_id]
        node_cap = reduce(math.gcd, per_node)
        tps = tuple(t for t in TP_DEGREES
                    if t <= node_cap and node_cap % t == 0 and (t == 1 or most % t == 0))
        holders = [n for n in cluster.nodes if any(d == dev_id for d, _ in n.devices)]
        slow = min((n.link for n in holders), key=lambda link: (link.bandwidth, -link.latency))
        link = Link(slow.bandwidth, max(n.link.latency for n in holders), slow.name,
                    max(n.link.collective_s for n in holders))
        types.append(DeviceType(len(types), dev, used, cluster.counts[dev_id], node_cap, tps,
                                link, tuple(n.name for n in holders)))
    if model.is_llm:
        types = [_with_pim(t, types, cluster) for t in types]
    return types, notes


def _with_pim(t: DeviceType, types: list[DeviceType], cluster: Cluster) -> DeviceType:
    """`t` with the PIM types it may offload decode attention to (see `DeviceType`)."""
    if t.device.kind not in (DeviceKind.NPU, DeviceKind.GPU):
        return t
    out = []
    for p in types:
        if p.device.kind is not DeviceKind.PIM:
            continue
        ratios = []
        for n in cluster.nodes:
            have = dict(n.devices)
            if t.id in have:
                ratios.append(have.get(p.id, 0) / have[t.id])
        if ratios and min(ratios) > 0:
            out.append((p.index, min(ratios)))
    return replace(t, pim_ratio=tuple(out))


# ---------------------------------------------------------------------------------------------


def _ranges(x: np.ndarray) -> np.ndarray:
    """R[i, j] = sum of x[i:j] (upper triangle; the rest is meaningless)."""
    p = np.concatenate([[0.0], np.cumsum(x)])
    return p[None, :] - p[:, None]


def _range_max(x: np.ndarray) -> np.ndarray:
    """M[i, j] = max of x[i:j] for j > i (0 elsewhere)."""
    n = len(x)
    a = np.full((n + 1, n + 1), -np.inf)
    cols = np.arange(1, n + 1)
    a[:, 1:] = np.where(np.arange(n + 1)[:, None] < cols[None, :], x[None, :], -np.inf)
    out = np.maximum.accumulate(a, axis=1)
    return np.where(np.isfinite(out), out, 0.0)


def shared_cache_times(space: StageSpace, stages: list[tuple[int, int, int]],
                       links: tuple[int, ...], times: list[float]) -> list[float]:
    """Stage times with a shared last-level cache. Consecutive stages on one node whose
    devices are partitions sharing a cache (CPU cores of one host) stream their weights
    through the same cache: between two passes of one stage every other stage of the group
    makes a pass too. What one core keeps resident was measured with every core streaming
    (the host calibration), so the group keeps one core's share resident, spread over all its
    weights alike: splitting a model over the cores of one CPU does not multiply its cache (a
    stage alone keeps its own share, as in `LayerTable.stage`)."""
    out = list(times)
    group = [0]
    for k in range(1, len(stages) + 1):
        o_prev = stages[k - 1][0]
        same = (k < len(stages) and links[k - 1] == INTRA and space.cache[o_prev] > 0
                and space.opt_type[stages[k][0]] == space.opt_type[o_prev])
        if same:
            group.append(k)
            continue
        if len(group) > 1:
            pool = max(float(space.cache[stages[g][0]]) for g in group)
            total = sum(float(space.weights[o, i, j]) * int(space.opt_tp[o])
                        for o, i, j in (stages[g] for g in group))
            spill = 0.0 if total <= pool else 1.0 - pool / total
            for g in group:
                o, i, j = stages[g]
                out[g] = float(space.resident[o, i, j] + spill * space.streamed[o, i, j])
        group = [k]
    return out


@dataclass(frozen=True)
class StageMatrices:
    """`LayerTable.stage(i, j)` for every range: [i, j] entries, j > i."""

    time: np.ndarray
    comm: np.ndarray
    power: np.ndarray  # busy power per device, W
    weight_bytes: np.ndarray  # per device
    resident: np.ndarray  # the time with every weight resident on chip
    streamed: np.ndarray  # what streaming every weight adds: time = resident + spill * this
    sram_half: float  # on-chip memory one device keeps weights in (`LayerTable.sram_half`)


def stage_matrices(t: LayerTable) -> StageMatrices:
    w = _ranges(t.weight_bytes)
    with np.errstate(divide="ignore", invalid="ignore"):
        spill = np.where(w <= t.sram_half, 0.0, 1.0 - t.sram_half / np.where(w > 0, w, 1.0))

    def mix(res: np.ndarray, st: np.ndarray) -> np.ndarray:
        r = _ranges(res)
        return r + spill * (_ranges(st) - r)

    ops = mix(t.time_res, t.time_str)
    streamed = _ranges(t.time_str) - _ranges(t.time_res)
    mem = mix(t.mem_res, t.mem_str)
    overhead = _ranges(t.kernel_s) + t.params.inference_overhead_s
    comm = _ranges(t.comm_s)
    total = ops + overhead + comm
    safe = np.where(total > 0, total, 1.0)
    u_c = np.where(total > 0, _ranges(t.busy_res) / safe, 0.0)
    u_m = np.where(total > 0, mem / safe, 0.0)
    k = t.params.memory_power_share
    activity = 1.0 - (1.0 - np.minimum(u_c, 1.0)) * (1.0 - k * np.minimum(u_m, 1.0))
    activity = np.clip(activity, 0.0, 1.0)
    idle = t.device.idle_power_w.value
    power = idle + (t.device.max_power_w.value - idle) * activity
    return StageMatrices(total, comm, power, w, total - spill * streamed, streamed,
                         t.sram_half)


@dataclass(frozen=True)
class OptionCosts:
    """One option's costs over every range [i, j) at one micro-batch (see `StageSpace`)."""

    time: np.ndarray
    energy: np.ndarray  # busy energy per device
    comm: np.ndarray
    resident: np.ndarray
    streamed: np.ndarray
    weight_bytes: np.ndarray  # per device
    # activation bytes per device; for an LLM the prefill workspace alone, before / tp, and
    # `kv` the KV-cache bytes per token of context over the range
    act: np.ndarray
    kv: np.ndarray | None
    shared_cache: bool
    sram_half: float
    # what a request's first pass refills of the stage's weights after an idle pause
    # (`refill_time_s`); None on devices without a measured resume
    refill: np.ndarray | None = None


@dataclass
class StageSpace:
    """Costs of every stage option over every layer range, for micro-batch `b`."""

    model: ModelGraphs
    types: list[DeviceType]
    network: Link
    b: int
    calibration: Calibration = field(default_factory=default_calibration)
    # LLM: micro-batches in flight through a pipeline, whose KV caches every stage holds (a
    # pipeline of S stages keeps S in flight to stay busy; the search sets it to the most
    # stages its plan's pipelines have).
    in_flight: int = 2
    # (b, type, tp) -> the option's costs: what spaces of one search that differ only in
    # `in_flight` share (their costs are the same; only the memory that fits differs); the
    # space's own when none is given
    costs: dict[tuple[int, int, int], OptionCosts] | None = None
    offload: str = "auto"  # attention offload to PIM: auto | on | off (`Goal`)
    # (path, batch) -> its Template: the search meets the same chain many times (a sweep of
    # weights or caps often returns one chain); `kcloud.planner.search.Context.evaluate`
    evaluated: dict[tuple[Path, int], Template] = field(default_factory=dict, init=False,
                                                        repr=False, compare=False)
    # a chain's stages -> devices of each type it takes (`Path.usage`): read on every limit check
    usages: dict[tuple[tuple[int, int, int], ...], Mapping[int, int]] = field(
        default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.costs is None:  # not shared with other spaces: its own
            self.costs = {}
        self.options: list[Option] = []
        for t in self.types:
            for tp in t.tps:
                pairs = [(p, c) for p, r in t.pim_ratio for c in offload_counts(r, tp)] \
                    if self.model.is_llm and self.offload != "off" else []
                if not pairs or self.offload == "auto":
                    self.options.append(Option(len(self.options), t.index, tp))
                for p, c in pairs:
                    self.options.append(Option(len(self.options), t.index, tp, p, c))
        self.L = self.model.n_layers
        n, o = self.L + 1, len(self.options)
        self.time = np.full((o, n, n), np.inf)  # inf: not a stage (empty range or no fit)
        self.busy_j = np.zeros((o, n, n))  # busy energy per device per micro-batch, J
        self.comm = np.zeros((o, n, n))  # tensor-parallel collective time per micro-batch
        self.mem = np.zeros((o, n, n))  # bytes per device
        # Options on partitions of a device with a shared last-level cache (`shared_cache`):
        # time = resident + spill * streamed, weights per device, and the cache the option's
        # devices keep weights in (0 for other options); see `shared_cache_times`.
        self.resident = np.zeros((o, n, n))
        self.streamed = np.zeros((o, n, n))
        self.weights = np.zeros((o, n, n))
        # seconds a stage's first pass of a request refills of its weights after an idle
        # pause (`refill_time_s`; zero on devices without a measured resume)
        self.refill = np.zeros((o, n, n))
        self.cache = np.zeros(o)
        self.trans = np.full((len(self.types), 2, n), np.inf)  # [type, INTRA|NET, cut]
        upper = np.triu(np.ones((n, n), dtype=bool), 1)
        # offload options: bytes per PIM device of the KV cache, and whether decode steps
        # run pipelined by layer (`OffloadGroup`)
        self.pim_mem: dict[int, np.ndarray] = {}
        self.pipelined: dict[int, np.ndarray] = {}
        for opt in self.options:
            if opt.offload:
                self._fill_offload(opt, upper)
            else:
                self._fill(opt, upper)
        self.feedback = np.zeros((len(self.types), 2))  # [last stage's type, INTRA|NET]
        # [first stage's type]: the fixed part of what a request's first pass loses on a
        # device that sat idle (each later stage's is part of the hop that wakes it)
        self.arrival = np.array([self.calibration.params(t.device).resume_s
                                 for t in self.types])
        for t in self.types:
            for kind, link in ((INTRA, t.link), (NET, self.network)):
                self.trans[t.index, kind] = self._transfer(t, link)
                self.feedback[t.index, kind] = self.model.decode_steps * link.transfer_s(
                    self.b * TOKEN_BYTES)

    # -- per option ----------------------------------------------------------------------
    def _fill(self, opt: Option, upper: np.ndarray) -> None:
        t = self.types[opt.type]
        dev, b, tp = t.device, self.b, opt.tp
        key = (b, opt.type, tp)
        c = self.costs.get(key)
        if c is None:
            c = self.costs[key] = self._option_costs(opt)
        m = self.model
        if m.decode is None:
            act = c.act
        else:
            act = (float(max(self.in_flight, 1)) * b * m.context_tokens * c.kv
                   + c.act) / tp
        mem = c.weight_bytes + act
        fits = upper & (mem <= usable_memory(dev))
        self.time[opt.index] = np.where(fits, c.time, np.inf)
        self.busy_j[opt.index] = np.where(fits, c.energy, 0.0)
        if c.refill is not None:
            self.refill[opt.index] = np.where(upper, c.refill, 0.0)
        self.comm[opt.index] = np.where(upper, c.comm, 0.0)
        self.mem[opt.index] = np.where(upper, mem, 0.0)
        if c.shared_cache:
            self.resident[opt.index] = np.where(fits, c.resident, np.inf)
            self.streamed[opt.index] = np.where(fits, c.streamed, 0.0)
            self.weights[opt.index] = np.where(upper, c.weight_bytes, 0.0)
            self.cache[opt.index] = tp * c.sram_half

    def _option_costs(self, opt: Option) -> OptionCosts:
        """What an option costs over every range, whatever the micro-batches in flight."""
        t = self.types[opt.type]
        dev, prec, b, tp = t.device, t.precision, self.b, opt.tp
        params = self.calibration.params(dev)
        link = (t.link.bandwidth, t.link.collective_s)
        m = self.model
        tables = StepTables(m.forward, m.decode, dev, prec, params, tp, link)
        pre = stage_matrices(tables.forward_table(b))
        p = Precisions.of(prec)
        kv = None
        if m.decode is None:
            time, energy, comm = pre.time, pre.power * pre.time, pre.comm
            resident, streamed = pre.resident, pre.streamed
            act = 2.0 * b * _range_max(m.peak_act_elems) * p.act_bytes / tp
        else:
            dec = stage_matrices(tables.decode_table(b))
            g = generation_cost(pre.time, pre.power * pre.time, dec.time, dec.power * dec.time,
                                m.output_tokens)
            n_out = g.decode_steps
            time, energy = g.time_s, g.energy_j
            comm = pre.comm + n_out * dec.comm
            resident = pre.resident + n_out * dec.resident
            streamed = pre.streamed + n_out * dec.streamed
            kv = _ranges(m.kv_elems_per_token) * p.kv_bytes
            work_tok = _range_max(m.peak_act_elems) / m.prompt_tokens * p.act_bytes
            act = min(b * m.prompt_tokens, PREFILL_CHUNK_TOKENS) * work_tok
        if tp > 1:  # what the group's lead receives, it broadcasts to the group's other ranks
            share = self._group_share(t, tp)
            time, comm, resident = time + share, comm + share, resident + share
        refill = (refill_time_s(params, dev, pre.weight_bytes) if params.resume_s_per_byte
                  else None)
        return OptionCosts(time, energy, comm, resident, streamed, pre.weight_bytes, act, kv,
                           params.shared_cache, pre.sram_half, refill)

    def _fill_offload(self, opt: Option, upper: np.ndarray) -> None:
        """An LLM stage whose decode attention runs on `opt.pim_count` PIM devices: the
        matrices of `StageTables` with an `Offload` (the tests hold the two equal)."""
        t, pt = self.types[opt.type], self.types[opt.pim]
        dev, prec, b, tp, c = t.device, t.precision, self.b, opt.tp, opt.pim_count
        m = self.model
        assert m.decode is not None
        params = self.calibration.params(dev)
        tables = StepTables(m.forward, dense_only(m.decode), dev, prec, params, tp,
                            (t.link.bandwidth, t.link.collective_s))
        pim = offload_tables(m.decode, pt.device, c, prec, self.calibration)
        half = (b + 1) // 2
        pre = stage_matrices(tables.forward_table(b))
        dense, dense_h = (stage_matrices(tables.token_table(x)) for x in (b, half))
        att, att_h = (stage_matrices(pim.decode_table(x)) for x in (b, half))
        L = self.L
        n_layers = np.where(upper, _ranges(np.ones(L)), 1.0)
        bw, lat = t.link.bandwidth, t.link.latency
        off = Offload(pim, (bw, lat))
        row = _ranges(off.layer_row_elems()) * Precisions.of(prec).act_bytes
        kv_tok = _ranges(np.array([pim.kv_bytes_per_token(i, i + 1) for i in range(L)]))
        group = OffloadGroup(tp, c, n_layers, dev.idle_power_w.value,
                             pt.device.idle_power_w.value)
        dec_t, dec_j, piped = group.decode(
            b, dense.time, dense.power * dense.time, dense_h.time, dense_h.power * dense_h.time,
            att.time, att.power * att.time, att_h.time, att_h.power * att_h.time,
            off.transfer_s(b, n_layers, row), off.transfer_s(half, n_layers, row))
        move = off.move_s(b * m.prompt_tokens, kv_tok * c, n_layers)
        pre_t, pre_j = group.prefill(pre.time, pre.power * pre.time, move)
        g = generation_cost(pre_t, pre_j, dec_t, dec_j, m.output_tokens)
        time, energy = g.time_s, g.energy_j
        comm = pre.comm + g.decode_steps * dense.comm
        work_tok = _range_max(m.peak_act_elems) / m.prompt_tokens \
            * Precisions.of(prec).act_bytes
        mem = pre.weight_bytes + min(b * m.prompt_tokens, PREFILL_CHUNK_TOKENS) * work_tok / tp
        kv = float(max(self.in_flight, 1)) * b * m.context_tokens * kv_tok
        if tp > 1:
            share = self._group_share(t, tp)
            time, comm = time + share, comm + share
        fits = (upper & (mem <= usable_memory(dev))
                & (kv_tok > 0)  # a stage with no attention has none to offload
                & (kv <= usable_memory(pt.device)))
        self.time[opt.index] = np.where(fits, time, np.inf)
        self.busy_j[opt.index] = np.where(fits, energy, 0.0)
        self.comm[opt.index] = np.where(upper, comm, 0.0)
        self.mem[opt.index] = np.where(upper, mem, 0.0)
        self.pim_mem[opt.index] = np.where(upper, kv, 0.0)
        self.pipelined[opt.index] = np.where(upper, piped, False)

    def _group_share(self, t: DeviceType, tp: int) -> np.ndarray:
        """[i, j]: a tensor-parallel stage [i, j) broadcasts every hop it receives over its
        group (a tree of log2(tp) steps, each a collective call): the cut after layer i-1 for
        i > 0, the fed-back token of each decode step for the first stage of a pipeline."""
        n, m, link = self.L + 1, self.model, t.link
        share = np.zeros((n, n))
        hop = self._transfer(t, Link(link.bandwidth, link.collective_s))
        share[1:self.L] = hop[1:self.L, None]
        if m.decode is not None:
            share[0, :self.L] = m.decode_steps * (link.collective_s
                                                   + self.b * TOKEN_BYTES / link.bandwidth)
        return share * math.log2(tp)

    def _transfer(self, t: DeviceType, link: Link) -> np.ndarray:
        """Time to send the cut after layer i-1 (index i) from a stage of type `t`."""
        m, b = self.model, self.b
        act = Precisions.of(t.precision).act_bytes
        out = np.full(self.L + 1, np.inf)
        cut, dcut = m.cut_elems
        sent = link.latency + cut * b / m.forward.batch * act / link.bandwidth
        if m.decode is not None:
            assert dcut is not None
            sent = sent + m.decode_steps * (link.latency + dcut * b / m.decode.batch * act
                                             / link.bandwidth)
        out[1:self.L] = sent
        return out

    # -- derived ---------------------------------------------------------------------------
    @property
    def items(self) -> int:
        """Items one micro-batch yields (samples, or generated tokens for an LLM)."""
        return self.b * self.model.items_per_sequence

    @cached_property
    def opt_type(self) -> np.ndarray:
        return np.array([o.type for o in self.options], dtype=np.int64)

    @cached_property
    def opt_tp(self) -> np.ndarray:
        return np.array([o.tp for o in self.options], dtype=np.int64)

    @cached_property
    def opt_use(self) -> np.ndarray:
        """[option, type]: devices of each type an option takes (its PIM group included)."""
        out = np.zeros((len(self.options), len(self.types)), dtype=np.int64)
        for o in self.options:
            out[o.index, o.type] += o.tp
            if o.offload:
                out[o.index, o.pim] += o.pim_count
        return out

    @cached_property
    def opt_idle_w(self) -> np.ndarray:
        """Idle power of an option's whole device group (its PIM group included)."""
        return self.opt_use @ np.array([t.device.idle_power_w.value for t in self.types])

    @cached_property
    def opt_price_s(self) -> np.ndarray:
        """USD per second of an option's whole device group (nan where unpriced)."""
        per = np.array([np.nan if t.price_per_hour is None else t.price_per_hour / 3600.0
                        for t in self.types])
        use = self.opt_use.astype(float)
        return np.array([np.sum(np.where(u > 0, u * per, 0.0)) if not np.isnan(
            per[u > 0]).any() else np.nan for u in use])

    @cached_property
    def any_fit(self) -> bool:
        return bool(np.isfinite(self.time).any())

    def fits_in_flight(self, o: int, i: int, j: int, in_flight: int) -> bool:
        """Whether option o's stage over [i, j) fits its devices' memory holding the KV cache
        of `in_flight` micro-batches, at least this space's count (`self.in_flight`)."""
        if in_flight < self.in_flight:
            raise ValueError(f"in-flight count {in_flight} below the space's {self.in_flight}")
        if not np.isfinite(self.time[o, i, j]):
            return False
        opt = self.options[o]
        if opt.offload:  # the KV cache sits on the PIM group
            kv = float(self.pim_mem[o][i, j]) * in_flight / max(self.in_flight, 1)
            return kv <= usable_memory(self.types[opt.pim].device)
        kv = self.costs[(self.b, opt.type, opt.tp)].kv  # per token, a range's layers
        more = 0.0 if kv is None else float(kv[i, j]) * self.b * self.model.context_tokens
        mem = float(self.mem[o, i, j]) + (in_flight - self.in_flight) * more / opt.tp
        return mem <= usable_memory(self.types[opt.type].device)

    def candidate_periods(self, options: list[int]) -> np.ndarray:
        """Every distinct stage and transfer time: the values a pipeline's period can take."""
        vals = [self.time[o][np.isfinite(self.time[o])] for o in options]
        tys = sorted({self.options[o].type for o in options})
        vals.append(self.trans[tys].ravel())
        v = np.concatenate(vals)
        return np.unique(v[np.isfinite(v)])
