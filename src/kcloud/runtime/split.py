"""Cutting a module into pipeline stages at a plan's layer boundaries.

The module is traced with the same rules as capture (`trace_layers`), so layer i here is layer
i of the LayerGraph the plan was made from. Each stage is an fx GraphModule that takes the
tensors crossing the cut before it (the previous stage's outputs, skip connections included)
and returns those the stages after it need, always as a tuple.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.split_module import split_module

from kcloud.errors import KCloudError
from kcloud.graph.layering import trace_layers


@dataclass
class SplitModel:
    """A module cut into stages; `stages[k]` maps the tuple from stage k-1 to its own tuple.

    The first stage takes the model's inputs; the last returns a one-element tuple holding the
    model's output (a tensor or a structure of tensors).
    """

    stages: list[nn.Module]
    bounds: list[tuple[int, int]]  # layer range of each stage
    n_layers: int

    def run(self, *inputs: Any) -> Any:
        """All stages in sequence on this process (the reference pipeline)."""
        x: tuple[Any, ...] = tuple(inputs)
        for st in self.stages:
            x = st(*x)
        return x[0]

    def stage_inputs(self, *inputs: Any) -> list[tuple[Any, ...]]:
        """The tuple each stage receives when the model runs on `inputs`."""
        out: list[tuple[Any, ...]] = []
        x: tuple[Any, ...] = tuple(inputs)
        with torch.no_grad():
            for st in self.stages:
                out.append(x)
                x = st(*x)
        return out


def n_layers(module: nn.Module, example_inputs: tuple[Any, ...]) -> int:
    """How many layers the runtime's cut (and the LayerGraph) has for this module."""
    _, layers = trace_layers(module, example_inputs)
    return len(layers)


def split_model(
    module: nn.Module,
    example_inputs: tuple[Any, ...],
    bounds: Sequence[tuple[int, int]],
) -> SplitModel:
    """Cut `module` into one stage per `(start, end)` layer range (contiguous, covering all)."""
    gm, layers = trace_layers(module, example_inputs)
    n = len(layers)
    bounds = [(int(a), int(b)) for a, b in bounds]
    if not bounds or bounds[0][0] != 0 or bounds[-1][1] != n:
        raise KCloudError(
            f"the plan's stages cover layers [{bounds[0][0] if bounds else 0}, "
            f"{bounds[-1][1] if bounds else 0}) but the model has {n} layers",
            "re-create the plan for this model with `kcloud plan`")
    for (_, e), (s, _) in itertools.pairwise(bounds):
        if e != s:
            raise KCloudError(f"stages are not contiguous at layer {e}",
                              "make each stage start where the previous one ends")
    stage_of_layer = [0] * n
    for k, (s, e) in enumerate(bounds):
        for i in range(s, e):
            stage_of_layer[i] = k
    part: dict[str, int] = {}
    for li, names in enumerate(layers):
        for name in names:
            part[name] = stage_of_layer[li]

    # Nodes in no layer (e.g. get_attr with no user) join the stage of their first user, or 0.
    def callback(node: fx.Node) -> int:
        if node.name in part:
            return part[node.name]
        users = [part[u.name] for u in node.users if u.name in part]
        return min(users) if users else 0

    split = split_module(gm, module, callback, keep_original_order=True)
    subs: dict[int, fx.GraphModule] = {}
    for node in split.graph.nodes:
        if node.op == "call_module" and node.target.startswith("submod_"):
            subs[int(node.target.split("_")[1])] = getattr(split, node.target)
    missing = [k for k in range(len(bounds)) if k not in subs]
    if missing:
        raise KCloudError(f"stage {missing[0]} of the plan holds no operations of the model",
                          "re-create the plan with `kcloud plan`")
    stages = _chain(split, subs, len(bounds))
    return SplitModel(stages=stages, bounds=bounds, n_layers=n)


def _chain(split: fx.GraphModule, subs: dict[int, fx.GraphModule], k: int) -> list[nn.Module]:
    """Rewrite the top-level graph of `split_module` as a chain: each stage receives one tuple
    with every value a later stage (or the output) needs, and passes along what it does not use.
    """
    graph = split.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    calls = {int(n.target.split("_")[1]): n for n in graph.nodes
             if n.op == "call_module" and str(n.target).startswith("submod_")}
    output = next(n for n in graph.nodes if n.op == "output")
    # Values: placeholders, submodule calls (maybe tuples), getitems of them.
    producer: dict[fx.Node, int] = {p: -1 for p in placeholders}
    for n in graph.nodes:
        if n.op == "call_module" and n in calls.values():
            producer[n] = int(str(n.target).split("_")[1])
        elif n.op == "call_function" and n.args and n.args[0] in producer and \
                isinstance(n.args[0], fx.Node) and n.args[0].op == "call_module":
            producer[n] = producer[n.args[0]]

    def inputs_of(node: fx.Node) -> list[fx.Node]:
        return list(node.all_input_nodes)

    # need[j]: values (not produced by stage j itself) that stage j or later consumers read.
    consumers: dict[fx.Node, int] = {}  # last stage index reading each value (k = the output)
    for j in range(k):
        for v in inputs_of(calls[j]):
            consumers[v] = max(consumers.get(v, -1), j)
    for v in output.all_input_nodes:
        consumers[v] = k
    # Values flowing into stage j: produced before j, consumed at j or later.
    carried: list[list[fx.Node]] = []
    for j in range(k + 1):
        carried.append([v for v in graph.nodes if v in consumers and v in producer
                        and producer[v] < j <= consumers[v]])
    stages: list[nn.Module] = []
    for j in range(k):
        consts = {a: _fetch(split, str(a.target)) for a in calls[j].all_input_nodes
                  if a.op == "get_attr"}
        stages.append(_ChainStage(subs[j], calls[j], carried[j], carried[j + 1], output,
                                  consts, last=j == k - 1))
    return stages


class _ChainStage(nn.Module):
    """A stage of the chain: (values carried in) -> (values carried out)."""

    def __init__(self, sub: fx.GraphModule, call: fx.Node, into: list[fx.Node],
                 out: list[fx.Node], output: fx.Node, consts: dict[fx.Node, Any],
                 last: bool) -> None:
        super().__init__()
        self.sub = sub
        pos = {v: i for i, v in enumerate(into)}
        # Arguments: a carried value (index >= 0) or a constant of the model (buffer const_i).
        self._args: list[tuple[str, int | str]] = []
        for a in call.args:
            if a in consts:
                name = f"const_{len(self._args)}"
                value = consts[a]  # type: ignore[index]
                if isinstance(value, torch.Tensor):
                    self.register_buffer(name, value, persistent=False)
                else:
                    setattr(self, name, value)
                self._args.append(("const", name))
            else:
                self._args.append(("in", pos[a]))  # type: ignore[index]
        if call.kwargs:
            raise KCloudError("a stage takes keyword inputs", "report this model")
        # Each carried-out value is either carried in (index), the call's whole result, or an
        # item of it.
        self._out: list[tuple[str, int]] = []
        for v in out:
            if v in pos:
                self._out.append(("in", pos[v]))
            elif v is call:
                self._out.append(("whole", 0))
            else:
                self._out.append(("item", int(v.args[1])))  # type: ignore[arg-type]
        self._last = last
        if last:
            names = {v: i for i, v in enumerate(out)}
            self._template = output.args[0]
            self._names = names

    def sub_args(self, *carried: Any) -> tuple[Any, ...]:
        """The arguments the split submodule `sub` is called with."""
        return tuple(carried[i] if how == "in" else getattr(self, i)  # type: ignore[index]
                     for how, i in self._args)

    def forward(self, *carried: Any) -> tuple[Any, ...]:
        res = self.sub(*self.sub_args(*carried))
        vals = []
        for how, i in self._out:
            if how == "in":
                vals.append(carried[i])
            elif how == "whole":
                vals.append(res)
            else:
                vals.append(res[i])
        if self._last:
            env = dict(zip(self._names, vals, strict=True))
            return (fx.node.map_arg(self._template, lambda n: env[n]),)
        return tuple(vals)


def _fetch(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def flat_tensors(value: Any) -> list[torch.Tensor]:
    """The tensors in a (possibly nested) output, in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in flat_tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in flat_tensors(v)]
    return []
