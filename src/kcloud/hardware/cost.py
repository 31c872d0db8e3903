"""The cost model: time, power and energy of a LayerGraph on a device.

Per op, a roofline with calibrated efficiencies:

    compute = FLOPs / (peak[precision] * efficiency[op class] * fill)
    memory  = (weight bytes spilled off chip + activation bytes spilled + KV-cache bytes)
              / (bandwidth * memory efficiency)
    op time = max(compute, memory)

- `fill` is how well one op fills the matrix units: min(1, output elements / `sat_elems`)
  x K / (K + `k_half`), K the reduction length (FLOPs / 2 / outputs).
  A small op (batch 1, late CNN stages, decode GEMV) leaves cores idle; large batches fill them.
  An op never runs slower than on the vector units alone (`vector_ratio` x peak).
- On-chip reuse: weights stay in SRAM when the model (or stage) fits in half of it (then they
  are not read from DRAM per batch); on an NPU, whose compiler allots its SRAM per graph, in
  all that the activation tile of the batch leaves (`compiler_sram`): at batch 1 nearly all.
  Each op is tiled over samples so that a tile's activations fit in the other half: only
  what one sample cannot fit spills to DRAM, and streamed weights are read once per tile.
- Elementwise ops are fused into their producer (no DRAM traffic of their own) and run on the
  vector units at `vector_ratio` x the matrix peak.
- Fixed costs: `kernel_overhead_s` per compute kernel (launch / sync / DMA setup) and
  `inference_overhead_s` per forward pass (host dispatch).
- CPUs (eager PyTorch, one thread per stage) differ in four ways, each a parameter whose
  accelerator default leaves the formulas above unchanged: a core packs its operands and then
  computes on them, so memory and compute time add (`serial_share`); every elementwise op is a
  kernel of its own that moves its activations (`elementwise_kernels`); and no op is tiled
  with the next, so a batch's activations beyond the cache go through DRAM (`act_tiling`); and
  every node of the graph is a Python dispatch (`node_overhead_s`).

Power = idle + (max - idle) * activity, with activity = 1 - (1 - u_compute) * (1 - k * u_memory):
busy matrix units draw full dynamic power, streaming memory draws a share `k` of it.

The per-device efficiencies are fitted to published results by `kcloud.hardware.calibrate`;
devices with no published result use their class's prior (see `CLASS_PRIORS`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from importlib import resources
from typing import Any

import numpy as np

from kcloud.graph.layergraph import LayerGraph, OpClass, TPStyle
from kcloud.hardware.device import Device, DeviceKind
from kcloud.precision import Precision

# Share of device memory that the model may use (the rest: runtime, fragmentation).
MEMORY_HEADROOM = 0.92


def usable_memory(device: Device) -> float:
    """Bytes of `device`'s memory a plan may fill: its capacity x `MEMORY_HEADROOM`."""
    return device.memory_bytes.value * MEMORY_HEADROOM


@dataclass(frozen=True)
class DeviceParams:
    """Efficiency and overhead parameters of one device (fitted or a class prior)."""

    matrix_eff: float  # fraction of peak reached by large convolutions on the matrix units
    matmul_factor: float  # matmul efficiency relative to conv
    attention_factor: float  # attention (QK^T, PV) efficiency relative to matmul
    memory_eff: float  # fraction of the memory bandwidth reached by streaming reads
    vector_ratio: float  # elementwise throughput as a share of the matrix peak
    kernel_overhead_s: float  # fixed time per compute kernel
    inference_overhead_s: float  # fixed time per forward pass
    sat_elems: float  # output elements one op needs to fill the matrix units
    k_half: float  # reduction length at which a matrix op reaches half its efficiency
    sram_usable: float  # share of on-chip SRAM available for reuse
    memory_power_share: float  # dynamic power of streaming memory relative to compute
    # Share of the shorter of an op's compute and memory times that the longer does not hide
    # (0: DMA engines stream while the matrix units work; 1: a CPU core packs its operands,
    # then computes on them).
    serial_share: float = 0.0
    # Share of elementwise ops that run as kernels of their own, reading and writing their
    # activations (0: fused into their producers by a compiler; 1: eager execution).
    elementwise_kernels: float = 0.0
    # Fixed time per node of the traced graph (a module, function or method call: views,
    # reshapes and small ops included) when the model runs eagerly from Python; a compiled
    # graph (accelerators) has none.
    node_overhead_s: float = 0.0
    # Whether ops are tiled over samples so that activations stay on chip (1: a compiler
    # tiles; 0: eager execution materializes each op's whole output, so what of a batch's
    # activations exceeds the on-chip budget goes through DRAM).
    act_tiling: float = 1.0
    # Whether the partitions of one device share its last-level cache (CPU cores), so that
    # stages on partitions of one device compete for it: a stage streaming more than the
    # cache holds evicts its neighbours' weights. 0: each partition has its own share.
    shared_cache: float = 0.0
    # Time the first pass of a request loses on a device that sat idle (a CPU core resuming
    # from an idle state, its caches refilled after other work evicted them): a fixed part,
    # which a request pays at its first stage (a later stage's is part of the hop that wakes
    # it), and a part per byte of a stage's weights that the device's cache held, which every
    # stage pays (`refill_time_s`). A pipeline kept busy pays neither. 0 where not measured.
    resume_s: float = 0.0
    resume_s_per_byte: float = 0.0
    # How on-chip SRAM is shared between weights and activations. 1: a graph compiler
    # allots it per graph (dataflow NPUs: the weights keep all that the activation tile of the
    # batch leaves, so at batch 1 a model that nearly fills the SRAM stays resident; layers are
    # fused, so activations pass between them on chip). 0: a fixed half each, as a hardware
    # cache shared by threads behaves (GPUs, CPUs).
    compiler_sram: float = 0.0
    fitted: tuple[str, ...] = ()  # the fields that calibration fitted for this device

    def efficiency(self, op_class: OpClass) -> float:
        if op_class is OpClass.CONV:
            return self.matrix_eff
        mm = self.matrix_eff * self.matmul_factor
        if op_class is OpClass.ATTENTION:
            return mm * self.attention_factor
        return mm


def refill_time_s(params: DeviceParams, device: Device, weight_bytes: Any) -> Any:
    """Seconds a stage's first pass after an idle pause loses on `device` beyond the fixed
    resume, for `weight_bytes` of weights per device (a number or an array): the refill of
    what of those weights the device's cache held (beyond its cache they stream from memory
    on every pass, after a pause or not)."""
    cache = device.sram_bytes.value if device.sram_bytes else 0.0
    return params.resume_s_per_byte * np.minimum(weight_bytes, cache)


# Priors per device class: physically typical values, used where no published result
# constrains a device. They are estimates, and outputs built on them say so via `calibrated`.
CLASS_PRIORS: dict[DeviceKind, DeviceParams] = {
    DeviceKind.GPU: DeviceParams(
        matrix_eff=0.55, matmul_factor=1.0, attention_factor=0.6, memory_eff=0.75,
        vector_ratio=1 / 16, kernel_overhead_s=4e-6, inference_overhead_s=60e-6,
        sat_elems=1.0e6, k_half=64.0, sram_usable=0.5, memory_power_share=0.6,
    ),
    # NPUs run a compiled graph (layer fusion, static schedule on the array): a layer boundary
    # is an on-chip synchronisation, not a host launch (0.5 us, estimated), and a forward pass
    # pays one command submission and completion over PCIe plus its input's DMA (30 us,
    # estimated: a 224x224 int8 image is 150 KB, ~10 us at 16 GB/s).
    DeviceKind.NPU: DeviceParams(
        matrix_eff=0.5, matmul_factor=1.0, attention_factor=0.6, memory_eff=0.7,
        vector_ratio=1 / 16, kernel_overhead_s=0.5e-6, inference_overhead_s=30e-6,
        sat_elems=2.0e5, k_half=64.0, sram_usable=0.75, memory_power_share=0.6,
        compiler_sram=1.0,
    ),
    DeviceKind.PIM: DeviceParams(
        matrix_eff=0.6, matmul_factor=1.0, attention_factor=0.8, memory_eff=0.8,
        vector_ratio=1 / 4, kernel_overhead_s=5e-6, inference_overhead_s=50e-6,
        sat_elems=4.0e3, k_half=8.0, sram_usable=0.0, memory_power_share=0.8,
    ),
    DeviceKind.CPU: DeviceParams(
        matrix_eff=0.8, matmul_factor=1.0, attention_factor=0.7, memory_eff=0.8,
        vector_ratio=1 / 4, kernel_overhead_s=8e-6, inference_overhead_s=30e-6,
        sat_elems=4.0e3, k_half=16.0, sram_usable=0.5, memory_power_share=0.5,
        serial_share=1.0, elementwise_kernels=1.0, act_tiling=0.0, node_overhead_s=2e-6,
        shared_cache=1.0,
    ),
}

FIT_FIELDS = ("matrix_eff", "matmul_factor", "memory_eff", "k_half")

# Parameters measured on this machine, by device id: a provider returns (fields, source). They
# override the class prior and the class calibration, and yield to a device's own calibration.
MeasuredProvider = Callable[[], tuple[dict[str, float], str]]
_MEASURED: dict[str, MeasuredProvider] = {}


def register_measured_params(device_id: str, provider: MeasuredProvider) -> None:
    """Let `provider` (called lazily, on the first cost of such a device) set its parameters."""
    _MEASURED[device_id] = provider


def measured_params(device_id: str) -> tuple[dict[str, float], str] | None:
    """The measured parameters of `device_id` (without partition suffix) and their source."""
    provider = _MEASURED.get(device_id.split(":", 1)[0])
    return provider() if provider is not None else None


@dataclass(frozen=True)
class Calibration:
    """Fitted parameters: per device class and per device, on top of `CLASS_PRIORS`."""

    by_class: dict[str, dict[str, float]] = field(default_factory=dict)
    by_device: dict[str, dict[str, float]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def params(self, device: Device) -> DeviceParams:
        base = CLASS_PRIORS[device.kind]
        fitted: list[str] = []
        over = dict(self.by_class.get(device.kind.value, {}))
        dev_id = device.id.split(":", 1)[0]  # a partition shares its device's efficiencies
        measured = measured_params(dev_id) if dev_id not in self.by_device else None
        if measured is not None:
            over.update(measured[0])
        dev_over = self.by_device.get(dev_id, {})
        over.update(dev_over)
        fitted = sorted(set(self.by_class.get(device.kind.value, {})) | set(dev_over)
                        | set(measured[0] if measured else ()))
        return replace(base, **over, fitted=tuple(fitted))

    def to_dict(self) -> dict[str, Any]:
        return {"version": 1, "by_class": self.by_class, "by_device": self.by_device,
                "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        return cls(by_class=d.get("by_class", {}), by_device=d.get("by_device", {}),
                   meta=d.get("meta", {}))


@lru_cache(maxsize=1)
def default_calibration() -> Calibration:
    """The calibration shipped with K-Cloud (written by `kcloud calibrate --save`)."""
    path = resources.files("kcloud.hardware") / "calibrated.json"
    try:
        return Calibration.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return Calibration()


# ---------------------------------------------------------------------------------------------
# Per-graph arrays (the hot path: numpy over ops, cached per graph)

_CLASS_INDEX = {c: i for i, c in enumerate(OpClass)}
_MATRIX = [_CLASS_INDEX[c] for c in OpClass if c.uses_matrix_units]


@dataclass(frozen=True)
class _OpArrays:
    cls: np.ndarray
    flops: np.ndarray
    weights: np.ndarray
    act: np.ndarray  # in + out elements, KV cache excluded
    out: np.ndarray
    kv: np.ndarray
    layer_of_op: np.ndarray  # layer index of each op
    n_layers: int
    layer_weights: np.ndarray  # parameters per layer
    layer_kernels: np.ndarray  # compute kernels per layer (elementwise ops not counted)
    layer_elementwise: np.ndarray  # elementwise ops per layer
    layer_nodes: np.ndarray  # traced graph nodes per layer (eager dispatches)
    layer_comm: np.ndarray  # elements all-reduced per layer under tensor parallelism
    layer_collectives: np.ndarray  # collectives per layer under tensor parallelism
    cut_elems: np.ndarray  # elements crossing a cut after each layer
    total_weights: float
    peak_act_per_sample: float  # largest in+out of one op, per sample (elements)
    tp_max_degree: int  # largest degree every shardable layer accepts


_ARRAYS: dict[int, tuple[LayerGraph, _OpArrays]] = {}


def _arrays(graph: LayerGraph) -> _OpArrays:
    hit = _ARRAYS.get(id(graph))
    if hit is not None and hit[0] is graph:
        return hit[1]
    ops = [(li, o) for li, layer in enumerate(graph.layers) for o in layer.ops]
    cls = np.array([_CLASS_INDEX[o.op_class] for _, o in ops], dtype=np.int64)
    kv = np.array([o.kv_elems for _, o in ops], dtype=np.float64)
    act = np.array([o.in_elems + o.out_elems for _, o in ops], dtype=np.float64) - kv
    n = len(graph.layers)
    arr = _OpArrays(
        cls=cls,
        flops=np.array([o.flops for _, o in ops], dtype=np.float64),
        weights=np.array([o.weight_elems for _, o in ops], dtype=np.float64),
        act=np.maximum(act, 0.0),
        out=np.array([o.out_elems for _, o in ops], dtype=np.float64),
        kv=kv,
        layer_of_op=np.array([li for li, _ in ops], dtype=np.int64),
        n_layers=n,
        layer_weights=np.array([layer.params for layer in graph.layers], dtype=np.float64),
        layer_kernels=np.array(
            [sum(1 for o in layer.ops if o.op_class is not OpClass.ELEMENTWISE)
             for layer in graph.layers], dtype=np.float64),
        layer_nodes=np.array([len(layer.nodes) for layer in graph.layers], dtype=np.float64),
        layer_elementwise=np.array(
            [sum(1 for o in layer.ops if o.op_class is OpClass.ELEMENTWISE)
             for layer in graph.layers], dtype=np.float64),
        layer_comm=np.array([sum(g.comm_elems for g in layer.tp) for layer in graph.layers],
                            dtype=np.float64),
        # one collective per group, except convolution groups: one all-gather per conv
        layer_collectives=np.array(
            [sum(len(g.column) if g.style is TPStyle.CONV else 1 for g in layer.tp)
             for layer in graph.layers], dtype=np.float64),
        cut_elems=np.array([layer.cut_elems for layer in graph.layers], dtype=np.float64),
        total_weights=float(graph.total_params),
        peak_act_per_sample=float(act.max() / graph.batch) if len(ops) else 0.0,
        tp_max_degree=min((layer.tp_max_degree for layer in graph.layers if layer.tp),
                          default=1),
    )
    if len(_ARRAYS) > 256:
        _ARRAYS.clear()
    _ARRAYS[id(graph)] = (graph, arr)
    return arr


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ForwardCost:
    """Modeled cost of one forward pass (of a graph, or of a stage's layers) on one device."""

    time_s: float
    compute_s: float  # time of the ops that are compute-bound
    memory_s: float  # time of the ops that are memory-bound
    overhead_s: float  # fixed per-kernel and per-inference time
    comm_s: float  # tensor-parallel collectives
    flops: float
    dram_bytes: float
    activity: float  # 0..1, drives power
    bound: str  # "compute" | "memory" | "overhead" | "comm"
    weight_bytes: float = 0.0  # weights held by one device
    busy_s: float = 0.0  # pure compute time of all ops (what the matrix/vector units do)

    def power_w(self, device: Device) -> float:
        idle = device.idle_power_w.value
        return idle + (device.max_power_w.value - idle) * self.activity


@dataclass(frozen=True)
class Precisions:
    compute: Precision
    weight_bytes: float
    act_bytes: float
    kv_bytes: float

    @classmethod
    def of(cls, p: Precision) -> Precisions:
        # Integer and FP8 inference keep activations and the KV cache at 8 bits; wider
        # precisions keep them at their own width.
        return cls(p, p.bytes, max(p.bytes, 1.0), max(p.bytes, 1.0))


@dataclass(frozen=True)
class LayerTable:
    """Per-layer modeled costs of a graph on one device type at one batch and TP degree.

    Two regimes per layer: weights resident on chip (`*_res`) and streamed from memory
    (`*_str`). A stage whose weights overflow half the usable SRAM interpolates between them
    by the share that spills. Columns are per layer; `stage()` sums any contiguous range.
    """

    device: Device
    params: DeviceParams
    tp: int
    time_res: np.ndarray
    time_str: np.ndarray
    busy_res: np.ndarray  # compute-bound time x fill (drives power)
    compute: np.ndarray  # pure compute time of all ops
    mem_res: np.ndarray  # memory time (drives power)
    mem_str: np.ndarray
    cbound_res: np.ndarray  # time of compute-bound ops
    cbound_str: np.ndarray
    dram_res: np.ndarray
    dram_str: np.ndarray
    kernel_s: np.ndarray  # per-kernel overheads
    comm_s: np.ndarray  # tensor-parallel collectives
    flops: np.ndarray
    weight_bytes: np.ndarray  # per device
    sram_half: float

    def stage(self, i: int, j: int) -> ForwardCost:
        """Cost of layers [i, j) as one stage (one forward pass of its micro-batch)."""
        sl = slice(i, j)
        w = float(self.weight_bytes[sl].sum())
        spill = 0.0 if w <= self.sram_half else 1.0 - self.sram_half / w

        def mix(res: np.ndarray, st: np.ndarray) -> float:
            r = float(res[sl].sum())
            return r + spill * (float(st[sl].sum()) - r)

        ops = mix(self.time_res, self.time_str)
        cbound = mix(self.cbound_res, self.cbound_str)
        mem = mix(self.mem_res, self.mem_str)
        overhead = float(self.kernel_s[sl].sum()) + self.params.inference_overhead_s
        comm = float(self.comm_s[sl].sum())
        total = ops + overhead + comm
        u_c = float(self.busy_res[sl].sum()) / total if total else 0.0
        u_m = mem / total if total else 0.0
        k = self.params.memory_power_share
        activity = 1.0 - (1.0 - min(u_c, 1.0)) * (1.0 - k * min(u_m, 1.0))
        parts = {"compute": cbound, "memory": ops - cbound, "overhead": overhead, "comm": comm}
        return ForwardCost(
            time_s=total, compute_s=cbound, memory_s=ops - cbound, overhead_s=overhead,
            comm_s=comm, flops=float(self.flops[sl].sum()),
            dram_bytes=mix(self.dram_res, self.dram_str),
            activity=min(1.0, max(0.0, activity)), bound=max(parts, key=lambda p: parts[p]),
            weight_bytes=w, busy_s=float(self.compute[sl].sum()),
        )


def layer_table(
    graph: LayerGraph,
    device: Device,
    precision: Precision,
    batch: int,
    params: DeviceParams,
    tp: int = 1,
    link: tuple[float, float] | None = None,
) -> LayerTable:
    """Per-layer costs of `graph` at `batch` on `device` (split over `tp` such devices).

    With `tp` > 1 the work is split Megatron-style: weights, FLOPs and KV cache divided, one
    all-reduce per shardable group over `link` = (bandwidth bytes/s, latency s).
    """
    a = _arrays(graph)
    prec = Precisions.of(precision)
    scale = batch / graph.batch / tp
    peak = device.peak(precision)
    bw = device.memory_bw.value * params.memory_eff

    eff = np.array([params.efficiency(c) if c.uses_matrix_units else 1.0 for c in OpClass])
    matrix = np.isin(a.cls, _MATRIX)
    fill = np.where(matrix, np.minimum(1.0, a.out * scale / params.sat_elems), 1.0)
    # Short reductions (small K: attention's head_dim, thin convs) keep the matrix pipelines
    # less busy per loaded tile than long ones.
    k = a.flops / np.maximum(2.0 * a.out, 1.0)
    fill = np.where(matrix, fill * k / (k + params.k_half), fill)
    vector = peak * params.vector_ratio
    # A small op runs on whichever is faster: the partly filled matrix units or the vector units.
    rate = np.where(matrix, np.maximum(peak * eff[a.cls] * fill, vector), vector)
    compute = np.where(a.cls == _CLASS_INDEX[OpClass.EMBEDDING], 0.0, a.flops * scale / rate)

    # On-chip reuse: the op is tiled over samples so that a tile's activations fit in half the
    # usable SRAM; what one sample cannot fit spills to DRAM, and the weights (when not
    # resident) are streamed once per tile.
    sram = (device.sram_bytes.value if device.sram_bytes else 0.0) * params.sram_usable
    budget = sram / 2
    per_sample = a.act / graph.batch / tp * prec.act_bytes
    elementwise = a.cls == _CLASS_INDEX[OpClass.ELEMENTWISE]
    act_dram = (params.act_tiling * batch * np.maximum(0.0, per_sample - budget)
                + (1.0 - params.act_tiling) * np.maximum(0.0, batch * per_sample - budget))
    act_dram = np.where(elementwise, params.elementwise_kernels * act_dram, act_dram)
    if budget > 0:
        tile = np.maximum(1.0, np.floor(budget / np.maximum(per_sample, 1e-9)))
        passes = np.ceil(batch / np.minimum(tile, batch))
    else:  # no on-chip memory figure: weights are read once per batch (register tiling)
        passes = np.ones_like(per_sample)
    base_dram = act_dram + a.kv * scale * prec.kv_bytes
    w_dram = a.weights * prec.weight_bytes / tp * passes
    mem_res, mem_str = base_dram / bw, (base_dram + w_dram) / bw

    def op_time(mem: np.ndarray) -> np.ndarray:
        return np.maximum(compute, mem) + params.serial_share * np.minimum(compute, mem)

    t_res, t_str = op_time(mem_res), op_time(mem_str)

    n = a.n_layers
    # What of the SRAM the weights may keep: half of it, or (a compiler's allotment) all
    # that the activation tile of this batch leaves (the largest matrix op's inputs and
    # outputs; elementwise work is fused into it), never less than half.
    tile_act = min(budget, float(np.where(elementwise, 0.0, per_sample).max(initial=0.0))
                   * batch)
    w_budget = budget + params.compiler_sram * (budget - tile_act)

    def per_layer(x: np.ndarray) -> np.ndarray:
        return np.bincount(a.layer_of_op, weights=x, minlength=n)

    if tp > 1:
        link_bw, link_lat = link if link else _default_link(device)
        ring = 2.0 * (tp - 1) / tp  # a ring all-reduce moves 2(t-1)/t of the data per device
        comm = (a.layer_comm * batch / graph.batch * prec.act_bytes * ring / link_bw
                + a.layer_collectives * link_lat * math.log2(tp))
    else:
        comm = np.zeros(n)
    return LayerTable(
        device=device, params=params, tp=tp,
        time_res=per_layer(t_res), time_str=per_layer(t_str),
        busy_res=per_layer(np.where(compute >= mem_res, compute * fill, 0.0)),
        compute=per_layer(compute),
        mem_res=per_layer(mem_res), mem_str=per_layer(mem_str),
        cbound_res=per_layer(np.where(compute >= mem_res, t_res, 0.0)),
        cbound_str=per_layer(np.where(compute >= mem_str, t_str, 0.0)),
        dram_res=per_layer(base_dram), dram_str=per_layer(base_dram + w_dram),
        kernel_s=(a.layer_kernels + params.elementwise_kernels * a.layer_elementwise)
        * params.kernel_overhead_s + a.layer_nodes * params.node_overhead_s,
        comm_s=comm,
        flops=per_layer(a.flops * scale),
        weight_bytes=a.layer_weights * prec.weight_bytes / tp,
        sram_half=w_budget,
    )


def forward_cost(
    graph: LayerGraph,
    device: Device,
    precision: Precision,
    batch: int,
    params: DeviceParams,
    tp: int = 1,
    link: tuple[float, float] | None = None,
) -> ForwardCost:
    """Time of one forward pass of the whole `graph` at `batch` (per device when `tp` > 1)."""
    table = layer_table(graph, device, precision, batch, params, tp, link)
    return table.stage(0, _arrays(graph).n_layers)


def _default_link(device: Device) -> tuple[float, float]:
    """Device-to-device link: the chip-to-chip link if any, else the host link (PCIe)."""
    fig = device.chip_link_bw or device.host_link_bw
    bw = fig.value if fig else 16e9
    return bw, (3e-6 if device.chip_link_bw else 10e-6)


def tp_max_degree(graph: LayerGraph) -> int:
    return _arrays(graph).tp_max_degree


def weight_bytes(graph: LayerGraph, precision: Precision) -> float:
    return _arrays(graph).total_weights * Precisions.of(precision).weight_bytes


def activation_bytes_per_sample(graph: LayerGraph, precision: Precision) -> float:
    """Peak working activation of one sample (largest op's inputs + outputs)."""
    return _arrays(graph).peak_act_per_sample * Precisions.of(precision).act_bytes


def params_dict(p: DeviceParams) -> dict[str, Any]:
    d = asdict(p)
    d["fitted"] = list(p.fitted)
    return d

