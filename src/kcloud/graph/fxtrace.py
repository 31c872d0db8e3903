"""Tracing a module with torch.fx, and what each traced node does.

The tracer keeps the standard layers (Linear, Conv, Embedding, norms, activations, pooling,
dropout, attention) as leaves, so that a graph node is either one of those layers, a tensor
function (F.scaled_dot_product_attention, torch.matmul, torch.cat, ...), a tensor method or an
attribute read. `classify` sorts the nodes by what they cost; it looks at the graph alone (no
shapes), so a runtime that re-traces a real module gets the same answer.
"""

from __future__ import annotations

import inspect
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.dropout import _DropoutNd
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.modules.pooling import (
    _AdaptiveAvgPoolNd,
    _AdaptiveMaxPoolNd,
    _AvgPoolNd,
    _LPPoolNd,
    _MaxPoolNd,
)

_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
    nn.Softplus, nn.Softsign, nn.Softshrink, nn.Hardshrink, nn.Tanhshrink, nn.Threshold,
    nn.LogSigmoid, nn.GLU, nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.Softmax2d,
)
_NORMS: tuple[type[nn.Module], ...] = (
    nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, _BatchNorm, _InstanceNorm, nn.LocalResponseNorm,
)
_POOLS: tuple[type[nn.Module], ...] = (
    _MaxPoolNd, _AvgPoolNd, _AdaptiveAvgPoolNd, _AdaptiveMaxPoolNd, _LPPoolNd,
)
_RESHAPES: tuple[type[nn.Module], ...] = (
    _DropoutNd, nn.Flatten, nn.Unflatten, nn.Identity, nn.PixelShuffle, nn.PixelUnshuffle,
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d,
    nn.ConstantPad3d, nn.ChannelShuffle,
)

# The standard layers the tracer never enters.
STANDARD_LEAVES: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Bilinear, _ConvNd, nn.Embedding, nn.EmbeddingBag, nn.MultiheadAttention,
    nn.RNNBase, nn.Upsample, *_ACTIVATIONS, *_NORMS, *_POOLS, *_RESHAPES,
)

CONTAINERS: tuple[type[nn.Module], ...] = (nn.ModuleList, nn.Sequential, nn.ModuleDict)


class LayerTracer(fx.Tracer):
    """torch.fx tracer whose leaves are the standard layers (and torch.nn's own modules)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, STANDARD_LEAVES):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace(module: nn.Module, n_inputs: int | None = None) -> fx.GraphModule:
    """Symbolically trace `module`; forward() arguments past the first `n_inputs` that have a
    default keep it (so `mask=None` is not traced as a tensor)."""
    concrete: dict[str, Any] = {}
    if n_inputs is not None:
        params = list(inspect.signature(module.forward).parameters.values())
        for i, p in enumerate(params):
            if i >= n_inputs and p.default is not inspect.Parameter.empty and p.kind in (
                inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY
            ):
                concrete[p.name] = p.default
    tracer = LayerTracer()
    graph = tracer.trace(module, concrete_args=concrete or None)
    name = type(module).__name__
    return fx.GraphModule(tracer.root, graph, name)


class Kind(StrEnum):
    """What a traced node costs."""

    INPUT = "input"  # placeholder
    OUTPUT = "output"
    CONST = "const"  # get_attr: a parameter, buffer or constant
    SHAPE = "shape"  # a non-tensor value: sizes, dtypes, devices, arithmetic on them
    MOVE = "move"  # views, reshapes, concatenation, tensor creation: no FLOPs, no traffic
    LINEAR = "linear"  # activation x weight matrix (nn.Linear, F.linear)
    MATMUL = "matmul"  # other matrix products (torch.matmul, bmm, einsum, @)
    CONV = "conv"
    ATTENTION = "attention"  # F.scaled_dot_product_attention, nn.MultiheadAttention
    EMBEDDING = "embedding"
    POINTWISE = "pointwise"  # elementwise per output element: activations, add, mul, ...
    REDUCE = "reduce"  # elementwise work across a dimension: norms, softmax, pooling, sums
    OTHER = "other"  # a leaf module of unknown kind (LSTM, a user leaf): FLOPs from aten ops

    @property
    def is_compute(self) -> bool:
        return self in _COMPUTE

    @property
    def is_elementwise(self) -> bool:
        return self in (Kind.POINTWISE, Kind.REDUCE)


_COMPUTE = frozenset(
    {Kind.LINEAR, Kind.MATMUL, Kind.CONV, Kind.ATTENTION, Kind.EMBEDDING, Kind.OTHER}
)


@dataclass(frozen=True)
class NodeClass:
    kind: Kind
    factor: float = 0.0  # FLOPs per element for elementwise work
    basis: str = "max"  # elements the factor applies to: "max" (largest of in/out), "out", "in"
    same_layout: bool = False  # a MOVE that keeps every element where it is (dropout, casts)


_SHAPE_ATTRS = frozenset(
    {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout", "is_meta"}
)
_SHAPE_METHODS = frozenset(
    {"size", "dim", "numel", "nelement", "element_size", "stride", "get_device",
     "is_contiguous", "is_floating_point", "data_ptr"}
)
_MOVE_NAMES = frozenset(
    {"view", "reshape", "permute", "transpose", "contiguous", "expand", "expand_as", "split",
     "chunk", "flatten", "unflatten", "unsqueeze", "squeeze", "to", "type", "type_as", "float",
     "half", "bfloat16", "double", "int", "long", "bool", "repeat", "repeat_interleave",
     "narrow", "select", "t", "clone", "detach", "view_as", "reshape_as", "getitem", "cat",
     "concat", "concatenate", "stack", "hstack", "vstack", "split_with_sizes", "movedim",
     "swapaxes", "unbind", "tensor_split", "dropout", "dropout1d", "dropout2d", "dropout3d",
     "alpha_dropout", "feature_alpha_dropout", "identity", "pad", "arange", "zeros", "ones",
     "full", "empty", "rand", "randn", "randint", "tensor", "as_tensor", "zeros_like",
     "ones_like", "full_like", "empty_like", "rand_like", "randn_like", "eye", "triu", "tril",
     "linspace", "pixel_shuffle", "pixel_unshuffle", "roll", "flip", "gather", "index_select",
     "masked_select", "take_along_dim", "broadcast_to", "tile", "fill_", "zero_", "copy_",
     "requires_grad_", "cpu", "cuda", "new_zeros", "new_ones", "new_empty", "new_full",
     "new_tensor", "mT", "T", "H", "mH", "real"}
)
# Moves that leave each element in place (dropout at inference, casts, copies).
_SAME_LAYOUT_NAMES = frozenset(
    {"to", "type", "type_as", "float", "half", "bfloat16", "double", "contiguous", "clone",
     "detach", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
     "feature_alpha_dropout", "identity", "requires_grad_", "cpu", "cuda"}
)
_MATMUL_NAMES = frozenset(
    {"matmul", "mm", "bmm", "einsum", "baddbmm", "addmm", "addbmm", "tensordot", "outer",
     "bilinear", "inner", "kron", "mv", "addmv", "dot", "vdot"}
)
_CONV_NAMES = frozenset(
    {"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"}
)
_POOL_NAMES = frozenset(
    {"max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
     "lp_pool1d", "lp_pool2d", "lp_pool3d"}
)
_ADAPTIVE_POOL_NAMES = frozenset(
    {"adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
     "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d"}
)
_REDUCE_NAMES = frozenset(
    {"softmax", "log_softmax", "softmin", "layer_norm", "rms_norm", "group_norm", "batch_norm",
     "instance_norm", "local_response_norm", "normalize", "mean", "sum", "var", "std",
     "var_mean", "std_mean", "amax", "amin", "max", "min", "norm", "logsumexp", "cumsum",
     "cumprod", "prod", "argmax", "argmin", "topk", "sort", "argsort", "glu", "any", "all",
     "count_nonzero", "cross_entropy", "nll_loss", "mse_loss"}
)
# FLOPs per element; anything unnamed costs 1.
_FACTORS: dict[str, float] = {
    "layer_norm": 8, "layernorm": 8, "rms_norm": 6, "rmsnorm": 6, "group_norm": 8,
    "groupnorm": 8, "instance_norm": 8, "local_response_norm": 8, "batch_norm": 2,
    "normalize": 4, "softmax": 5, "log_softmax": 5, "softmin": 5, "softmax2d": 5,
    "logsoftmax": 5, "gelu": 8, "silu": 4, "swish": 4, "sigmoid": 4, "logsigmoid": 5,
    "tanh": 4, "mish": 6, "elu": 4, "selu": 4, "celu": 4, "softplus": 4, "hardswish": 3,
    "hardsigmoid": 2, "leaky_relu": 2, "leakyrelu": 2, "prelu": 2, "rrelu": 2, "glu": 5,
    "erf": 4, "exp": 2, "log": 2, "cos": 4, "sin": 4, "var": 3, "std": 4, "var_mean": 4,
    "std_mean": 4, "logsumexp": 4, "cross_entropy": 6, "mse_loss": 3, "softsign": 3,
}
_SHAPE_FUNCS = frozenset(
    {operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv,
     operator.mod, operator.neg, operator.getitem, operator.eq, operator.ne, operator.lt,
     operator.le, operator.gt, operator.ge, len, int, float, max, min}
)


def fetch_attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _name_of(target: Any) -> str:
    """A function's or method's bare name: `relu_` -> relu, `_softmax` -> softmax."""
    return str(getattr(target, "__name__", None) or target).strip("_")


def _pool_factor(kernel: Any) -> float:
    if isinstance(kernel, int):
        return float(kernel)
    if isinstance(kernel, Sequence) and all(isinstance(k, int) for k in kernel):
        return float(math.prod(kernel))
    return 1.0


def _classify_module(m: nn.Module) -> NodeClass:
    if isinstance(m, nn.Linear):
        return NodeClass(Kind.LINEAR)
    if isinstance(m, nn.Bilinear):
        return NodeClass(Kind.MATMUL)
    if isinstance(m, _ConvNd):
        return NodeClass(Kind.CONV)
    if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
        return NodeClass(Kind.EMBEDDING)
    if isinstance(m, nn.MultiheadAttention):
        return NodeClass(Kind.ATTENTION)
    if isinstance(m, _RESHAPES):
        return NodeClass(Kind.MOVE, same_layout=isinstance(m, (_DropoutNd, nn.Identity)))
    if isinstance(m, (_MaxPoolNd, _AvgPoolNd, _LPPoolNd)):
        return NodeClass(Kind.REDUCE, _pool_factor(m.kernel_size), "out")
    if isinstance(m, (_AdaptiveAvgPoolNd, _AdaptiveMaxPoolNd)):
        return NodeClass(Kind.REDUCE, 1.0, "in")
    cls = type(m).__name__.lower()
    if isinstance(m, _NORMS):
        key = "batch_norm" if isinstance(m, _BatchNorm) else cls
        return NodeClass(Kind.REDUCE, _FACTORS.get(key, 8.0))
    if isinstance(m, (nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.Softmax2d, nn.GLU)):
        return NodeClass(Kind.REDUCE, _FACTORS.get(cls, 5.0))
    if isinstance(m, _ACTIVATIONS):
        return NodeClass(Kind.POINTWISE, _FACTORS.get(cls, 1.0))
    if isinstance(m, nn.Upsample):
        return NodeClass(Kind.POINTWISE, 1.0, "out")
    return NodeClass(Kind.OTHER)


def _classify_named(name: str, node: fx.Node) -> NodeClass:
    if name in _MATMUL_NAMES:
        return NodeClass(Kind.MATMUL)
    if name in _CONV_NAMES:
        return NodeClass(Kind.CONV)
    if name == "embedding":
        return NodeClass(Kind.EMBEDDING)
    if name == "scaled_dot_product_attention":
        return NodeClass(Kind.ATTENTION)
    if name in _MOVE_NAMES:
        return NodeClass(Kind.MOVE, same_layout=name in _SAME_LAYOUT_NAMES)
    if name in _POOL_NAMES:
        kernel = node.args[1] if len(node.args) > 1 else node.kwargs.get("kernel_size", 1)
        return NodeClass(Kind.REDUCE, _pool_factor(kernel), "out")
    if name in _ADAPTIVE_POOL_NAMES:
        return NodeClass(Kind.REDUCE, 1.0, "in")
    if name in _REDUCE_NAMES:
        return NodeClass(Kind.REDUCE, _FACTORS.get(name, 1.0))
    return NodeClass(Kind.POINTWISE, _FACTORS.get(name, 1.0))


def classify(gm: fx.GraphModule) -> dict[fx.Node, NodeClass]:
    """The class of every node of `gm`, from the graph structure alone."""
    modules = dict(gm.named_modules())
    out: dict[fx.Node, NodeClass] = {}
    for node in gm.graph.nodes:
        inputs = node.all_input_nodes
        if node.op == "placeholder":
            c = NodeClass(Kind.INPUT)
        elif node.op == "output":
            c = NodeClass(Kind.OUTPUT)
        elif node.op == "get_attr":
            c = NodeClass(Kind.CONST)
        elif node.op == "call_module":
            c = _classify_module(modules[node.target])
        elif node.op == "call_method":
            name = _name_of(node.target)
            if node.target in _SHAPE_METHODS:
                c = NodeClass(Kind.SHAPE)
            elif node.target == "__getitem__" or name == "getitem":
                src = out.get(inputs[0]) if inputs else None
                c = NodeClass(Kind.SHAPE if src and src.kind is Kind.SHAPE else Kind.MOVE)
            else:
                c = _classify_named(name, node)
        else:  # call_function
            target = node.target
            if target is getattr:
                attr = node.args[1] if len(node.args) > 1 else ""
                c = NodeClass(Kind.SHAPE if attr in _SHAPE_ATTRS else Kind.MOVE)
            elif target in _SHAPE_FUNCS and all(
                out[i].kind is Kind.SHAPE for i in inputs
            ):
                c = NodeClass(Kind.SHAPE)
            elif target is F.linear:
                w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
                is_weight = isinstance(w, fx.Node) and w.op == "get_attr"
                c = NodeClass(Kind.LINEAR if is_weight else Kind.MATMUL)
            elif target is operator.matmul:
                c = NodeClass(Kind.MATMUL)
            else:
                c = _classify_named(_name_of(target), node)
        out[node] = c
    return out


def tensor_dependent(gm: fx.GraphModule, classes: dict[fx.Node, NodeClass]) -> set[fx.Node]:
    """Nodes whose value depends on the model inputs' data (not only on their shapes)."""
    dep: set[fx.Node] = set()
    for node in gm.graph.nodes:
        kind = classes[node].kind
        if kind is Kind.INPUT:
            dep.add(node)
        elif kind in (Kind.CONST, Kind.SHAPE):
            continue
        elif any(i in dep for i in node.all_input_nodes):
            dep.add(node)
    return dep


def module_path(node: fx.Node) -> str | None:
    """The module a node runs in ("" for the root), or None for nodes with no place."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return "" if node.op in ("call_function", "call_method") else None
    last = next(reversed(stack.values()))
    return str(last[0]) if isinstance(last, tuple) else str(last)


def linear_weight(gm: fx.GraphModule, node: fx.Node) -> tuple[str, torch.Tensor, Any]:
    """(module path, weight, bias) of a LINEAR node."""
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        return str(node.target), m.weight, getattr(m, "bias", None)
    w = node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
    b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    assert isinstance(w, fx.Node)
    target = str(w.target)
    bias = fetch_attr(gm, str(b.target)) if isinstance(b, fx.Node) and b.op == "get_attr" else None
    return target.rpartition(".")[0] or target, fetch_attr(gm, target), bias
