"""Baselines the search is compared with, costed by the same model and placed the same way.

- `data-parallel`: the whole model on every single device of the best type (no pipeline, no
  tensor parallelism), replicated.
- `megatron-uniform`: one device type, a uniform grid of tp x pp (pp stages with equal layer
  counts, every stage tp-way tensor parallel), the same grid in every replica; the best over
  types, degrees and micro-batches.
- `gpu-only`: the full search restricted to the cluster's GPUs.

Each meets the same goal (SLO, power cap, device budget, domestic share) or is infeasible.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator

from kcloud.errors import KCloudError
from kcloud.hardware.cluster import Cluster
from kcloud.hardware.device import DeviceKind
from kcloud.planner.api import Outcome, make_plan
from kcloud.planner.assign import build_plan
from kcloud.planner.dp import Path
from kcloud.planner.evaluate import Mix, Template
from kcloud.planner.goal import Goal, InfeasibleGoal
from kcloud.planner.model import ModelGraphs
from kcloud.planner.search import (
    Context,
    copies,
    fits_alone,
    in_flight_of,
    make_context,
    with_own_count,
)
from kcloud.planner.space import INTRA, NET

BASELINES: tuple[str, ...] = ("data-parallel", "megatron-uniform", "gpu-only")


def _uniform(ctx: Context, b: int, t: int, tp: int, pp: int) -> Path | None:
    sp = ctx.space(b)
    L = sp.L
    o = next((x.index for x in sp.options if x.type == t and x.tp == tp), None)
    if o is None or pp > L:
        return None
    bounds = [round(k * L / pp) for k in range(pp + 1)]
    stages = tuple((o, i, j) for i, j in itertools.pairwise(bounds))
    # an LLM's stages hold the KV cache of the pipeline's micro-batches in flight, as the
    # search's pipelines do
    if any(not sp.fits_in_flight(o, i, j, in_flight_of(pp)) for _, i, j in stages):
        return None
    cap = sp.types[t].node_cap
    links, fill = [], tp
    for _ in stages[1:]:
        if fill + tp <= cap:
            links.append(INTRA)
            fill += tp
        else:
            links.append(NET)
            fill = tp
    return Path(stages, tuple(links))


def _grid(ctx: Context, data_parallel: bool) -> Iterator[Template]:
    for b in ctx.micro_batches:
        sp = ctx.space(b)
        for ty in ctx.types:
            tps = (1,) if data_parallel else ty.tps
            for tp in tps:
                most = 1 if data_parallel else min(sp.L, ty.count // tp)
                for pp in range(1, most + 1):
                    p = _uniform(ctx, b, ty.index, tp, pp)
                    if p is not None:
                        yield ctx.evaluate(b, p)


def _best_uniform(ctx: Context, templates: list[Template]) -> Mix | None:
    """The best plan made of copies of one template (as the objective ranks them): one copy
    for latency, else as many as the device counts and the constraints allow."""
    best: Mix | None = None
    for t in templates:
        if not ctx.meets_slo(t) or not fits_alone(ctx, t):
            continue
        mix = Mix(((t, 1 if ctx.goal.objective == "latency" else copies(ctx, t)),))
        if best is None or mix.objective(ctx.goal.objective) < best.objective(
                ctx.goal.objective) * (1 - 1e-12):
            best = mix
    return best


def run_baseline(name: str, model: ModelGraphs, cluster: Cluster, goal: Goal) -> Outcome:
    """Plan with baseline `name`; raises KCloudError when it cannot meet the goal."""
    if name == "gpu-only":
        if not any(d.kind is DeviceKind.GPU for d in cluster.device_types.values()):
            raise InfeasibleGoal(f"gpu-only: cluster {cluster.name} has no GPU")
        return make_plan(model, cluster, goal, allow=lambda d: d.kind is DeviceKind.GPU)
    if name not in BASELINES:
        raise KCloudError(f"unknown baseline '{name}'", f"use one of: {', '.join(BASELINES)}")
    t0 = time.perf_counter()
    ctx = make_context(model, cluster, goal)
    mix = _best_uniform(ctx, list(_grid(ctx, data_parallel=name == "data-parallel")))
    if mix is None:
        why = ("the model fits no single device" if name == "data-parallel" and not any(
            True for _ in _grid(ctx, True)) else "no such plan meets the goal")
        raise InfeasibleGoal(f"{name}: {why}")
    plan = build_plan(ctx, Mix(tuple((with_own_count(ctx, t), n) for t, n in mix.parts)))
    return Outcome(plan, None, time.perf_counter() - t0)


def compare(model: ModelGraphs, cluster: Cluster, goal: Goal,
            names: tuple[str, ...] = BASELINES,
            run: Callable[[str, ModelGraphs, Cluster, Goal], Outcome] = run_baseline
            ) -> list[dict[str, object]]:
    """One row per baseline: its predicted figures, or why it is infeasible."""
    rows: list[dict[str, object]] = []
    for name in names:
        try:
            out = run(name, model, cluster, goal)
        except KCloudError as exc:
            rows.append({"name": name, "infeasible": exc.problem})
            continue
        rows.append({"name": name, **out.plan.predicted.to_dict(),
                     "devices": len(out.plan.devices), "replicas": len(out.plan.replicas),
                     "micro_batch": out.plan.micro_batch})
    return rows
