"""Cutting a traced graph into layers, and finding its tensor-parallel groups.

Layers are contiguous runs of fx nodes in graph (topological) order. A node belongs to the
"unit" that runs it: a child of a container (nn.ModuleList / nn.Sequential / nn.ModuleDict)
that holds composite modules (a transformer block, a ResNet bottleneck, a U-Net stage), or a
top-level module (embedding, stem, final norm, head); modules that hold such containers deeper
down are opened. Top-level functional ops join the layer before them (the first layer if none).
A unit with no parameters and only elementwise work (ReLU, pooling, dropout) joins the layer
before it. Two layers joined by one tensor-parallel group (a column Linear in one, its row
Linear in the next) become one layer, so that every group lies inside one layer.

Tensor-parallel groups are found from the graph: a Linear whose input comes, through
pointwise and reshaping ops only, from other Linears alone is the row half of an MLP pair
(Megatron column -> row); one whose input comes from F.scaled_dot_product_attention, whose
q, k and v come from Linears the same way, is the out-projection of a head-split attention.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch.fx as fx
from torch import nn

from kcloud.graph.fxtrace import (
    CONTAINERS,
    Kind,
    LayerTracer,
    NodeClass,
    classify,
    fetch_attr,
    module_path,
    tensor_dependent,
    trace,
)
from kcloud.graph.layergraph import TPStyle


@dataclass
class LayerSpec:
    name: str
    kind: str
    units: list[str]
    nodes: list[fx.Node]


@dataclass(frozen=True)
class TPCandidate:
    style: TPStyle
    column: tuple[fx.Node, ...]
    row: tuple[fx.Node, ...]
    attention: tuple[fx.Node, ...] = ()

    @property
    def nodes(self) -> tuple[fx.Node, ...]:
        return self.column + self.row + self.attention


@dataclass
class Structure:
    """A traced module cut into layers."""

    gm: fx.GraphModule
    root: nn.Module
    classes: dict[fx.Node, NodeClass]
    dependent: set[fx.Node]
    layers: list[LayerSpec]
    tp: list[TPCandidate]
    layer_of: dict[fx.Node, int] = field(default_factory=dict)


def analyze(module: nn.Module, n_inputs: int | None = None) -> Structure:
    """Trace `module` and cut it into layers (deterministic: same module, same cut)."""
    gm = trace(module, n_inputs)
    classes = classify(gm)
    dependent = tensor_dependent(gm, classes)
    unit_of = _unit_resolver(module)
    specs = _runs(gm, classes, unit_of, module)
    specs = _merge_trivial(specs, classes, module)
    tp = find_tp_candidates(gm, classes, dependent)
    specs = _merge_for_tp(specs, tp)
    specs = _place_constants(gm, specs)
    for spec in specs:
        spec.name, spec.kind = _describe(spec, module)
    _unique_names(specs)
    layer_of = {n: i for i, spec in enumerate(specs) for n in spec.nodes}
    return Structure(gm, module, classes, dependent, specs, tp, layer_of)


def trace_layers(
    module: nn.Module, example_inputs: tuple[object, ...] | None = None
) -> tuple[fx.GraphModule, list[list[str]]]:
    """The fx GraphModule of `module` and the node names of each layer, in order.

    The same tracer and rules as `capture`, so the cut matches the captured LayerGraph layer
    for layer. Placeholders and the output node belong to no layer; get_attr nodes go with the
    layer of their first user.
    """
    s = analyze(module, None if example_inputs is None else len(example_inputs))
    return s.gm, [[n.name for n in spec.nodes] for spec in s.layers]


# ---- units ---------------------------------------------------------------------------------


def _unit_resolver(root: nn.Module) -> Callable[[str], str | None]:
    tracer = LayerTracer()
    composite: dict[int, bool] = {}
    below: dict[int, bool] = {}

    def is_composite(m: nn.Module) -> bool:
        key = id(m)
        if key not in composite:
            has_children = next(iter(m.children()), None) is not None
            composite[key] = has_children and not tracer.is_leaf_module(m, "")
        return composite[key]

    def is_block_container(m: nn.Module) -> bool:
        return isinstance(m, CONTAINERS) and any(is_composite(c) for c in m.children())

    def has_block_container_below(m: nn.Module) -> bool:
        key = id(m)
        if key not in below:
            below[key] = any(is_block_container(d) for d in m.modules() if d is not m)
        return below[key]

    def opened(m: nn.Module, parent: nn.Module | None) -> bool:
        if parent is None or isinstance(m, CONTAINERS):
            return True
        if is_block_container(parent):
            return False  # a block: the unit itself
        return is_composite(m) and has_block_container_below(m)

    cache: dict[str, str | None] = {}

    def unit_of(path: str) -> str | None:
        if path in cache:
            return cache[path]
        unit: str | None = None
        if path:
            cur: nn.Module = root
            parent: nn.Module | None = None
            prefix: list[str] = []
            for part in path.split("."):
                if not opened(cur, parent):
                    break
                child = cur._modules.get(part)
                if child is None:
                    break
                parent, cur = cur, child
                prefix.append(part)
            unit = ".".join(prefix) or None
        cache[path] = unit
        return unit

    return unit_of


def _runs(
    gm: fx.GraphModule,
    classes: dict[fx.Node, NodeClass],
    unit_of: Callable[[str], str | None],
    root: nn.Module,
) -> list[LayerSpec]:
    runs: list[LayerSpec] = []
    pending: list[fx.Node] = []
    for node in gm.graph.nodes:
        if classes[node].kind in (Kind.INPUT, Kind.OUTPUT, Kind.CONST):
            continue
        path = module_path(node)
        unit = unit_of(path) if path else None
        if unit is None:
            if runs:
                runs[-1].nodes.append(node)
            else:
                pending.append(node)
        elif runs and runs[-1].units == [unit]:
            runs[-1].nodes.append(node)
        else:
            runs.append(LayerSpec(unit, "", [unit], [*pending, node]))
            pending = []
    if pending or not runs:
        runs.append(LayerSpec(type(root).__name__, "", [], pending))
    return runs


def _unit_params(root: nn.Module, units: Iterable[str]) -> int:
    total = 0
    for u in units:
        try:
            m = root.get_submodule(u)
        except AttributeError:
            continue
        total += sum(p.numel() for p in m.parameters())
    return total


def _merge_trivial(
    specs: list[LayerSpec], classes: dict[fx.Node, NodeClass], root: nn.Module
) -> list[LayerSpec]:
    """Parameter-free, elementwise-only runs join the run before (or after) them."""
    free = (Kind.POINTWISE, Kind.REDUCE, Kind.MOVE, Kind.SHAPE)

    def trivial(s: LayerSpec) -> bool:
        return _unit_params(root, s.units) == 0 and all(
            classes[n].kind in free for n in s.nodes
        )

    out: list[LayerSpec] = []
    carry: list[LayerSpec] = []
    for s in specs:
        if trivial(s) and out:
            out[-1].nodes.extend(s.nodes)
            out[-1].units.extend(u for u in s.units if u not in out[-1].units)
        elif trivial(s):
            carry.append(s)
        else:
            for c in carry:
                s.nodes[:0] = c.nodes
                s.units[:0] = [u for u in c.units if u not in s.units]
            carry = []
            out.append(s)
    if carry:  # nothing but trivial runs
        merged = carry[0]
        for c in carry[1:]:
            merged.nodes.extend(c.nodes)
            merged.units.extend(c.units)
        out.append(merged)
    return out


def _merge_for_tp(specs: list[LayerSpec], tp: list[TPCandidate]) -> list[LayerSpec]:
    index = {n: i for i, s in enumerate(specs) for n in s.nodes}
    spans = []
    for cand in tp:
        idx = [index[n] for n in cand.nodes if n in index]
        if idx and min(idx) != max(idx):
            spans.append((min(idx), max(idx)))
    if not spans:
        return specs
    spans.sort()
    merged: list[tuple[int, int]] = []
    for lo, hi in spans:
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    out: list[LayerSpec] = []
    i = 0
    for lo, hi in merged:
        out.extend(specs[i:lo])
        head = specs[lo]
        for s in specs[lo + 1 : hi + 1]:
            head.nodes.extend(s.nodes)
            head.units.extend(u for u in s.units if u not in head.units)
        out.append(head)
        i = hi + 1
    out.extend(specs[i:])
    return out


def _place_constants(gm: fx.GraphModule, specs: list[LayerSpec]) -> list[LayerSpec]:
    """get_attr nodes join the layer of their first user; nodes keep graph order."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    index = {n: i for i, s in enumerate(specs) for n in s.nodes}
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        users = sorted((u for u in node.users if u in index), key=order.__getitem__)
        target = index[users[0]] if users else 0
        specs[target].nodes.append(node)
    for s in specs:
        s.nodes.sort(key=order.__getitem__)
    return specs


def _describe(spec: LayerSpec, root: nn.Module) -> tuple[str, str]:
    owners = [u for u in spec.units if _unit_params(root, [u]) > 0] or spec.units
    if not owners:
        return spec.name, "ops"
    name = "+".join(owners) if len(owners) <= 3 else f"{owners[0]}..{owners[-1]}"
    try:
        kind = type(root.get_submodule(owners[0])).__name__
    except AttributeError:
        kind = "ops"
    return name, kind


def _unique_names(specs: list[LayerSpec]) -> None:
    seen: dict[str, int] = {}
    for s in specs:
        k = seen.get(s.name, 0) + 1
        seen[s.name] = k
        if k > 1:
            s.name = f"{s.name}#{k}"


# ---- tensor parallelism --------------------------------------------------------------------


def _sdpa_qkv(node: fx.Node) -> list[fx.Node] | None:
    names = ("query", "key", "value")
    out = []
    for i, name in enumerate(names):
        a = node.args[i] if len(node.args) > i else node.kwargs.get(name)
        if not isinstance(a, fx.Node):
            return None
        out.append(a)
    return out


class _Backtrace:
    """Follows a tensor back through pointwise and reshaping ops to its sources."""

    def __init__(self, classes: dict[fx.Node, NodeClass], dependent: set[fx.Node]) -> None:
        self.classes = classes
        self.dependent = dependent

    def sources(
        self, start: fx.Node, stop: tuple[Kind, ...], reshapes: bool = True
    ) -> tuple[list[fx.Node], set[fx.Node]] | None:
        """The `stop`-kind nodes `start` is computed from, and the nodes in between; None if
        the path crosses anything else (a norm, a reduction, a model input). Without
        `reshapes`, only moves that keep the feature axis in place may be crossed."""
        found: list[fx.Node] = []
        visited: set[fx.Node] = set()
        stack = [start]
        seen: set[fx.Node] = set()
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            kind = self.classes[n].kind
            if kind in stop:
                found.append(n)
            elif n not in self.dependent:
                continue  # constants, shapes, positions
            elif kind is Kind.POINTWISE or (
                kind is Kind.MOVE and (reshapes or self.classes[n].same_layout)
            ):
                visited.add(n)
                stack.extend(n.all_input_nodes)
            else:
                return None
        return found, visited


def _users_inside(
    nodes: Iterable[fx.Node], inside: set[fx.Node], classes: dict[fx.Node, NodeClass]
) -> bool:
    for n in nodes:
        for u in n.users:
            if u in inside or classes[u].kind in (Kind.SHAPE, Kind.OUTPUT):
                continue
            return False
    return True


def _heads_columns(
    bt: _Backtrace, attn: list[fx.Node], inside: set[fx.Node]
) -> list[fx.Node] | None:
    """The Linears that q, k and v of every attention node come from (None if any does not)."""
    columns: list[fx.Node] = []
    for a in attn:
        qkv = _sdpa_qkv(a)
        if qkv is None:
            return None
        for t in qkv:
            sub = bt.sources(t, (Kind.LINEAR,))
            if sub is None or not sub[0]:
                return None
            inside |= sub[1]
            columns.extend(c for c in sub[0] if c not in columns)
    return columns


def find_tp_candidates(
    gm: fx.GraphModule, classes: dict[fx.Node, NodeClass], dependent: set[fx.Node]
) -> list[TPCandidate]:
    """Megatron-style MLP pairs and head-split attention, from the graph structure."""
    bt = _Backtrace(classes, dependent)
    used: set[fx.Node] = set()
    out: list[TPCandidate] = []
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in gm.graph.nodes:
        kind = classes[node].kind
        if kind is Kind.ATTENTION and node.op == "call_module":  # nn.MultiheadAttention
            used.add(node)
            out.append(TPCandidate(TPStyle.HEADS, (node,), (node,), (node,)))
            continue
        first = node.args[0] if node.args else None
        if kind is not Kind.LINEAR or node in used or not isinstance(first, fx.Node):
            continue
        # `node` is the row half if its input comes from column Linears (an MLP) or from
        # attention fed by Linears (heads), through elementwise ops and moves only.
        traced = bt.sources(first, (Kind.LINEAR, Kind.ATTENTION))
        if traced is None:
            continue
        sources, inside = traced
        attn = [n for n in sources if classes[n].kind is Kind.ATTENTION]
        linears = [n for n in sources if classes[n].kind is Kind.LINEAR]
        if attn and not linears and all(a.op == "call_function" for a in attn):
            style = TPStyle.HEADS  # heads are merged back by reshapes before the out-proj
            columns = _heads_columns(bt, attn, inside)
        elif linears and not attn:
            style = TPStyle.MLP  # the feature axis must stay in place between the pair
            strict = bt.sources(first, (Kind.LINEAR,), reshapes=False)
            columns = linears if strict is not None else None
        else:
            continue
        if columns is None:
            continue
        group = set(columns) | set(attn)
        members = inside | group
        if group & used or node in group or not _users_inside(members, members | {node},
                                                             classes):
            continue
        columns.sort(key=order.__getitem__)
        used |= group | {node}
        out.append(TPCandidate(style, tuple(columns), (node,), tuple(attn)))
    return out


def node_params(gm: fx.GraphModule, node: fx.Node) -> list[nn.Parameter]:
    """Parameters a node reads directly (its leaf module's, or get_attr parameters)."""
    if node.op == "call_module":
        return list(gm.get_submodule(str(node.target)).parameters())
    params = []
    for i in node.all_input_nodes:
        if i.op == "get_attr":
            obj = fetch_attr(gm, str(i.target))
            if isinstance(obj, nn.Parameter):
                params.append(obj)
    return params
