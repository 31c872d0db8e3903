"""Tensor-parallel (Megatron-style) sharding of a stage across its device group.

For each MLP or attention-heads group of the stage's layers (`TPGroup`, found at capture), the
`column` Linears keep 1/tp of their output features (weight rows and bias), the `row` Linears
keep 1/tp of their input features; a row Linear sums its partial product over the group
(all-reduce) and then adds its bias once. Heads are split whole (q by heads, k and v by KV
heads, so grouped-query attention keeps its head-to-KV-head mapping).

Convolutions (a `conv` group: every nn.Conv1d/nn.Conv2d of a layer) each keep 1/tp of their
output channels and all-gather their output along the channel dimension, so what follows them
(BatchNorm, activations, residual adds) sees the whole tensor. A vocabulary group splits a
token embedding by rows (each rank looks up the ids in its range, zeros elsewhere, then an
all-reduce sums the parts) or a vocabulary head Linear by output features (then an all-gather
along the last dimension). Their outputs are whole again, so these need no following below.

The traced graph bakes sizes into view/reshape/unflatten/expand arguments (heads, hidden); the
layout found here rewrites those constants for the local shard. It is found in the driver from
the stage's full shapes (one shape propagation on real inputs) and follows every tensor that
carries a sharded dimension from the column outputs to the row inputs; an operation it cannot
follow (a reduction over the sharded dimension, a split of a fused projection) leaves the stage
unsharded, and the caller runs it whole.

Everything else in a tensor-parallel stage (norms, pooling, positional embeddings, other
Linears) runs replicated on every rank of the group: the same input, the same output.
"""

from __future__ import annotations

import math
import operator
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from kcloud.errors import KCloudError
from kcloud.graph.layergraph import LayerGraph, TPGroup, TPStyle

SHARDED_STYLES = (TPStyle.MLP, TPStyle.HEADS, TPStyle.CONV, TPStyle.VOCAB)
_CONV_TYPES = (nn.Conv1d, nn.Conv2d)


class ShardError(Exception):
    """A stage the sharding pass cannot follow (the stage then runs whole)."""


class CollectiveError(RuntimeError):
    """A collective (all-reduce, all-gather) of a tensor-parallel group failed (a peer
    stopped)."""


@dataclass(frozen=True)
class ShardLayout:
    """How every rank of a tensor-parallel group cuts one stage (plain data: it travels to
    the workers, which apply it to the stage they rebuild)."""

    tp: int
    columns: tuple[str, ...]  # stage submodule attributes split along output features
    rows: tuple[str, ...]  # split along input features; all-reduce of their output
    rewrites: tuple[tuple[str, tuple[int, ...], int], ...]  # (node, argument path, new size)
    groups: tuple[str, ...]  # what is sharded, e.g. "heads layers.0.attn.o_proj"
    # Convolutions split along output channels and vocabulary heads along output features;
    # each all-gathers its output.
    gathers: tuple[str, ...] = ()
    vocab: tuple[str, ...] = ()  # token embeddings split by rows; all-reduce of their output


def stage_groups(graph: LayerGraph, start: int, end: int) -> list[TPGroup]:
    """The groups of layers [start, end) that the runtime shards: MLP pairs, Linear heads,
    convolutions and vocabularies (nn.MultiheadAttention, whose projections are one module,
    stays replicated)."""
    return [g for layer in graph.layers[start:end] for g in layer.tp if _runs_sharded(g)]


def _runs_sharded(g: TPGroup) -> bool:
    if g.style not in SHARDED_STYLES:
        return False
    if g.style is TPStyle.CONV:
        return bool(g.column) and not g.row
    if g.style is TPStyle.VOCAB:
        return len(g.column) + len(g.row) == 1
    return bool(g.row and g.column and g.row != g.column)


def check_degree(groups: Sequence[TPGroup], tp: int, where: str) -> None:
    """One-line error when `tp` does not divide a group's heads, features, channels or
    vocabulary; it names the tightest such group (the one that limits the degree most)."""
    failing = [g for g in groups if g.max_degree % tp]
    if not failing:
        return
    g = min(failing, key=lambda g: g.max_degree)
    what, path = _describe(g)
    possible = math.gcd(*(g.max_degree for g in groups))
    raise KCloudError(
        f"{where} has tensor-parallel degree {tp}, which does not divide the {what} of {path} "
        f"(degrees dividing {possible} are possible)",
        "re-create the plan with `kcloud plan`, or give the stage a device group of a size "
        "that divides them")


def _describe(g: TPGroup) -> tuple[str, str]:
    """What a group splits and where, for messages."""
    if g.style is TPStyle.CONV:
        more = f" (and {len(g.column) - 2} more)" if len(g.column) > 2 else ""
        return "output channels", ", ".join(g.column[:2]) + more
    if g.style is TPStyle.VOCAB:
        return "vocabulary", (g.row or g.column)[0]
    what = "attention heads" if g.style is TPStyle.HEADS else "hidden features"
    return what, g.row[0].rsplit(".", 1)[0] if g.row else g.column[0]


def _attr(path: str) -> str:
    """A module path of the traced model as an attribute of the stage's split submodule."""
    return path.replace(".", "_")


def _module(sub: fx.GraphModule, path: str) -> nn.Module:
    try:
        return sub.get_submodule(_attr(path))
    except AttributeError:
        raise ShardError(f"{path} is not a module of the stage") from None


def _check_gathered(sub: fx.GraphModule, g: TPGroup, tp: int) -> tuple[list[str], list[str]]:
    """(gathers, vocab) of a conv or vocabulary group; raises ShardError."""
    if g.style is TPStyle.VOCAB and g.row:
        path = g.row[0]
        m = _module(sub, path)
        if type(m) is not nn.Embedding:
            raise ShardError(f"{path} is not an nn.Embedding")
        if m.max_norm is not None:
            raise ShardError(f"{path} renormalizes its rows (max_norm)")
        if m.num_embeddings % tp:
            raise ShardError(f"{path} has {m.num_embeddings} rows")
        return [], [_attr(path)]
    for path in g.column:
        m = _module(sub, path)
        if g.style is TPStyle.VOCAB:
            if type(m) is not nn.Linear:
                raise ShardError(f"{path} is not an nn.Linear")
            if m.out_features % tp:
                raise ShardError(f"{path} has {m.out_features} output features")
            continue
        if type(m) not in _CONV_TYPES:
            raise ShardError(f"{path} ({type(m).__name__}) is not an nn.Conv1d or nn.Conv2d")
        assert isinstance(m, nn.Conv1d | nn.Conv2d)
        if m.groups != 1:
            raise ShardError(f"{path} is a grouped convolution")
        if m.padding_mode != "zeros":
            raise ShardError(f"{path} pads with '{m.padding_mode}'")
        if m.out_channels % tp:
            raise ShardError(f"{path} has {m.out_channels} output channels")
    return [_attr(p) for p in g.column], []


def find_layout(sub: fx.GraphModule, args: Sequence[Any], groups: Sequence[TPGroup],
                tp: int) -> ShardLayout:
    """The layout of `sub` (a stage's split submodule) called with `args`; raises ShardError."""
    columns: list[str] = []
    rows: list[str] = []
    gathers: list[str] = []
    vocab: list[str] = []
    for g in groups:
        if g.style in (TPStyle.CONV, TPStyle.VOCAB):
            gs, vs = _check_gathered(sub, g, tp)
            gathers += gs
            vocab += vs
            continue
        for path in (*g.column, *g.row):
            m = _module(sub, path)
            if type(m) is not nn.Linear:
                raise ShardError(f"{path} is not an nn.Linear")
            if path in g.column and m.out_features % tp:
                raise ShardError(f"{path} has {m.out_features} output features")
            if path in g.row and m.in_features % tp:
                raise ShardError(f"{path} has {m.in_features} input features")
        columns += [_attr(p) for p in g.column]
        rows += [_attr(p) for p in g.row]
    labels = tuple(f"{g.style.value} {(g.row or g.column)[0]}" for g in groups)
    if not columns:  # only gathered outputs: nothing sharded to follow
        return ShardLayout(tp=tp, columns=(), rows=(), rewrites=(), groups=labels,
                           gathers=tuple(gathers), vocab=tuple(vocab))
    with torch.no_grad():
        ShapeProp(sub).propagate(*args)
    col_set, row_set = set(columns), set(rows)
    sharded: dict[fx.Node, int] = {}
    rewrites: list[tuple[str, tuple[int, ...], int]] = []
    for node in sub.graph.nodes:
        ins = [a for a in node.all_input_nodes if a in sharded]
        if node.op == "call_module" and node.target in col_set:
            if ins:
                raise ShardError(f"{node.target} reads a sharded tensor")
            sharded[node] = len(_shape(node)) - 1
            continue
        if not ins:
            continue
        if node.op == "call_module" and node.target in row_set:
            x = node.args[0]
            if len(ins) != 1 or ins[0] is not x or sharded[x] != len(_shape(x)) - 1:
                raise ShardError(f"{node.target} is not fed along its input features")
            continue
        d = _follow(sub, node, sharded, tp, rewrites)
        if d is not None:
            sharded[node] = d
    return ShardLayout(tp=tp, columns=tuple(columns), rows=tuple(rows),
                       rewrites=tuple(rewrites), groups=labels, gathers=tuple(gathers),
                       vocab=tuple(vocab))


# ---- following the sharded dimension --------------------------------------------------------

_UNARY = {"relu", "gelu", "silu", "sigmoid", "tanh", "exp", "cos", "sin", "neg", "abs", "sqrt",
          "rsqrt", "contiguous", "clone", "detach", "float", "half", "bfloat16", "to", "type_as",
          "dropout", "erf", "square", "clamp", "softplus", "mish", "hardswish", "leaky_relu",
          "elu", "selu", "celu", "gelu_tanh", "log", "reciprocal"}
_BINARY = {"add", "sub", "mul", "truediv", "div", "pow", "where", "masked_fill", "maximum",
           "minimum", "iadd", "imul", "isub", "itruediv", "floordiv", "radd", "rmul"}
_UNARY_MODULES = (nn.ReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Dropout, nn.Identity,
                  nn.LeakyReLU, nn.Mish, nn.Hardswish, nn.ELU, nn.Softplus)
_NORM_MODULES = (nn.LayerNorm, nn.RMSNorm)


def _shape(node: Any) -> tuple[int, ...]:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    if meta is None or not hasattr(meta, "shape"):
        raise ShardError(f"{getattr(node, 'name', node)} has no tensor shape")
    return tuple(int(s) for s in meta.shape)


def _is_tensor(node: Any) -> bool:
    return isinstance(node, fx.Node) and hasattr(node.meta.get("tensor_meta"), "shape")


def _name(node: fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    return str(getattr(node.target, "__name__", node.target)).lstrip("_")


def _norm(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _follow(sub: fx.GraphModule, node: fx.Node, sharded: dict[fx.Node, int], tp: int,
            rewrites: list[tuple[str, tuple[int, ...], int]]) -> int | None:
    """The sharded dimension of `node`'s output (None: not a tensor carrying one)."""
    name = _name(node)
    if node.op == "output":
        raise ShardError("a sharded tensor leaves the stage")
    if node.op == "call_module":
        m = sub.get_submodule(str(node.target))
        x = node.args[0]
        if isinstance(m, _UNARY_MODULES) and x in sharded:
            return sharded[x]  # type: ignore[index]
        if isinstance(m, _NORM_MODULES) and x in sharded:
            nd = len(_shape(x))
            if sharded[x] < nd - len(m.normalized_shape):  # type: ignore[index]
                return sharded[x]  # type: ignore[index]
        raise ShardError(f"{node.target} ({type(m).__name__}) reads a sharded tensor")
    if node.op not in ("call_function", "call_method"):
        raise ShardError(f"{node.name} reads a sharded tensor")
    x = node.args[0] if node.args else None
    if name in ("size", "dim") or node.target is getattr:
        return None  # sizes of the local shard are what the shard needs
    if not _is_tensor(node):
        raise ShardError(f"{node.name} ({name}) turns a sharded tensor into a non-tensor")
    out = _shape(node)
    if name == "scaled_dot_product_attention":
        q, k, v = node.args[:3]
        dims = {sharded.get(t) for t in (q, k, v)}  # type: ignore[arg-type]
        nd = len(out)
        if dims != {nd - 3}:
            raise ShardError(f"{node.name}: q, k and v are not split by heads")
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        if _is_tensor(mask):
            ms = _shape(mask)
            if len(ms) >= 3 and ms[len(ms) - 3] != 1:
                raise ShardError(f"{node.name}: the attention mask has a heads dimension")
        return nd - 3
    if name in ("transpose", "swapaxes") and x in sharded:
        nd = len(out)
        a, b = _norm(int(node.args[1]), nd), _norm(int(node.args[2]), nd)  # type: ignore[arg-type]
        d = sharded[x]  # type: ignore[index]
        return b if d == a else a if d == b else d
    if name == "permute" and x in sharded:
        dims = node.args[1] if isinstance(node.args[1], (tuple, list)) else node.args[1:]
        nd = len(out)
        return [_norm(int(p), nd) for p in dims].index(sharded[x])  # type: ignore[arg-type,index]
    if name in ("view", "reshape", "unflatten", "flatten", "expand") and x in sharded:
        return _follow_view(node, name, sharded[x], _shape(x), out, tp, rewrites)  # type: ignore[index]
    if name == "getitem" and x in sharded:
        return _follow_index(node, sharded[x], _shape(x))  # type: ignore[index]
    if name in ("cat", "concat", "stack"):
        parts = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        dims = {sharded.get(p) for p in parts}  # type: ignore[union-attr,arg-type]
        if len(dims) != 1 or None in dims:
            raise ShardError(f"{node.name}: joins sharded and whole tensors")
        d = dims.pop()
        assert d is not None
        nd_in = len(_shape(parts[0]))  # type: ignore[index]
        if name == "stack":
            dim = _norm(int(dim), nd_in + 1)  # type: ignore[arg-type]
            return d + 1 if dim <= d else d
        if _norm(int(dim), nd_in) == d:  # type: ignore[arg-type]
            raise ShardError(f"{node.name}: joins along the sharded dimension")
        return d
    if name == "softmax" or name == "log_softmax":
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        d = sharded[x]  # type: ignore[index]
        if dim is None or _norm(int(dim), len(out)) == d:  # type: ignore[arg-type]
            raise ShardError(f"{node.name}: softmax over the sharded dimension")
        return d
    if name in _UNARY or name in _BINARY or node.target in (operator.add, operator.mul,
                                                          operator.sub, operator.truediv):
        return _follow_broadcast(node, sharded, out)
    raise ShardError(f"{node.name} ({name}) reads a sharded tensor")


def _follow_broadcast(node: fx.Node, sharded: dict[fx.Node, int], out: tuple[int, ...]) -> int:
    nd = len(out)
    dims: set[int] = set()
    whole: list[fx.Node] = []
    for a in node.all_input_nodes:
        if a in sharded:
            dims.add(nd - (len(_shape(a)) - sharded[a]))
        elif _is_tensor(a):
            whole.append(a)
    if len(dims) != 1:
        raise ShardError(f"{node.name}: inputs sharded along different dimensions")
    d = dims.pop()
    for a in whole:
        s = _shape(a)
        i = d - (nd - len(s))
        if 0 <= i < len(s) and s[i] != 1:
            raise ShardError(f"{node.name}: combines a sharded tensor with a whole one")
    return d


def _follow_index(node: fx.Node, d: int, in_shape: tuple[int, ...]) -> int:
    idx = node.args[1]
    items = list(idx) if isinstance(idx, tuple) else [idx]
    if any(isinstance(i, (fx.Node, torch.Tensor, list)) for i in items):
        raise ShardError(f"{node.name}: indexes a sharded tensor with tensors")
    n_real = sum(1 for i in items if i is not None and i is not Ellipsis)
    expanded: list[Any] = []
    for i in items:
        if i is Ellipsis:
            expanded += [slice(None)] * (len(in_shape) - n_real)
        else:
            expanded.append(i)
    expanded += [slice(None)] * (len(in_shape) - sum(1 for i in expanded if i is not None))
    dim_in = dim_out = 0
    for i in expanded:
        if i is None:
            dim_out += 1
            continue
        if dim_in == d:
            if i != slice(None):
                raise ShardError(f"{node.name}: slices the sharded dimension")
            return dim_out
        if not isinstance(i, int):
            dim_out += 1
        dim_in += 1
    raise ShardError(f"{node.name}: cannot follow the index")


def _size_path(node: fx.Node, name: str, k: int) -> tuple[int, ...]:
    """Where output size k sits in the arguments of a view/reshape/expand node."""
    if node.kwargs:
        raise ShardError(f"{node.name}: sizes given by keyword")
    if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)):
        return (1, k)
    return (1 + k,)


def _arg_at(args: Any, path: tuple[int, ...]) -> Any:
    for p in path:
        args = args[p]
    return args


def _follow_view(node: fx.Node, name: str, d: int, in_shape: tuple[int, ...],
                 out: tuple[int, ...], tp: int,
                 rewrites: list[tuple[str, tuple[int, ...], int]]) -> int:
    if name == "expand":
        od = d + len(out) - len(in_shape)
        path = _size_path(node, name, od)
    elif name == "unflatten":
        dim = _norm(int(node.args[1]), len(in_shape))  # type: ignore[arg-type]
        sizes = node.args[2]
        if d != dim:
            return d if d < dim else d + len(sizes) - 1  # type: ignore[arg-type]
        od, path = dim, (2, 0)
    else:
        od = _view_dim(node, in_shape, out, d)
        if name == "flatten":
            return od
        path = _size_path(node, name, od)
    if out[od] % tp:
        raise ShardError(f"{node.name}: size {out[od]} is not divisible by {tp}")
    size = _arg_at(node.args, path)
    if isinstance(size, int) and not isinstance(size, bool) and size != -1:
        if size != out[od]:
            raise ShardError(f"{node.name}: unexpected size argument {size}")
        rewrites.append((node.name, path, size // tp))
    elif not (isinstance(size, int) and size == -1):
        raise ShardError(f"{node.name}: computed size along the sharded dimension")
    return od


def _view_dim(node: fx.Node, a: tuple[int, ...], b: tuple[int, ...], d: int) -> int:
    """The output dimension of a view that holds the outer part of input dimension d."""
    i = j = 0
    while i < len(a) or j < len(b):
        gi: list[int] = []
        go: list[int] = []
        pa = pb = 1
        if i < len(a):
            gi.append(i)
            pa *= a[i]
            i += 1
        if j < len(b):
            go.append(j)
            pb *= b[j]
            j += 1
        while pa != pb:
            if pa < pb and i < len(a):
                gi.append(i)
                pa *= a[i]
                i += 1
            elif pb < pa and j < len(b):
                go.append(j)
                pb *= b[j]
                j += 1
            else:
                raise ShardError(f"{node.name}: cannot match the view's dimensions")
        if d in gi:
            if any(a[k] != 1 for k in gi[: gi.index(d)]):
                raise ShardError(f"{node.name}: the view interleaves the shard")
            outer = [k for k in go if b[k] != 1]
            if not outer:
                raise ShardError(f"{node.name}: cannot place the shard")
            return outer[0]
    raise ShardError(f"{node.name}: cannot follow the view")


# ---- applying a layout -----------------------------------------------------------------------


class ParallelShard(nn.Module):
    """A shard whose output goes through a collective over its tensor-parallel group. The
    worker builds it before the process group exists and sets `group` afterwards; the
    (start, end) ns of each collective go to `log`, the stage's all-reduce timeline."""

    def __init__(self, group: Any, log: list[tuple[int, int]]) -> None:
        super().__init__()
        self.group = group
        self.log = log

    def all_reduce(self, y: torch.Tensor) -> torch.Tensor:
        """The sum of `y` over the group."""

        def op(t: torch.Tensor) -> torch.Tensor:
            dist.all_reduce(t, group=self.group)
            return t

        return self._collective(y, op, "all-reduce")

    def all_gather(self, y: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's `y`, concatenated along `dim` in rank order."""

        def op(t: torch.Tensor) -> torch.Tensor:
            t = t.contiguous()
            parts = [torch.empty_like(t) for _ in range(dist.get_world_size(self.group))]
            dist.all_gather(parts, t, group=self.group)
            return torch.cat(parts, dim)

        return self._collective(y, op, "all-gather")

    def _collective(self, y: torch.Tensor, op: Callable[[torch.Tensor], torch.Tensor],
                    what: str) -> torch.Tensor:
        if y.device.type == "cuda":
            torch.cuda.synchronize(y.device)
        t0 = time.perf_counter_ns()
        try:  # the group runs over gloo: a device tensor's collective runs on the host
            out = op(y) if y.device.type == "cpu" else op(y.to("cpu")).to(y.device)
        except Exception as exc:
            raise CollectiveError(f"{what} of the group failed: {exc}") from exc
        self.log.append((t0, time.perf_counter_ns()))
        return out


class RowParallelLinear(ParallelShard):
    """The row half of a group: a Linear over 1/tp of the input features; the partial products
    are summed over the group, then the bias is added (once, the same on every rank)."""

    def __init__(self, in_features: int, out_features: int, bias: bool,
                 group: Any, log: list[tuple[int, int]],
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(group, log)
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


def _shard_params(mod: ParallelShard, full: nn.Module, tp: int) -> None:
    """Give `mod` empty parameters of 1/tp of `full`'s along dimension 0 (same names)."""
    for name in ("weight", "bias"):
        p = getattr(full, name, None)
        shard = None
        if isinstance(p, torch.Tensor):
            shard = nn.Parameter(torch.empty(p.shape[0] // tp, *p.shape[1:], dtype=p.dtype))
        setattr(mod, name, shard)


class GatheredConv(ParallelShard):
    """A convolution over 1/tp of its output channels; the outputs are gathered along the
    channel dimension, so every rank continues with the whole tensor."""

    def __init__(self, conv: nn.Conv1d | nn.Conv2d, tp: int, group: Any,
                 log: list[tuple[int, int]]) -> None:
        super().__init__(group, log)
        _shard_params(self, conv, tp)
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.spatial = len(conv.kernel_size)
        self.op = F.conv1d if isinstance(conv, nn.Conv1d) else F.conv2d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.op(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
        return self.all_gather(y, y.dim() - self.spatial - 1)  # unbatched inputs too


class GatheredLinear(ParallelShard):
    """A vocabulary head over 1/tp of its output features; the outputs are gathered along the
    last dimension."""

    def __init__(self, linear: nn.Linear, tp: int, group: Any,
                 log: list[tuple[int, int]]) -> None:
        super().__init__(group, log)
        _shard_params(self, linear, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.all_gather(F.linear(x, self.weight, self.bias), -1)


class VocabParallelEmbedding(ParallelShard):
    """A token embedding holding 1/tp of the rows: rank r looks up the ids in
    [r * rows, (r + 1) * rows) and gives zeros for the others; the sum over the group is the
    whole lookup."""

    def __init__(self, emb: nn.Embedding, tp: int, group: Any,
                 log: list[tuple[int, int]]) -> None:
        super().__init__(group, log)
        _shard_params(self, emb, tp)
        self.rows = emb.num_embeddings // tp

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - dist.get_rank(self.group) * self.rows
        outside = (local < 0) | (local >= self.rows)
        y = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.all_reduce(y.masked_fill(outside.unsqueeze(-1), 0))


def swap_shards(root: nn.Module, layout: ShardLayout, group: Any,
                log: list[tuple[int, int]]) -> None:
    """Replace the modules of `root` that `layout` shards with their local shards (column and
    row Linears, all-gathered convs and heads, vocabulary-split embeddings); the weights are
    loaded afterwards from `shard_state`."""
    tp = layout.tp

    def put(name: str, make: Callable[[Any], nn.Module]) -> None:
        old = root.get_submodule(name)
        parent, _, child = name.rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, child, make(old))

    for name in layout.columns:
        put(name, lambda m: nn.Linear(m.in_features, m.out_features // tp,
                                      bias=m.bias is not None, dtype=m.weight.dtype))
    for name in layout.rows:
        put(name, lambda m: RowParallelLinear(m.in_features // tp, m.out_features,
                                              m.bias is not None, group, log,
                                              dtype=m.weight.dtype))
    for name in layout.gathers:
        put(name, lambda m: GatheredLinear(m, tp, group, log) if isinstance(m, nn.Linear)
            else GatheredConv(m, tp, group, log))
    for name in layout.vocab:
        put(name, lambda m: VocabParallelEmbedding(m, tp, group, log))


def apply_layout(sub: fx.GraphModule, layout: ShardLayout, group: Any,
                 log: list[tuple[int, int]]) -> None:
    """Replace the stage's sharded modules with their shards (`swap_shards`) and rewrite the
    size constants its traced graph bakes in."""
    swap_shards(sub, layout, group, log)
    nodes = {n.name: n for n in sub.graph.nodes}
    for node_name, path, value in layout.rewrites:
        node = nodes[node_name]
        node.args = _replaced(node.args, path, value)
    sub.recompile()


def _replaced(args: Any, path: tuple[int, ...], value: int) -> Any:
    if not path:
        return value
    items = list(args)
    items[path[0]] = _replaced(items[path[0]], path[1:], value)
    return type(args)(items) if isinstance(args, tuple) else items


def shard_state(state: dict[str, torch.Tensor], layout: ShardLayout, rank: int,
                prefix: str = "sub.") -> dict[str, torch.Tensor]:
    """Rank `rank`'s slice of a stage's full state dict."""
    out = dict(state)
    tp = layout.tp
    for name in (*layout.columns, *layout.gathers, *layout.vocab):  # split along dimension 0
        for p in ("weight", "bias"):
            key = f"{prefix}{name}.{p}"
            if key in out:
                out[key] = out[key].chunk(tp, 0)[rank].clone()
    for name in layout.rows:
        key = f"{prefix}{name}.weight"
        out[key] = out[key].chunk(tp, 1)[rank].clone()
    return out
