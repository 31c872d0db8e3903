"""Step costs: the one composition of the cost model that every path uses.

A *step* is what a stage of a replica does in one iteration of a serving engine: a forward pass
of a non-LLM micro-batch, a decode step of `batch` sequences whose KV caches hold `kv_tokens`
tokens in all, or a prefill chunk of `prefill_tokens` prompt tokens (vLLM/Sarathi mix the two
in one iteration). Every figure comes from `kcloud.hardware.cost.layer_table`; this module only
composes them:

- The linear layers of a step cost the decode graph's per-token work at a batch of as many
  rows as the step has new tokens (decode tokens + prefill tokens): the decode graph with its
  attention over the KV cache removed (`without_kv`).
- Attention over the KV cache is linear in its tokens, per layer: a decode step at `kv_tokens`
  interpolates every column of the layer table between the graph without KV (0 tokens) and the
  decode graph as captured (`kv_len + 1` tokens per sequence), so the decode graph captured at
  one KV length serves every KV length, and at the captured length the figures are the
  captured graph's exactly. A prefill chunk's attention costs the prefill graph's attention
  per (query, key) pair, times its pairs.
- Energy per device: busy power x time of the step (the cost model's power); a device draws its
  idle power when no step runs (`period_energy`).

Tables are cached per (stage, batch bucket): buckets are 1, 2, 3, 4, 6, 8, 12, ... and a batch
between two buckets interpolates linearly, so a simulator may call `step_cost` per simulated
step. `generation_cost` composes one request of an LLM (its prefill, then `output_tokens - 1`
decode steps, as the runtime generates) and is what `kcloud.predict`, the planner and
`plan_cost` share.

This module is torch-free; it takes LayerGraphs and a plan-like object (duck-typed: replicas
of stages with `start`, `end`, `device_type`, `precision`, `devices`), never the planner.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from functools import cached_property
from typing import Any, Protocol

import numpy as np

from kcloud.graph.layergraph import Layer, LayerGraph, Op, OpClass
from kcloud.hardware.cost import (
    Calibration,
    DeviceParams,
    ForwardCost,
    LayerTable,
    Precisions,
    default_calibration,
    layer_table,
    usable_memory,
)
from kcloud.hardware.device import Device
from kcloud.precision import Precision

# ---------------------------------------------------------------------------------------------
# Derived graphs


def without_kv(decode: LayerGraph) -> LayerGraph:
    """The decode graph with its attention over the KV cache removed (0 tokens of context):
    per-token work only. Attention ops keep their kernel and their query/output activations."""
    layers = []
    for layer in decode.layers:
        ops = tuple(
            replace(o, flops=0.0, in_elems=max(0, o.in_elems - o.kv_elems), kv_elems=0)
            if o.op_class is OpClass.ATTENTION else o for o in layer.ops)
        layers.append(replace(layer, ops=ops))
    return replace(decode, layers=tuple(layers), kv_len=0, model=decode.model + "#no-kv")


def attention_only(graph: LayerGraph) -> LayerGraph:
    """A graph's attention ops alone: of a prefill graph, what a prompt's attention costs; of
    a decode graph (over the KV cache as captured), what a PIM group runs of a decode step when
    a stage offloads its attention. No weights, no tensor-parallel collectives (heads split
    over the group; each head's output goes back alone)."""
    layers = []
    for layer in graph.layers:
        ops: tuple[Op, ...] = tuple(o for o in layer.ops if o.op_class is OpClass.ATTENTION)
        layers.append(Layer(layer.index, layer.name, layer.kind, ops, 0, layer.cut_elems))
    return replace(graph, layers=tuple(layers), model=graph.model + "#attention")


def dense_only(decode: LayerGraph) -> LayerGraph:
    """The decode graph without its attention ops: what the NPU/GPU group of a stage that
    offloads its attention runs of a decode step (projections, MLP, norms, head)."""
    layers = []
    for layer in decode.layers:
        ops = tuple(o for o in layer.ops if o.op_class is not OpClass.ATTENTION)
        layers.append(replace(layer, ops=ops))
    return replace(decode, layers=tuple(layers), model=decode.model + "#dense")


def _lerp_table(a: LayerTable, b: LayerTable, w: float) -> LayerTable:
    """Every per-layer column of `a` + w (`b` - `a`); `a` and `b` share device and TP."""
    if w == 0.0:
        return a
    if w == 1.0:
        return b
    out: dict[str, Any] = {}
    for f in fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray):
            out[f.name] = x + w * (y - x)
    return replace(a, **out)


def batch_buckets(batch: int) -> tuple[int, int]:
    """The two cache buckets around `batch` (1, 2, 3, 4, 6, 8, 12, 16, ...)."""
    if batch <= 4:
        return batch, batch
    p = 1 << (batch.bit_length() - 1)
    mid = p + p // 2
    if batch in (p, mid):
        return batch, batch
    return (p, mid) if batch < mid else (mid, 2 * p)


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepCost:
    """Modeled figures of one step of one stage, per device of its group."""

    time_s: float
    energy_j: float  # the step's energy per device (busy power x time)
    idle_w: float  # what a device draws between steps

    @property
    def busy_w(self) -> float:
        return self.energy_j / self.time_s if self.time_s > 0 else self.idle_w


@dataclass(frozen=True)
class Linear:
    """time = a + b x, energy = ea + eb x (x: KV tokens, or prefill attention pairs)."""

    a: float
    b: float
    ea: float
    eb: float


def _figures(c: ForwardCost, device: Device) -> tuple[float, float]:
    return c.time_s, c.power_w(device) * c.time_s


class StepTables:
    """Layer tables of a model on one device type (precision, tensor-parallel degree, link),
    built on first use and cached per batch: the source of every step cost of a stage."""

    def __init__(self, forward: LayerGraph, decode: LayerGraph | None, device: Device,
                 precision: Precision, params: DeviceParams | None = None, tp: int = 1,
                 link: tuple[float, float] | None = None) -> None:
        if decode is not None and len(decode.layers) != len(forward.layers):
            raise ValueError("prefill and decode graphs have different layer counts")
        self.forward, self.decode = forward, decode
        self.device, self.precision, self.tp, self.link = device, precision, tp, link
        self.params = params or default_calibration().params(device)
        self.n_layers = len(forward.layers)
        self._fwd: dict[int, LayerTable] = {}
        self._zero: dict[int, LayerTable] = {}
        self._full: dict[int, LayerTable] = {}
        self._attn_table: LayerTable | None = None

    @property
    def is_llm(self) -> bool:
        return self.decode is not None

    # The derived graphs are built on first use: the planner reads whole-step tables only.
    @cached_property
    def _no_kv(self) -> LayerGraph | None:
        return without_kv(self.decode) if self.decode is not None else None

    @cached_property
    def _attn(self) -> LayerGraph | None:
        return attention_only(self.forward) if self.decode is not None else None

    def _table(self, graph: LayerGraph, batch: int) -> LayerTable:
        return layer_table(graph, self.device, self.precision, batch, self.params, self.tp,
                           self.link)

    # -- tables ------------------------------------------------------------------------------
    def forward_table(self, batch: int) -> LayerTable:
        """The forward graph (non-LLM) or the whole prompt's prefill at `batch` samples."""
        t = self._fwd.get(batch)
        if t is None:
            t = self._fwd[batch] = self._table(self.forward, batch)
        return t

    @property
    def captured_kv_tokens(self) -> int:
        """KV tokens per sequence the decode graph attends over as captured (kv_len + 1)."""
        assert self.decode is not None
        return (self.decode.kv_len or 0) + 1

    def decode_table(self, batch: int, kv_per_seq: float | None = None) -> LayerTable:
        """One decode step of `batch` sequences, each attending over `kv_per_seq` tokens
        (default: as captured, the graph's own figures)."""
        assert self.decode is not None
        full = self._full.get(batch)
        if full is None:
            full = self._full[batch] = self._table(self.decode, batch)
        if kv_per_seq is None:
            return full
        return _lerp_table(self.token_table(batch), full, kv_per_seq / self.captured_kv_tokens)

    def token_table(self, tokens: int) -> LayerTable:
        """The per-token work (linear layers, norms, head) of `tokens` new tokens, no KV."""
        assert self._no_kv is not None
        t = self._zero.get(tokens)
        if t is None:
            t = self._zero[tokens] = self._table(self._no_kv, tokens)
        return t

    def attention_table(self) -> LayerTable:
        """The prompt's attention at batch 1 (`seq_len`^2 query-key pairs)."""
        assert self._attn is not None
        if self._attn_table is None:
            self._attn_table = self._table(self._attn, 1)
        return self._attn_table

    # -- memory ------------------------------------------------------------------------------
    def kv_bytes_per_token(self, start: int = 0, end: int | None = None) -> float:
        """KV-cache bytes one token of context keeps on each device of a stage [start, end)."""
        if self.decode is None:
            return 0.0
        d = self.decode
        per = float(sum(o.kv_elems for layer in d.layers[start:end] for o in layer.ops))
        per /= d.batch * self.captured_kv_tokens
        return per * Precisions.of(self.precision).kv_bytes / self.tp

    def weight_bytes(self, start: int = 0, end: int | None = None) -> float:
        return float(self.forward_table(1).weight_bytes[start:end].sum())


# ---------------------------------------------------------------------------------------------
# Attention offload to a PIM group


@dataclass(frozen=True)
class OffloadGroup:
    """How a stage whose decode attention runs on `count` PIM devices composes a step from its
    parts. Every part is a float or an array of them (the planner's matrices over layer
    ranges), so `StageTables` and the planner share this one composition.

    - Decode, sequenced: the NPU/GPU group runs a layer's dense ops, sends the queries (and
      the new token's K and V) to the PIM group, which attends over the KV cache it holds and
      sends the attention output back: time = dense + attention + transfers.
    - Decode, pipelined by layer (NeuPIMs' sub-batch interleaving; a batch of 2 or more): two
      sub-batches alternate, the dense ops of one run while the other's attention runs on
      PIM. The dense side reads its weights twice (two sub-batches of ceil(b/2) rows); the
      step takes the longer side plus the fill of one half layer. The faster mode is taken.
    - Prefill stays on the NPU/GPU group; the KV it writes moves to PIM memory layer by layer
      over the node link, overlapped with the next layers: max(prefill, move) + the smaller
      one's share of one layer.

    Energy: per device of the NPU/GPU group, the PIM group's share spread over them (so that
    `tp` x energy is the stage's whole energy, as for every stage): each side's busy energy
    and its idle power while the other side works. The link's own energy is not counted.
    """

    tp: int  # NPU/GPU devices of the stage
    count: int  # PIM devices
    n_layers: Any  # layers of the stage (the planner: an array over its layer ranges)
    npu_idle_w: float
    pim_idle_w: float

    @property
    def idle_w(self) -> float:
        """Idle power per NPU/GPU device, the PIM group's share included."""
        return self.npu_idle_w + self.count / self.tp * self.pim_idle_w

    def _energy(self, time: Any, npu_s: Any, npu_j: Any, pim_s: Any, pim_j: Any) -> Any:
        npu = npu_j + self.npu_idle_w * np.maximum(0.0, time - npu_s)
        pim = pim_j + self.pim_idle_w * np.maximum(0.0, time - pim_s)
        return npu + self.count / self.tp * pim

    def decode(self, batch: int, dense_s: Any, dense_j: Any, half_s: Any, half_j: Any,
               attn_s: Any, attn_j: Any, attn_half_s: Any, attn_half_j: Any,
               xfer_s: Any, xfer_half_s: Any) -> tuple[Any, Any, Any]:
        """(time, energy per NPU/GPU device, pipelined?) of a decode step of `batch` rows:
        `dense_*` the NPU/GPU side at `batch` rows, `half_*` at ceil(batch / 2); `attn_*` the
        PIM side (per PIM device) over the step's KV, `attn_half_*` over half the sequences;
        `xfer_*` the step's transfers over the node link, all rows or one sub-batch."""
        seq = dense_s + attn_s + xfer_s
        seq_j = self._energy(seq, dense_s, dense_j, attn_s, attn_j)
        if batch < 2:
            return seq, seq_j, np.zeros_like(np.asarray(seq), dtype=bool)
        d2, p2 = 2.0 * half_s, 2.0 * (attn_half_s + xfer_half_s)
        pipe = np.maximum(d2, p2) + np.minimum(d2, p2) / (2.0 * self.n_layers)
        pipe_j = self._energy(pipe, d2, 2.0 * half_j, 2.0 * attn_half_s, 2.0 * attn_half_j)
        use = pipe < seq
        return np.where(use, pipe, seq), np.where(use, pipe_j, seq_j), use

    def prefill(self, pre_s: Any, pre_j: Any, move_s: Any) -> tuple[Any, Any]:
        """(time, energy per NPU/GPU device) of a prefill whose KV moves to PIM memory."""
        time = np.maximum(pre_s, move_s) + np.minimum(pre_s, move_s) / self.n_layers
        return time, self._energy(time, pre_s, pre_j, 0.0, 0.0)


def _scalar(x: Any) -> float:
    return float(np.asarray(x))


class Offload:
    """The PIM group a stage offloads its decode attention to: its tables (the PIM device
    type over `attention_only` of the decode graph, tensor-parallel over `count` devices:
    heads split) and the node link between the stage's devices and the group."""

    def __init__(self, attention: StepTables, link: tuple[float, float]) -> None:
        if attention.decode is None:
            raise ValueError("an offload needs the decode graph's attention")
        self.tables = attention
        self.link = link  # (bandwidth B/s, latency s)

    @property
    def device(self) -> Device:
        return self.tables.device

    @property
    def count(self) -> int:
        return self.tables.tp

    def row_elems(self, start: int, end: int) -> float:
        """Activation elements one decode row sends to the PIM group and gets back over
        layers [start, end): the query and the new token's K and V out, the output back."""
        d = self.tables.decode
        assert d is not None
        return float(sum(max(0, o.in_elems - o.kv_elems) + o.out_elems
                         for layer in d.layers[start:end] for o in layer.ops)) / d.batch

    def layer_row_elems(self) -> np.ndarray:
        """`row_elems` per layer (the planner's ranges sum them)."""
        return np.array([self.row_elems(i, i + 1) for i in range(self.tables.n_layers)])

    def transfer_s(self, rows: Any, n_layers: Any, row_bytes: Any) -> Any:
        """A step's transfers for `rows` rows: two messages per layer, and the bytes (floats,
        or arrays over the planner's layer ranges)."""
        bw, lat = self.link
        return 2.0 * n_layers * lat + rows * row_bytes / bw

    def move_s(self, tokens: Any, kv_bytes_per_token: Any, n_layers: Any) -> Any:
        """Moving the KV of `tokens` prompt tokens into PIM memory (one message per layer)."""
        bw, lat = self.link
        return n_layers * lat + tokens * kv_bytes_per_token / bw


class StageTables:
    """One stage of a replica, [start, end) on `tables`' device type: its step costs.

    With `offload`, the stage's decode attention runs on a PIM group (`Offload`): `tables`
    then hold the dense part of the decode graph (`dense_only`) beside the whole prompt's
    prefill, and the group holds the KV cache (`OffloadGroup` composes the two sides)."""

    def __init__(self, tables: StepTables, start: int = 0, end: int | None = None,
                 offload: Offload | None = None) -> None:
        self.tables = tables
        self.start, self.end = start, tables.n_layers if end is None else end
        self.offload = offload
        self.attention = (StageTables(offload.tables, self.start, self.end)
                          if offload is not None else None)
        self._fwd: dict[int, tuple[float, float]] = {}
        self._tok: dict[int, tuple[float, float]] = {}
        self._kv: dict[int, tuple[float, float]] = {}  # per KV token at a decode batch
        self._pairs: tuple[float, float] | None = None

    @property
    def device(self) -> Device:
        return self.tables.device

    @property
    def tp(self) -> int:
        return self.tables.tp

    @property
    def group(self) -> OffloadGroup | None:
        """The composition of an offloaded stage (None: no offload)."""
        if self.offload is None:
            return None
        return OffloadGroup(self.tp, self.offload.count, self.end - self.start,
                            self.device.idle_power_w.value,
                            self.offload.device.idle_power_w.value)

    @property
    def idle_w(self) -> float:
        """Idle power per device (an offloaded stage: the PIM group's share included)."""
        g = self.group
        return self.device.idle_power_w.value if g is None else g.idle_w

    @property
    def max_w(self) -> float:
        return self.device.max_power_w.value

    def stage(self, table: LayerTable) -> ForwardCost:
        return table.stage(self.start, self.end)

    def kv_token_capacity(self, workspace_tokens: int = 0) -> int:
        """KV tokens this stage's devices hold beside their weights (and the activations of
        `workspace_tokens` new tokens of one step); an offloaded stage's KV lives in its PIM
        group's memory."""
        if self.attention is not None:
            return self.attention.kv_token_capacity()
        t = self.tables
        per = t.kv_bytes_per_token(self.start, self.end)
        if per <= 0:
            return 0
        cap = usable_memory(self.device) - t.weight_bytes(self.start,
                                                                                  self.end)
        if workspace_tokens and t.decode is not None:
            from kcloud.hardware.cost import activation_bytes_per_sample

            cap -= activation_bytes_per_sample(t.decode, t.precision) / t.tp * workspace_tokens
        return max(0, int(cap // per))

    # -- exact per batch ---------------------------------------------------------------------
    def _exact_forward(self, batch: int) -> tuple[float, float]:
        hit = self._fwd.get(batch)
        if hit is None:
            hit = self._fwd[batch] = _figures(self.stage(self.tables.forward_table(batch)),
                                              self.device)
        return hit

    def _exact_tokens(self, tokens: int) -> tuple[float, float]:
        hit = self._tok.get(tokens)
        if hit is None:
            hit = self._tok[tokens] = _figures(self.stage(self.tables.token_table(tokens)),
                                               self.device)
        return hit

    def _exact_kv(self, batch: int) -> tuple[float, float]:
        """Time and energy per KV token of a decode step of `batch` sequences."""
        hit = self._kv.get(batch)
        if hit is None:
            t0, e0 = self._exact_tokens(batch)
            t1, e1 = _figures(self.stage(self.tables.decode_table(batch)), self.device)
            n = batch * self.tables.captured_kv_tokens
            hit = self._kv[batch] = ((t1 - t0) / n, (e1 - e0) / n)
        return hit

    def _bucketed(self, fn: Any, batch: int) -> tuple[float, float]:
        if batch <= 4:
            return fn(batch)
        lo, hi = batch_buckets(batch)
        a = fn(lo)
        if lo == hi:
            return a
        b = fn(hi)
        w = (batch - lo) / (hi - lo)
        return a[0] + w * (b[0] - a[0]), a[1] + w * (b[1] - a[1])

    # -- step costs --------------------------------------------------------------------------
    def forward(self, batch: int) -> StepCost:
        """A forward pass of `batch` samples (non-LLM), or of `batch` whole prompts."""
        t, e = self._bucketed(self._exact_forward, batch)
        g = self.group
        if g is not None and self.tables.is_llm:  # the prompts' KV moves to PIM memory
            move = self._move_s(batch * (self.tables.forward.seq_len or 1))
            t, e = (_scalar(x) for x in g.prefill(t, e, move))
        return StepCost(t, e, self.idle_w)

    def _move_s(self, tokens: float) -> float:
        assert self.offload is not None and self.attention is not None
        a = self.attention
        per = a.tables.kv_bytes_per_token(self.start, self.end) * a.tp  # the whole group's
        return self.offload.move_s(tokens, per, self.end - self.start)

    def _row_bytes(self) -> float:
        assert self.offload is not None
        return (self.offload.row_elems(self.start, self.end)
                * Precisions.of(self.tables.precision).act_bytes)

    def decode_linear(self, batch: int) -> Linear:
        """A decode step of `batch` sequences as a + b x kv_tokens (in all). An offloaded
        stage gives its sequenced mode (`OffloadGroup`; the pipelined one is not linear in
        the KV tokens, and never slower): an upper bound on its time."""
        t, e = self._bucketed(self._exact_tokens, batch)
        s, es = self._bucketed(self._exact_kv, batch)
        if self.attention is not None and self.offload is not None:
            g = self.group
            assert g is not None
            a = self.attention
            at, ae = a._bucketed(a._exact_tokens, batch)
            s, es = a._bucketed(a._exact_kv, batch)
            x = self.offload.transfer_s(batch, self.end - self.start, self._row_bytes())
            k = g.count / g.tp  # the PIM group's energy per NPU/GPU device
            t0 = t + at + x
            e0 = e + g.npu_idle_w * (at + x) + k * (ae + g.pim_idle_w * (t + x))
            # per KV token: the PIM side works, the NPU/GPU side waits
            return Linear(t0, s, e0, k * es + g.npu_idle_w * s)
        return Linear(t, s, e, es)

    def pair_cost(self) -> tuple[float, float]:
        """Time and energy of one (query, key) pair of prompt attention."""
        if self._pairs is None:
            seq = self.tables.forward.seq_len or 1
            t, e = _figures(self.stage(self.tables.attention_table()), self.device)
            # the attention graph's own fixed overheads stay with the token work
            ov = self.tables.params.inference_overhead_s
            self._pairs = (max(0.0, t - ov) / seq**2, e * max(0.0, t - ov) / t / seq**2
                           if t > 0 else 0.0)
        return self._pairs

    def step(self, batch: int, kv_tokens: float, prefill_tokens: int = 0,
             prefill_pairs: float = 0.0) -> StepCost:
        """One engine iteration: a decode step of `batch` sequences attending over
        `kv_tokens` KV tokens in all, plus `prefill_tokens` prompt tokens whose attention
        spans `prefill_pairs` (query, key) pairs (sum over sequences of new x context)."""
        tok = batch + prefill_tokens
        if tok <= 0:
            return StepCost(0.0, 0.0, self.idle_w)
        if self.offload is not None:
            return self._offload_step(batch, kv_tokens, prefill_tokens, prefill_pairs)
        t, e = self._bucketed(self._exact_tokens, tok)
        if batch and kv_tokens:
            s, es = self._bucketed(self._exact_kv, batch)
            t, e = t + s * kv_tokens, e + es * kv_tokens
        if prefill_pairs:
            ps, pe = self.pair_cost()
            t, e = t + ps * prefill_pairs, e + pe * prefill_pairs
        return StepCost(t, e, self.idle_w)


    def _offload_step(self, batch: int, kv_tokens: float, prefill_tokens: int,
                      prefill_pairs: float) -> StepCost:
        """A step of an offloaded stage: the dense ops (and a prompt chunk, attention
        included) on the stage's devices, the decode attention on the PIM group."""
        g, a, off = self.group, self.attention, self.offload
        assert g is not None and a is not None and off is not None
        n = self.end - self.start
        half = (batch + 1) // 2
        rb = self._row_bytes()

        def dense(rows: int, chunk: bool = True) -> tuple[float, float]:
            t, e = self._bucketed(self._exact_tokens, rows + (prefill_tokens if chunk else 0))
            if prefill_pairs and chunk:
                ps, pe = self.pair_cost()
                t, e = t + ps * prefill_pairs, e + pe * prefill_pairs
            return t, e

        if batch == 0:  # a prompt chunk alone: no attention on PIM, its KV moves there
            t, e = dense(0)
            t2, e2 = g.prefill(t, e, self._move_s(prefill_tokens))
            return StepCost(_scalar(t2), _scalar(e2), self.idle_w)
        # a chunk riding along a decode step: its KV's bytes go with the step's messages
        move = self._move_s(prefill_tokens) - n * off.link[1] if prefill_tokens else 0.0
        ds, dj = dense(batch)
        # two sub-batches: the prompt chunk rides with one of them
        (h1, j1), (h2, j2) = dense(half), dense(half, chunk=False)
        hs, hj = (h1 + h2) / 2.0, (j1 + j2) / 2.0
        at = a.step(batch, kv_tokens)
        ah = a.step(half, kv_tokens * half / batch)
        x = off.transfer_s(batch, n, rb) + move
        xh = off.transfer_s(half, n, rb) + move / 2.0
        t, e, _ = g.decode(batch, ds, dj, hs, hj, at.time_s, at.energy_j, ah.time_s,
                           ah.energy_j, x, xh)
        return StepCost(_scalar(t), _scalar(e), self.idle_w)

    def offload_pipelined(self, batch: int, kv_tokens: float) -> bool:
        """Whether a decode step of this offloaded stage runs pipelined by layer."""
        g, a, off = self.group, self.attention, self.offload
        if g is None or a is None or off is None or batch < 2:
            return False
        n, half, rb = self.end - self.start, (batch + 1) // 2, self._row_bytes()
        ds, dj = self._bucketed(self._exact_tokens, batch)
        hs, hj = self._bucketed(self._exact_tokens, half)
        at, ah = a.step(batch, kv_tokens), a.step(half, kv_tokens * half / batch)
        return bool(g.decode(batch, ds, dj, hs, hj, at.time_s, at.energy_j, ah.time_s,
                             ah.energy_j, off.transfer_s(batch, n, rb),
                             off.transfer_s(half, n, rb))[2])


def step_cost(stage: StageTables, batch: int, kv_tokens: float = 0.0, *,
              prefill_tokens: int = 0, prefill_pairs: float = 0.0) -> StepCost:
    """Seconds and joules (per device) of one step of `stage`: a decode step of `batch`
    sequences over `kv_tokens` KV tokens in all, with `prefill_tokens` prompt tokens of a
    chunk riding along; for a non-LLM stage, a forward pass of `batch` samples."""
    if not stage.tables.is_llm:
        return stage.forward(batch)
    return stage.step(batch, kv_tokens, prefill_tokens, prefill_pairs)


def prefill_pairs(new_tokens: int, context: int) -> float:
    """(query, key) pairs of a prefill chunk of `new_tokens` after `context` cached tokens."""
    return float(new_tokens) * (context + new_tokens)


# ---------------------------------------------------------------------------------------------
# One request, one period


@dataclass(frozen=True)
class GenerationCost:
    """An LLM request of `output_tokens` tokens (the prompt's pass gives the first)."""

    time_s: Any  # float, or an array of them (the planner's matrices)
    energy_j: Any  # busy energy per device
    ttft_s: Any
    tpot_s: Any
    decode_steps: int


def decode_steps(output_tokens: int) -> int:
    """Decode steps of a request: the prompt's pass gives the first token, each later token
    takes one step (the runtime generates the same way)."""
    return max(int(output_tokens) - 1, 0)


def generation_cost(prefill_s: Any, prefill_j: Any, decode_s: Any, decode_j: Any,
                    output_tokens: int, *, overlap_idle_s: Any = None) -> GenerationCost:
    """Compose a request from its prefill and one decode step (at the request's mean KV
    length: the decode cost is linear in KV tokens, so the mean step is the step at the mean).

    `overlap_idle_s`: with continuous batching and chunked prefill, other requests' prompt
    chunks ride along the memory-bound decode steps and use the compute they leave idle (this
    much per step); only the rest of the prefill adds time. Works on floats and arrays alike.
    """
    n = decode_steps(output_tokens)
    energy = prefill_j + n * decode_j
    if overlap_idle_s is None:
        time = prefill_s + n * decode_s
    else:
        time = n * decode_s + np.maximum(0.0, prefill_s - n * overlap_idle_s)
        if isinstance(time, np.ndarray) and time.ndim == 0:
            time = float(time)
    return GenerationCost(time, energy, prefill_s, decode_s, n)


def period_energy(busy_j: float, idle_w: float, busy_s: float, period_s: float) -> float:
    """A device's energy over a period: its busy energy, idle power for the rest."""
    return busy_j + idle_w * max(0.0, period_s - busy_s)


# ---------------------------------------------------------------------------------------------
# A plan's figures


class _StageLike(Protocol):
    start: int
    end: int
    device_type: str
    precision: str
    devices: tuple[str, ...]


@dataclass(frozen=True)
class StageSpan:
    """A stage as `plan_cost` reads one (a plan's `Stage` is one too): layers [start, end) on
    `devices` of one type, for callers that price a layout without a whole `Plan`."""

    start: int
    end: int
    device_type: str
    precision: str
    devices: tuple[str, ...]


@dataclass(frozen=True)
class StagePlanCost:
    device_type: str
    tp: int
    time_s: float  # one micro-batch (an LLM: one request's prefill and decode steps)
    energy_j: float  # busy energy per device of the micro-batch
    idle_w: float


@dataclass(frozen=True)
class PlanCost:
    """Modeled figures of a plan's replicas from their stages' step costs (transfers between
    stages not included: they belong to the cluster's links, which the planner adds)."""

    stages: tuple[tuple[StagePlanCost, ...], ...]  # per replica
    items_per_micro_batch: int
    figures: str = "modeled"

    def replica_period_s(self, r: int) -> float:
        return max(s.time_s for s in self.stages[r])

    def replica_latency_s(self, r: int) -> float:
        return sum(s.time_s for s in self.stages[r])

    @property
    def throughput(self) -> float:
        return sum(self.items_per_micro_batch / self.replica_period_s(r)
                   for r in range(len(self.stages)))

    @property
    def power_w(self) -> float:
        out = 0.0
        for r, stages in enumerate(self.stages):
            period = self.replica_period_s(r)
            out += sum(s.tp * period_energy(s.energy_j, s.idle_w, s.time_s, period)
                       for s in stages) / period
        return out

    @property
    def energy_per_item_j(self) -> float:
        return self.power_w / self.throughput


def pim_precision(pim: Device, precision: Precision) -> Precision:
    """The precision a PIM group attends at for a stage at `precision` (its KV cache's)."""
    got = pim.resolve_precision(precision)
    if got is not None:
        return got
    for p in (Precision.FP16, Precision.BF16, Precision.FP8, Precision.INT8, Precision.FP32):
        if pim.supports(p):
            return p
    return next(iter(pim.peak_flops))


def offload_tables(decode: LayerGraph, pim: Device, count: int, precision: Precision,
                   calibration: Calibration | None = None) -> StepTables:
    """The tables of a PIM group of `count` devices attending over `decode`'s KV cache."""
    g = attention_only(decode)
    prec = pim_precision(pim, precision)
    return StepTables(g, g, pim, prec, (calibration or default_calibration()).params(pim),
                      count)


def offload_of(stage: Any, cluster: Any) -> tuple[Device, int, tuple[float, float]] | None:
    """(PIM device, count, node link (bandwidth, latency)) of a plan stage that offloads its
    decode attention (its `attention_offload`), on `cluster`; None for one that does not."""
    off = getattr(stage, "attention_offload", None)
    if off is None:
        return None
    link = cluster.intra_link(stage.device_type)
    return cluster.device_types[off.device_type], off.count, (link.bandwidth, link.latency)


def stage_tables_for(stage: _StageLike, forward: LayerGraph, decode: LayerGraph | None,
                     device: Device, link: tuple[float, float] | None,
                     calibration: Calibration | None = None,
                     cache: dict[tuple[Any, ...], StepTables] | None = None, *,
                     offload: tuple[Device, int, tuple[float, float]] | None = None
                     ) -> StageTables:
    """The StageTables of one plan stage (its device type, precision, layers, tp), with
    `offload` = (PIM device, count, node link (bandwidth, latency)) when its decode attention
    runs on a PIM group."""
    prec = device.resolve_precision(Precision.parse(stage.precision)) or Precision.parse(
        stage.precision)
    tp = len(stage.devices)
    dense = offload is not None and decode is not None
    key = (device.id, prec, tp, link, dense)
    tables = cache.get(key) if cache is not None else None
    if tables is None:
        params = (calibration or default_calibration()).params(device)
        dec = dense_only(decode) if dense and decode is not None else decode
        tables = StepTables(forward, dec, device, prec, params, tp, link)
        if cache is not None:
            cache[key] = tables
    if not dense or offload is None or decode is None:
        return StageTables(tables, stage.start, stage.end)
    pim, count, node_link = offload
    pkey = ("pim", pim.id, count, prec)
    ptab = cache.get(pkey) if cache is not None else None
    if ptab is None:
        ptab = offload_tables(decode, pim, count, prec, calibration)
        if cache is not None:
            cache[pkey] = ptab
    return StageTables(tables, stage.start, stage.end, Offload(ptab, node_link))


def plan_cost(plan: Any, cluster: Any, calibration: Calibration | None,
              forward: LayerGraph, decode: LayerGraph | None = None,
              output_tokens: int | None = None) -> PlanCost:
    """The figures of `plan` (a `kcloud.planner.Plan`) on `cluster` from its stages' step
    costs: per stage, a micro-batch's forward pass or (LLM) one request's prefill and its
    decode steps at the mean KV length of the decode graph."""
    cache: dict[tuple[Any, ...], StepTables] = {}
    b = int(plan.micro_batch)
    out_tok = int(output_tokens or plan.output_tokens or 1)
    replicas = []
    for r in plan.replicas:
        stages: list[StagePlanCost] = []
        for s in r.stages:
            dev = cluster.device_types[s.device_type]
            link = cluster.intra_link(s.device_type)
            st = stage_tables_for(s, forward, decode, dev, (link.bandwidth, link.collective_s),
                                  calibration, cache, offload=offload_of(s, cluster))
            if decode is None:
                c = st.forward(b)
                time, energy = c.time_s, c.energy_j
            else:
                pre = st.forward(b)
                dec = step_cost(st, b, b * st.tables.captured_kv_tokens)
                g = generation_cost(pre.time_s, pre.energy_j, dec.time_s, dec.energy_j, out_tok)
                time, energy = float(g.time_s), float(g.energy_j)
            stages.append(StagePlanCost(s.device_type, len(s.devices), time, energy,
                                        st.idle_w))
        replicas.append(tuple(stages))
    items = b * (out_tok if decode is not None else 1)
    return PlanCost(tuple(replicas), items)


__all__ = [
    "GenerationCost",
    "Linear",
    "Offload",
    "OffloadGroup",
    "PlanCost",
    "StageSpan",
    "StageTables",
    "StepCost",
    "StepTables",
    "attention_only",
    "batch_buckets",
    "decode_steps",
    "dense_only",
    "generation_cost",
    "offload_of",
    "offload_tables",
    "period_energy",
    "pim_precision",
    "plan_cost",
    "prefill_pairs",
    "stage_tables_for",
    "step_cost",
    "without_kv",
]
