"""Capture of an ONNX model into a LayerGraph.

Free input dimensions are fixed (axis 0 to the batch, axis 1 to the sequence length), ONNX
shape inference gives every tensor's shape, then each compute node (Conv, MatMul, Gemm,
Attention, an embedding Gather) starts a layer and the elementwise and reshaping nodes after it
join that layer. Parameters are the initializers; weights are never loaded (external data stays
on disk).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
from onnx import helper, shape_inference

from kcloud.errors import CaptureError, one_line
from kcloud.graph.layergraph import Layer, LayerGraph, Op, OpClass, TPGroup, TPStyle

_COMPUTE: dict[str, OpClass] = {
    "Conv": OpClass.CONV, "ConvTranspose": OpClass.CONV, "ConvInteger": OpClass.CONV,
    "QLinearConv": OpClass.CONV, "MatMul": OpClass.MATMUL, "Gemm": OpClass.MATMUL,
    "MatMulInteger": OpClass.MATMUL, "QLinearMatMul": OpClass.MATMUL,
    "Einsum": OpClass.MATMUL, "Attention": OpClass.ATTENTION,
    "MultiHeadAttention": OpClass.ATTENTION, "GroupQueryAttention": OpClass.ATTENTION,
}
_MOVE = frozenset({
    "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Concat", "Split", "Slice",
    "Gather", "GatherElements", "GatherND", "Shape", "Size", "Constant", "ConstantOfShape",
    "Identity", "Cast", "CastLike", "Expand", "Dropout", "Range", "Tile", "Pad",
    "DepthToSpace", "SpaceToDepth", "ScatterND", "ScatterElements", "NonZero", "EyeLike",
})
_FACTORS: dict[str, float] = {
    "LayerNormalization": 8, "SimplifiedLayerNormalization": 6, "RMSNormalization": 6,
    "SkipLayerNormalization": 9, "BatchNormalization": 2, "InstanceNormalization": 8,
    "GroupNormalization": 8, "LpNormalization": 4, "Softmax": 5, "LogSoftmax": 5, "Gelu": 8,
    "FastGelu": 8, "BiasGelu": 9, "Erf": 4, "Tanh": 4, "Sigmoid": 4, "HardSigmoid": 2,
    "Exp": 2, "Log": 2, "HardSwish": 3, "LeakyRelu": 2, "Elu": 4, "Selu": 4, "Softplus": 4,
    "Mish": 6, "Sin": 4, "Cos": 4,
}
_INPUT_BASED = frozenset({
    "GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin",
    "ReduceProd", "ReduceL2", "ReduceL1", "ReduceSumSquare", "ReduceLogSumExp",
})


@dataclass
class _Layer:
    name: str
    kind: str
    nodes: list[onnx.NodeProto] = field(default_factory=list)


def _one_line(exc: BaseException) -> str:
    return one_line(exc)


def _fix_inputs(model: onnx.ModelProto, path: Path, batch: int | None,
                seq_len: int | None) -> None:
    inits = {i.name for i in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in inits or not inp.type.tensor_type.HasField("shape"):
            continue
        for axis, d in enumerate(inp.type.tensor_type.shape.dim):
            fixed = d.HasField("dim_value") and d.dim_value > 0
            if axis == 0 and batch is not None:
                if fixed and d.dim_value != batch:
                    raise CaptureError(
                        f"{path.name} fixes batch {d.dim_value} on input '{inp.name}'",
                        f"export it with a dynamic batch axis to capture batch {batch}, or "
                        f"pass --batch {d.dim_value}",
                    )
                d.dim_value = batch
            elif fixed:
                continue
            elif axis == 0:
                d.dim_value = 1
            elif axis == 1 and seq_len is not None:
                d.dim_value = seq_len
            else:
                label = d.dim_param or "?"
                raise CaptureError(
                    f"input '{inp.name}' of {path.name} has a free dimension '{label}' at "
                    f"axis {axis}",
                    "pass --seq-len for axis 1, or export the model with fixed shapes",
                )


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...] | None]:
    out: dict[str, tuple[int, ...] | None] = {}
    g = model.graph
    for vi in (*g.input, *g.value_info, *g.output):
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            out[vi.name] = None
            continue
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
        out[vi.name] = None if any(d < 0 for d in dims) else tuple(dims)
    for init in g.initializer:
        out[init.name] = tuple(init.dims)
    return out


def _numel(shape: tuple[int, ...] | None) -> int:
    return math.prod(shape) if shape is not None else 0


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _einsum_flops(node: onnx.NodeProto, shapes: dict[str, tuple[int, ...] | None],
                  out_elems: int) -> float:
    eq = _attr(node, "equation", b"")
    eq = eq.decode() if isinstance(eq, bytes) else str(eq)
    lhs, _, rhs = eq.replace(" ", "").partition("->")
    sizes: dict[str, int] = {}
    for term, name in zip(lhs.split(","), node.input, strict=False):
        shape = shapes.get(name)
        if shape is None or "..." in term or len(term) != len(shape):
            return 2.0 * out_elems
        sizes.update(zip(term, shape, strict=True))
    contracted = math.prod(v for k, v in sizes.items() if k not in rhs)
    return 2.0 * out_elems * contracted


def _compute_flops(node: onnx.NodeProto, shapes: dict[str, tuple[int, ...] | None]) -> float:
    op = node.op_type
    ins = [shapes.get(n) if n else None for n in node.input]
    out = shapes.get(node.output[0]) if node.output else None
    out_elems = _numel(out)
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul"):
        a = ins[0]
        return 2.0 * out_elems * a[-1] if a else 0.0
    if op == "Gemm":
        a = ins[0]
        if not a:
            return 0.0
        k = a[0] if _attr(node, "transA", 0) else a[-1]
        return 2.0 * out_elems * k
    if op in ("Conv", "ConvInteger", "QLinearConv"):
        w = ins[3] if op == "QLinearConv" else ins[1]
        return 2.0 * out_elems * math.prod(w[1:]) if w else 0.0
    if op == "ConvTranspose":
        x, w = ins[0], ins[1]
        return 2.0 * _numel(x) * math.prod(w[1:]) if x and w else 0.0
    if op == "Einsum":
        return _einsum_flops(node, shapes, out_elems)
    if op in ("Attention", "MultiHeadAttention", "GroupQueryAttention"):
        q, k = ins[0], ins[1] if len(ins) > 1 else None
        if q is None:
            return 0.0
        if node.domain == "com.microsoft" and op == "Attention" and k is not None:
            b, s, hidden = q  # packed input and QKV weight [hidden, 3 * hidden]
            return 2.0 * b * s * hidden * k[-1] + 4.0 * b * s * s * (k[-1] // 3)
        if k is None:
            return 0.0
        if len(q) == 4:  # [B, heads, S, D]
            return 4.0 * q[0] * q[1] * q[2] * k[2] * q[3]
        return 4.0 * q[0] * q[1] * k[1] * q[2]  # [B, S, hidden]
    return 0.0


def _elementwise_flops(node: onnx.NodeProto, shapes: dict[str, tuple[int, ...] | None]) -> float:
    op = node.op_type
    outs = sum(_numel(shapes.get(o)) for o in node.output)
    ins = [_numel(shapes.get(i)) for i in node.input if i]
    if op in ("MaxPool", "AveragePool", "LpPool"):
        return float(math.prod(_attr(node, "kernel_shape", [1]))) * outs
    if op in _INPUT_BASED:
        return float(sum(ins[:1]))
    return _FACTORS.get(op, 1.0) * max([outs, *ins])


def capture_onnx(path: str | Path, *, batch: int | None = None, seq_len: int | None = None,
                 phase: str | None = None, kv_len: int | None = None,
                 name: str | None = None) -> LayerGraph:
    """Capture an ONNX file; `batch`/`seq_len` fix free input axes 0 and 1."""
    path = Path(path)
    if not path.is_file():
        raise CaptureError(f"no such file: {path}", "check the path")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise CaptureError(f"cannot read {path} as ONNX: {_one_line(exc)}",
                           "check that the file is an ONNX model") from exc
    if not model.graph.node:
        raise CaptureError(f"{path} holds no ONNX graph (no nodes; {path.stat().st_size} bytes)",
                           "check that the file is an exported ONNX model")
    _fix_inputs(model, path, batch, seq_len)
    try:
        model = shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:
        raise CaptureError(f"ONNX shape inference failed on {path.name}: {_one_line(exc)}",
                           "export the model with fixed input shapes") from exc
    g = model.graph
    shapes = _shapes(model)
    inits = {i.name: i for i in g.initializer}
    graph_inputs = [i.name for i in g.input if i.name not in inits]

    layers: list[_Layer] = []
    pending: list[onnx.NodeProto] = []
    for idx, node in enumerate(g.node):
        cls = _op_class(node, inits)
        if cls is not None and cls is not OpClass.ELEMENTWISE:
            if cls.uses_matrix_units and node.output and shapes.get(node.output[0]) is None:
                raise CaptureError(
                    f"cannot infer the output shape of {node.op_type} node "
                    f"'{node.name or idx}' in {path.name}",
                    "export the model with fixed input shapes",
                )
            layers.append(_Layer(node.name or f"{node.op_type}_{idx}", node.op_type,
                                 [*pending, node]))
            pending = []
        elif layers:
            layers[-1].nodes.append(node)
        else:
            pending.append(node)
    if pending or not layers:
        layers.append(_Layer(path.stem, "ops", pending))

    layer_of_tensor: dict[str, int] = dict.fromkeys(graph_inputs, -1)
    for i, layer in enumerate(layers):
        for node in layer.nodes:
            for o in node.output:
                if node.op_type not in ("Constant", "ConstantOfShape"):
                    layer_of_tensor[o] = i
    n = len(layers)
    last_use: dict[str, int] = {}
    for i, layer in enumerate(layers):
        for node in layer.nodes:
            for t in node.input:
                if t in layer_of_tensor:
                    last_use[t] = max(last_use.get(t, -1), i)
    for o in g.output:
        if o.name in layer_of_tensor:
            last_use[o.name] = n
    diff = [0] * (n + 1)
    for t, first in layer_of_tensor.items():
        last = last_use.get(t, first)
        lo = max(first, 0)
        if last > lo:
            diff[lo] += _numel(shapes.get(t))
            diff[last] -= _numel(shapes.get(t))

    owned: set[str] = set()
    out_layers: list[Layer] = []
    acc = 0
    for i, layer in enumerate(layers):
        acc += diff[i]
        params = 0
        for node in layer.nodes:
            for t in node.input:
                if t in inits and t not in owned:
                    owned.add(t)
                    params += _numel(shapes.get(t))
        ops, tp = _layer_ops(layer, shapes, inits)
        out_layers.append(Layer(index=i, name=layer.name, kind=layer.kind, ops=tuple(ops),
                                params=params, cut_elems=acc,
                                nodes=tuple(nd.name for nd in layer.nodes), tp=tuple(tp)))
    first_shape = shapes.get(graph_inputs[0]) if graph_inputs else None
    dtype_bytes = 4
    for init in g.initializer:
        if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                              onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE):
            dtype_bytes = helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
            break
    return LayerGraph(
        model=name or path.name,
        layers=tuple(out_layers),
        batch=first_shape[0] if first_shape else (batch or 1),
        seq_len=seq_len,
        phase=phase or "forward",
        kv_len=kv_len,
        input_elems=sum(_numel(shapes.get(t)) for t in graph_inputs),
        output_elems=sum(_numel(shapes.get(o.name)) for o in g.output),
        capture_dtype_bytes=dtype_bytes,
        meta={
            "is_llm": False, "task": "custom", "source": "onnx",
            "input_shapes": {t: list(shapes.get(t) or ()) for t in graph_inputs},
            "params": sum(layer.params for layer in out_layers),
        },
    )


def _op_class(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> OpClass | None:
    """The class of a node; None for reshaping nodes (no FLOPs, no traffic)."""
    if node.op_type in _COMPUTE:
        return _COMPUTE[node.op_type]
    if node.op_type == "Gather" and node.input and node.input[0] in inits:
        return OpClass.EMBEDDING
    if node.op_type in _MOVE:
        return None
    return OpClass.ELEMENTWISE


def _layer_ops(layer: _Layer, shapes: dict[str, tuple[int, ...] | None],
               inits: dict[str, onnx.TensorProto]) -> tuple[list[Op], list[TPGroup]]:
    ops: list[Op] = []
    tp: list[TPGroup] = []
    ew = [0.0, 0, 0, 0]  # flops, weights, in, out
    for node in layer.nodes:
        cls = _op_class(node, inits)
        if cls is None:
            continue
        weights = sum(_numel(shapes.get(t)) for t in node.input if t in inits)
        in_elems = sum(_numel(shapes.get(t)) for t in node.input if t and t not in inits)
        out_elems = sum(_numel(shapes.get(o)) for o in node.output)
        label = node.name or node.op_type
        if cls is OpClass.ELEMENTWISE:
            ew[0] += _elementwise_flops(node, shapes)
            ew[1] += weights
            ew[2] += in_elems
            ew[3] += out_elems
            continue
        if cls is OpClass.EMBEDDING:
            ops.append(Op(cls, 0.0, min(weights, out_elems), in_elems, out_elems, 0, label))
            continue
        ops.append(Op(cls, _compute_flops(node, shapes), weights, in_elems, out_elems,
                      0, label))
        if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in inits:
            w = shapes.get(node.input[1]) or (1,)
            tp.append(TPGroup(TPStyle.CONV, (label,), (), int(w[0]), weights, out_elems))
    if any(ew):
        ops.append(Op(OpClass.ELEMENTWISE, ew[0], int(ew[1]), int(ew[2]), int(ew[3]), 0,
                      "elementwise"))
    return ops, tp
