"""One call from (model, cluster, goal) to a Plan, with what the search found on the way."""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from kcloud.hardware.cluster import Cluster, load_cluster
from kcloud.hardware.cost import Calibration
from kcloud.hardware.device import Device
from kcloud.planner.assign import build_plan
from kcloud.planner.dp import load_kernel
from kcloud.planner.goal import Goal
from kcloud.planner.model import ModelGraphs, load_model
from kcloud.planner.plan import Plan
from kcloud.planner.search import SearchResult, search


@dataclass
class Outcome:
    plan: Plan
    result: SearchResult | None  # None for the baselines that do not search
    search_time_s: float  # measured wall time of the search and placement
    # measured: compiling (first use in a checkout) or loading the search's DP kernel, once
    # per process, before the search's clock starts
    kernel_s: float = 0.0


def resolve(model: str | ModelGraphs, cluster: str | Cluster,
            goal: Goal) -> tuple[ModelGraphs, Cluster]:
    m = model if isinstance(model, ModelGraphs) else load_model(model, goal)
    c = cluster if isinstance(cluster, Cluster) else load_cluster(cluster)
    return m, c


def make_plan(model: str | ModelGraphs, cluster: str | Cluster, goal: Goal, *,
              allow: Callable[[Device], bool] | None = None,
              micro_batches: Iterable[int] | None = None,
              calibration: Calibration | None = None) -> Outcome:
    """Plan `model` on `cluster` for `goal`. Raises InfeasibleGoal (a KCloudError) when no plan
    in the plan space meets the goal, naming the nearest feasible point."""
    m, c = resolve(model, cluster, goal)
    kernel_s = load_kernel()
    t0 = time.perf_counter()
    with _no_collections():
        result = search(m, c, goal, allow=allow, micro_batches=micro_batches,
                        calibration=calibration)
        plan = build_plan(result.ctx, result.mix)
    return Outcome(plan, result, time.perf_counter() - t0, kernel_s)


@contextlib.contextmanager
def _no_collections() -> Iterator[None]:
    """The cyclic garbage collector held off while the search runs. The search makes some
    hundred thousand small objects (paths, templates, tuples) and frees them by reference
    counting; each collection their allocations set off would also scan every object the
    process already holds (the model's graphs: a fifth of the search's time on 1,024
    devices). Collections resume after it."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
