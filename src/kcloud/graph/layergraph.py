"""The model as an ordered list of layers: the places where a pipeline may cut.

All counts are for the batch the graph was captured at (`LayerGraph.batch`). Sizes are kept as
element counts, not bytes, so that one graph serves every precision: the cost model multiplies
by `Precision.bytes`. Activation counts scale linearly with batch; weight counts do not.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any


class OpClass(StrEnum):
    MATMUL = "matmul"  # nn.Linear, matmul/bmm (the matrix units)
    CONV = "conv"  # convolutions (matrix units, im2col-like reuse)
    ATTENTION = "attention"  # scaled-dot-product attention (QK^T, softmax, PV)
    ELEMENTWISE = "elementwise"  # activations, normalization, adds, pooling, softmax, reshapes
    EMBEDDING = "embedding"  # gathers from a table

    @property
    def uses_matrix_units(self) -> bool:
        return self in (OpClass.MATMUL, OpClass.CONV, OpClass.ATTENTION)


@dataclass(frozen=True)
class Op:
    """One compute operation inside a layer (elementwise ops may be aggregated into one Op)."""

    op_class: OpClass
    flops: float
    weight_elems: int = 0  # parameters read by this op
    in_elems: int = 0  # activation elements read (KV cache included for decode attention)
    out_elems: int = 0  # activation elements written
    kv_elems: int = 0  # of in_elems, the KV-cache elements read (decode attention)
    name: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TPStyle(StrEnum):
    MLP = "mlp"  # column-parallel Linear followed by row-parallel Linear: one all-reduce
    HEADS = "heads"  # attention heads split (qkv column, out-proj row): one all-reduce
    CONV = "conv"  # conv output channels split: an all-gather of the output
    VOCAB = "vocab"  # embedding / lm-head split over the vocabulary


@dataclass(frozen=True)
class TPGroup:
    """One tensor-parallel shardable group inside a layer."""

    style: TPStyle
    column: tuple[str, ...]  # module paths split along their output dimension
    row: tuple[str, ...]  # module paths split along their input dimension (then all-reduce)
    max_degree: int  # largest degree that divides the split dimension (heads, channels)
    sharded_params: int  # parameters divided among the degree
    comm_elems: int  # activation elements all-reduced / all-gathered per forward at graph.batch


@dataclass(frozen=True)
class Layer:
    index: int
    name: str  # module path, e.g. "layers.3" (or a synthetic name for top-level ops)
    kind: str  # module class name or op kind, e.g. "LlamaDecoderLayer", "Conv2d"
    ops: tuple[Op, ...]
    params: int  # parameters owned by this layer
    cut_elems: int  # elements of every live tensor crossing a cut right after this layer
    nodes: tuple[str, ...] = ()  # fx node names that belong to this layer (for the runtime)
    tp: tuple[TPGroup, ...] = ()

    @property
    def flops(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for op in self.ops:
            out[op.op_class.value] = out.get(op.op_class.value, 0.0) + op.flops
        return out

    @property
    def total_flops(self) -> float:
        return sum(op.flops for op in self.ops)

    @property
    def tp_max_degree(self) -> int:
        """Largest tensor-parallel degree valid for every group in this layer (1 if none)."""
        if not self.tp:
            return 1
        return min(g.max_degree for g in self.tp)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "kind": self.kind,
            "flops": self.flops,
            "total_flops": self.total_flops,
            "params": self.params,
            "cut_elems": self.cut_elems,
            "tp": [
                {"style": g.style.value, "max_degree": g.max_degree, "column": list(g.column),
                 "row": list(g.row), "sharded_params": g.sharded_params,
                 "comm_elems": g.comm_elems}
                for g in self.tp
            ],
            "ops": [op.to_dict() for op in self.ops],
        }


@dataclass(frozen=True)
class LayerGraph:
    model: str
    layers: tuple[Layer, ...]
    batch: int
    seq_len: int | None = None  # tokens per sample (prompt for prefill; 1 for decode)
    phase: str = "forward"  # "forward" | "prefill" | "decode"
    kv_len: int | None = None  # decode: KV-cache length attended over
    input_elems: int = 0  # elements of the model inputs at graph.batch
    output_elems: int = 0  # elements of the model outputs at graph.batch
    capture_dtype_bytes: int = 4  # element size of the captured module's parameters
    meta: Mapping[str, Any] = field(default_factory=dict)  # model config facts (heads, layers, ...)

    def __post_init__(self) -> None:
        object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled with its meta as a plain dict (a mapping proxy does not pickle); the graph
        # cache stores graphs this way.
        return (LayerGraph, (self.model, self.layers, self.batch, self.seq_len, self.phase,
                             self.kv_len, self.input_elems, self.output_elems,
                             self.capture_dtype_bytes, dict(self.meta)))

    @property
    def total_flops(self) -> float:
        return sum(layer.total_flops for layer in self.layers)

    @property
    def total_params(self) -> int:
        return sum(layer.params for layer in self.layers)

    def total_weight_bytes(self, bytes_per_elem: float | None = None) -> float:
        b = self.capture_dtype_bytes if bytes_per_elem is None else bytes_per_elem
        return self.total_params * b

    def flops_by_class(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for layer in self.layers:
            for k, v in layer.flops.items():
                out[k] = out.get(k, 0.0) + v
        return out

    def ops(self) -> Iterable[Op]:
        for layer in self.layers:
            yield from layer.ops

    def to_dict(self, with_ops: bool = False) -> dict[str, Any]:
        layers = []
        for layer in self.layers:
            d = layer.to_dict()
            if not with_ops:
                d.pop("ops")
            layers.append(d)
        return {
            "model": self.model,
            "batch": self.batch,
            "seq_len": self.seq_len,
            "phase": self.phase,
            "kv_len": self.kv_len,
            "layers": layers,
            "total_flops": self.total_flops,
            "total_params": self.total_params,
            "total_weight_bytes": self.total_weight_bytes(),
            "flops_by_class": self.flops_by_class(),
            "meta": dict(self.meta),
        }

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(**kw))


def _rebuild(cls: type[LayerGraph], fields: dict[str, Any]) -> LayerGraph:
    return cls(**{k: v for k, v in fields.items() if k in cls.__dataclass_fields__})
