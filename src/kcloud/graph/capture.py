"""Capture of a PyTorch module into a LayerGraph.

The module is traced with torch.fx (see `fxtrace`), cut into layers (see `layering`), then run
node by node on its example inputs. With a module built under `torch.device("meta")` and meta
inputs, nothing is computed and no weight is held: each node yields only its output shape.

FLOPs per node: matrix products, convolutions and attention are counted by torch's own
formulas (`torch.utils.flop_counter`) on the aten ops the node dispatches to; elementwise work
is the number of elements times a small per-op factor (norm ~6-8, GELU 8, add 1, pooling the
kernel size); views, reshapes and concatenation count nothing (runtimes fuse or alias them).
A layer's elementwise nodes are summed into one `elementwise` Op.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from kcloud.errors import CaptureError, one_line
from kcloud.graph.fxtrace import Kind, fetch_attr, linear_weight, module_path
from kcloud.graph.layergraph import Layer, LayerGraph, Op, OpClass, TPGroup, TPStyle
from kcloud.graph.layering import Structure, TPCandidate, analyze, node_params

_aten = torch.ops.aten
_ATEN_CLASS: dict[Any, OpClass] = {
    _aten.convolution: OpClass.CONV,
    _aten._convolution: OpClass.CONV,
    _aten.cudnn_convolution: OpClass.CONV,
    _aten.convolution_overrideable: OpClass.CONV,
    _aten._slow_conv2d_forward: OpClass.CONV,
    _aten._scaled_dot_product_efficient_attention: OpClass.ATTENTION,
    _aten._scaled_dot_product_flash_attention: OpClass.ATTENTION,
    _aten._scaled_dot_product_cudnn_attention: OpClass.ATTENTION,
    _aten._flash_attention_forward: OpClass.ATTENTION,
    _aten._efficient_attention_forward: OpClass.ATTENTION,
}
_NO_COUNT = frozenset({
    _aten.size.default, _aten.sym_size.default, _aten.stride.default, _aten.sym_stride.default,
    _aten.numel.default, _aten.sym_numel.default, _aten.dim.default,
    _aten.is_contiguous.default, _aten.storage_offset.default, torch.ops.prim.layout.default,
    torch.ops.prim.device.default,
})
_KIND_CLASS = {
    Kind.LINEAR: OpClass.MATMUL,
    Kind.MATMUL: OpClass.MATMUL,
    Kind.CONV: OpClass.CONV,
    Kind.ATTENTION: OpClass.ATTENTION,
    Kind.EMBEDDING: OpClass.EMBEDDING,
}


class CaptureRunError(CaptureError):
    """The traced module failed to run on its example inputs (e.g. a data-dependent op on the
    meta device); building it with real tensors may succeed."""


class _FlopCounter(TorchDispatchMode):
    """Counts FLOPs of the aten ops run under it, with torch's registered formulas."""

    def __init__(self) -> None:
        super().__init__()
        self.flops: dict[OpClass, float] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _NO_COUNT:
            return func(*args, **kwargs)
        packet = func._overloadpacket
        if packet not in flop_registry:
            with self:
                r = func.decompose(*args, **kwargs)
            if r is not NotImplemented:
                return r
        out = func(*args, **kwargs)
        formula = flop_registry.get(packet)
        if formula is not None:
            cls = _ATEN_CLASS.get(packet, OpClass.MATMUL)
            self.flops[cls] = self.flops.get(cls, 0.0) + float(
                formula(*args, **kwargs, out_val=out)
            )
        return out


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)) and not isinstance(value, torch.Size):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _tensors(v)


@dataclass
class _Info:
    elems: int
    shapes: list[tuple[int, ...]]
    flops: dict[OpClass, float] = field(default_factory=dict)


class _Propagator(fx.Interpreter):
    def __init__(self, s: Structure) -> None:
        super().__init__(s.gm)
        self.s = s
        self.info: dict[fx.Node, _Info] = {}
        self.counter = _FlopCounter()

    def run_node(self, n: fx.Node) -> Any:
        count = self.s.classes[n].kind.is_compute
        if count:
            self.counter.flops = {}
            with self.counter:
                result = super().run_node(n)
        else:
            result = super().run_node(n)
        ts = list(_tensors(result))
        self.info[n] = _Info(
            sum(t.numel() for t in ts),
            [tuple(t.shape) for t in ts],
            dict(self.counter.flops) if count else {},
        )
        return result


def _one_line(exc: BaseException, limit: int = 300) -> str:
    return one_line(exc, limit).split(" While executing ")[0]


def analyze_module(module: nn.Module, n_inputs: int | None, name: str) -> Structure:
    """Trace and cut `module`, turning tracer failures into a CaptureError."""
    try:
        return analyze(module, n_inputs)
    except Exception as exc:
        raise CaptureError(
            f"cannot trace {name} with torch.fx: {_one_line(exc)}",
            "move data-dependent Python control flow out of forward(), or export the model to "
            "ONNX and pass the .onnx file",
        ) from exc


def capture(
    module: nn.Module,
    example_inputs: tuple[Any, ...],
    *,
    name: str,
    batch: int,
    seq_len: int | None = None,
    phase: str = "forward",
    kv_len: int | None = None,
    meta: Mapping[str, Any] | None = None,
) -> LayerGraph:
    """Capture `module` run on `example_inputs` into a LayerGraph.

    Build the module under `torch.device("meta")` and pass meta example inputs to hold no
    weights: shapes propagate, nothing is computed. A module with real weights is run for real.
    """
    if not isinstance(example_inputs, tuple):
        example_inputs = tuple(example_inputs) if isinstance(example_inputs, list) else (
            example_inputs,
        )
    s = analyze_module(module, len(example_inputs), name)
    prop = _Propagator(s)
    try:
        with torch.no_grad():
            prop.run(*example_inputs)
    except Exception as exc:
        raise CaptureRunError(
            f"cannot run {name} on its example inputs: {_one_line(exc)}",
            "check the example inputs' shapes and dtypes against forward()",
        ) from exc
    return _build(s, prop.info, example_inputs, name=name, batch=batch, seq_len=seq_len,
                  phase=phase, kv_len=kv_len, meta=dict(meta or {}))


# ---- building the graph --------------------------------------------------------------------


def _dtype_bytes(module: nn.Module) -> int:
    for t in (*module.parameters(), *module.buffers()):
        if t.is_floating_point():
            return t.element_size()
    return 4


def _build(
    s: Structure,
    info: dict[fx.Node, _Info],
    example_inputs: tuple[Any, ...],
    *,
    name: str,
    batch: int,
    seq_len: int | None,
    phase: str,
    kv_len: int | None,
    meta: dict[str, Any],
) -> LayerGraph:
    n_layers = len(s.layers)
    cuts = _cut_elems(s, info, n_layers)
    # Token tables: embeddings indexed by the model inputs (not by positions or constants).
    vocab_sizes = {
        int(params[0].shape[0])
        for node in s.gm.graph.nodes
        if _is_token_embedding(s, node) and (params := node_params(s.gm, node))
    }
    tp_by_layer: dict[int, list[TPCandidate]] = {}
    for cand in s.tp:
        tp_by_layer.setdefault(s.layer_of[cand.row[0]], []).append(cand)

    seen_params: set[int] = set()
    layers: list[Layer] = []
    for i, spec in enumerate(s.layers):
        params = 0
        for p in _layer_params(s, spec.units, spec.nodes):
            if id(p) not in seen_params:
                seen_params.add(id(p))
                params += p.numel()
        ops = _layer_ops(s, info, spec.nodes, phase)
        tp = _layer_tp(s, info, spec.nodes, tp_by_layer.get(i, []), vocab_sizes)
        layers.append(Layer(
            index=i, name=spec.name, kind=spec.kind, ops=tuple(ops), params=params,
            cut_elems=cuts[i], nodes=tuple(n.name for n in spec.nodes), tp=tuple(tp),
        ))
    out_node = next(n for n in s.gm.graph.nodes if n.op == "output")
    return LayerGraph(
        model=name,
        layers=tuple(layers),
        batch=batch,
        seq_len=seq_len,
        phase=phase,
        kv_len=kv_len,
        input_elems=sum(t.numel() for t in _tensors(example_inputs)),
        output_elems=info[out_node].elems,
        capture_dtype_bytes=_dtype_bytes(s.root),
        meta=meta,
    )


def _layer_params(s: Structure, units: list[str], nodes: list[fx.Node]) -> Iterator[nn.Parameter]:
    for u in units:
        try:
            yield from s.root.get_submodule(u).parameters()
        except AttributeError:
            continue
    for n in nodes:
        if n.op == "call_module":
            yield from node_params(s.gm, n)
        elif n.op == "get_attr":
            obj = fetch_attr(s.gm, str(n.target))
            if isinstance(obj, nn.Parameter):
                yield obj


def _cut_elems(s: Structure, info: dict[fx.Node, _Info], n_layers: int) -> list[int]:
    """Elements live across the cut after each layer (the last: the model outputs)."""
    diff = [0] * (n_layers + 1)
    for node in s.gm.graph.nodes:
        kind = s.classes[node].kind
        if kind in (Kind.CONST, Kind.SHAPE, Kind.OUTPUT) or node not in info:
            continue
        elems = info[node].elems
        if not elems:
            continue
        first = -1 if kind is Kind.INPUT else s.layer_of.get(node, -1)
        last = first
        for u in node.users:
            last = max(last, n_layers if u.op == "output" else s.layer_of.get(u, first))
        lo = max(first, 0)
        if last > lo:
            diff[lo] += elems
            diff[last] -= elems
    out, acc = [], 0
    for i in range(n_layers):
        acc += diff[i]
        out.append(acc)
    return out


def _activation_inputs(s: Structure, info: dict[fx.Node, _Info], node: fx.Node) -> int:
    total = 0
    for i in node.all_input_nodes:
        kind = s.classes[i].kind
        if kind is Kind.SHAPE or i not in info:
            continue
        if kind is Kind.CONST and isinstance(fetch_attr(s.gm, str(i.target)), nn.Parameter):
            continue
        total += info[i].elems
    return total


def _layer_ops(
    s: Structure, info: dict[fx.Node, _Info], nodes: list[fx.Node], phase: str
) -> list[Op]:
    ops: list[Op] = []
    ew_flops = 0.0
    ew_w = ew_in = ew_out = 0
    for n in nodes:
        c = s.classes[n]
        if c.kind in (Kind.CONST, Kind.SHAPE, Kind.MOVE) or n not in info:
            continue
        out_elems = info[n].elems
        in_elems = _activation_inputs(s, info, n)
        weights = sum(p.numel() for p in node_params(s.gm, n))
        label = _label(n)
        if c.kind.is_elementwise or (c.kind is Kind.OTHER and not info[n].flops):
            if c.basis == "out":
                base = out_elems
            elif c.basis == "in":
                base = in_elems
            else:
                base = max([out_elems] + [info[i].elems for i in n.all_input_nodes
                                          if i in info and s.classes[i].kind is not Kind.SHAPE])
            ew_flops += (c.factor or 1.0) * base
            ew_w += weights
            ew_in += in_elems
            ew_out += out_elems
            continue
        counted = info[n].flops
        if c.kind is Kind.OTHER:
            for j, (cls, f) in enumerate(sorted(counted.items())):
                ops.append(Op(cls, f, weights if j == 0 else 0, in_elems if j == 0 else 0,
                              out_elems if j == 0 else 0, 0, label))
            continue
        flops = sum(counted.values())
        kv = 0
        if c.kind is Kind.LINEAR and flops == 0:
            _, w, _ = linear_weight(s.gm, n)
            flops = 2.0 * out_elems * int(w.shape[-1])
        elif c.kind is Kind.EMBEDDING:
            weights = min(weights, out_elems)  # rows gathered, not the whole table
            flops = 0.0
        elif c.kind is Kind.ATTENTION and phase == "decode" and n.op == "call_function":
            kv = sum(info[t].elems for t in _qkv(n)[1:] if t in info)
        ops.append(Op(_KIND_CLASS[c.kind], flops, weights, in_elems, out_elems, kv, label))
    if ew_flops or ew_in or ew_out:
        ops.append(Op(OpClass.ELEMENTWISE, ew_flops, ew_w, ew_in, ew_out, 0, "elementwise"))
    return ops


def _label(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    path = module_path(node)
    fn = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return f"{path}.{fn}" if path and fn else node.name


def _qkv(node: fx.Node) -> list[fx.Node]:
    out = []
    for i, key in enumerate(("query", "key", "value")):
        a = node.args[i] if len(node.args) > i else node.kwargs.get(key)
        if isinstance(a, fx.Node):
            out.append(a)
    return out


def _heads(info: dict[fx.Node, _Info], node: fx.Node) -> int | None:
    shapes = [info[t].shapes[0] for t in _qkv(node) if t in info and info[t].shapes]
    if len(shapes) < 2 or any(len(sh) < 3 for sh in shapes):
        return None
    return math.gcd(shapes[0][-3], shapes[1][-3])


def _linear_info(s: Structure, node: fx.Node) -> tuple[str, int, int]:
    """(path, output features, parameters split along the output dimension)."""
    path, w, b = linear_weight(s.gm, node)
    return path, int(w.shape[0]), w.numel() + (b.numel() if b is not None else 0)


def _layer_tp(
    s: Structure,
    info: dict[fx.Node, _Info],
    nodes: list[fx.Node],
    cands: list[TPCandidate],
    vocab_sizes: set[int],
) -> list[TPGroup]:
    groups: list[TPGroup] = []
    taken: set[fx.Node] = set()
    for cand in cands:
        taken |= set(cand.nodes)
        comm = sum(info[r].elems for r in cand.row if r in info)
        if cand.style is TPStyle.HEADS and s.classes[cand.row[0]].kind is Kind.ATTENTION:
            m = s.gm.get_submodule(str(cand.row[0].target))  # an nn.MultiheadAttention
            groups.append(TPGroup(TPStyle.HEADS, (str(cand.row[0].target),),
                                  (str(cand.row[0].target),), int(m.num_heads),
                                  sum(p.numel() for p in m.parameters()), comm))
            continue
        cols = [_linear_info(s, c) for c in cand.column]
        row_path, _, _ = _linear_info(s, cand.row[0])
        _, row_w, _ = linear_weight(s.gm, cand.row[0])
        sharded = sum(c[2] for c in cols) + row_w.numel()
        if cand.style is TPStyle.HEADS:
            heads = [h for a in cand.attention if (h := _heads(info, a)) is not None]
            degree = math.gcd(*heads) if heads else 1
        else:
            degree = math.gcd(*(c[1] for c in cols))
        groups.append(TPGroup(cand.style, tuple(c[0] for c in cols), (row_path,),
                              max(degree, 1), sharded, comm))
    convs = [n for n in nodes if s.classes[n].kind is Kind.CONV and n not in taken]
    if convs:
        paths, channels, sharded = [], [], 0
        for n in convs:
            out_ch = _conv_out_channels(s, n)
            if out_ch is None:
                continue
            paths.append(str(n.target) if n.op == "call_module" else n.name)
            channels.append(out_ch)
            sharded += sum(p.numel() for p in node_params(s.gm, n))
        if paths:
            groups.append(TPGroup(TPStyle.CONV, tuple(paths), (), math.gcd(*channels), sharded,
                                  sum(info[n].elems for n in convs if n in info)))
    for n in nodes:
        params = node_params(s.gm, n)
        if n in taken or not _is_token_embedding(s, n) or not params:
            continue
        table = params[0]
        path = str(n.target) if n.op == "call_module" else n.name
        groups.append(TPGroup(TPStyle.VOCAB, (), (path,), int(table.shape[0]), table.numel(),
                              info[n].elems if n in info else 0))
    for n in nodes:
        if s.classes[n].kind is not Kind.LINEAR or n in taken:
            continue
        path, out_features, sharded = _linear_info(s, n)
        if out_features in vocab_sizes and out_features > 1:
            groups.append(TPGroup(TPStyle.VOCAB, (path,), (), out_features, sharded,
                                  info[n].elems if n in info else 0))
    return groups


def _is_token_embedding(s: Structure, node: fx.Node) -> bool:
    if s.classes[node].kind is not Kind.EMBEDDING or not node.args:
        return False
    index = node.args[0]
    return isinstance(index, fx.Node) and index in s.dependent


def _conv_out_channels(s: Structure, node: fx.Node) -> int | None:
    if node.op == "call_module":
        m = s.gm.get_submodule(str(node.target))
        return int(m.out_channels)
    w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    if not (isinstance(w, fx.Node) and w.op == "get_attr"):
        return None
    t = fetch_attr(s.gm, str(w.target))
    if not isinstance(t, torch.Tensor):
        return None
    if "transpose" in str(getattr(node.target, "__name__", "")):
        groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
        return int(t.shape[1]) * int(groups)
    return int(t.shape[0])
