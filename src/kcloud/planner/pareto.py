"""The latency-energy frontier: which single replicas are not beaten on both at once.

Candidates are the pipeline templates the search builds for every micro-batch, device-type
restriction and period cap (least energy per cap, fewest devices per cap, least latency); a
point is on the frontier when no other has both a lower request latency and a lower energy
per item. All figures are modeled.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from kcloud.planner.evaluate import Template
from kcloud.planner.goal import Goal
from kcloud.planner.search import (
    Context,
    dedupe,
    device_family,
    fits_alone,
    holds_in_flight,
    make_context,
    min_latency,
    per_item_family,
)


@dataclass(frozen=True)
class Point:
    latency_s: float  # request latency (modeled)
    energy_per_item_j: float  # modeled
    throughput: float  # of this one replica, items/s (modeled)
    power_w: float
    devices: int
    micro_batch: int
    meets_goal: bool  # within the goal's SLO, power cap, device budget and domestic floor
    pipeline: str

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "figures": "modeled"}


def candidates(ctx: Context, extra: list[Template] | None = None) -> list[Template]:
    g = ctx.goal
    wide = Goal(objective="energy", batch=g.batch, precision=g.precision,
                input_tokens=g.input_tokens, output_tokens=g.output_tokens,
                workload=g.workload,
                max_devices=g.max_devices)
    c = make_context(ctx.model, ctx.cluster, wide, calibration=ctx.calibration)
    if [t.id for t in c.types] == [t.id for t in ctx.types]:
        c = replace(c, spaces=ctx.spaces)  # same options: reuse the cost matrices
    c = replace(c, in_flight=ctx.in_flight)
    out: list[Template | None] = []
    for b in c.micro_batches:
        for _, tys in c.restrictions:
            opts = c.options(b, tys)
            if not opts:
                continue
            out.extend(per_item_family(c, b, opts, "energy", refine=False))
            out.extend(device_family(c, b, opts))
            p = min_latency(c, b, opts, np.array([np.inf]))[0]
            out.append(None if p is None else c.evaluate(b, p))
    # an LLM pipeline deeper than the count its stages' memory was costed with cannot run
    return [t for t in dedupe([*(extra or []), *out]) if holds_in_flight(t)]


def frontier(ctx: Context, extra: list[Template] | None = None) -> tuple[list[Point],
                                                                         list[Point]]:
    """(frontier points sorted by latency, every candidate point); `extra`: templates the
    search already holds (they join the candidates)."""
    ts = candidates(ctx, extra)
    pts = [Point(t.request_latency_s, t.energy_per_item_j, t.throughput, t.power_w,
                 t.n_devices, t.b, ctx.meets_slo(t) and fits_alone(ctx, t),
                 t.describe(short=True))
           for t in ts]
    pts.sort(key=lambda p: (p.latency_s, p.energy_per_item_j))
    front: list[Point] = []
    best = np.inf
    for p in pts:
        if p.energy_per_item_j < best * (1 - 1e-12):
            front.append(p)
            best = p.energy_per_item_j
    return front, pts


def plot(front: list[Point], every: list[Point], path: Path, title: str,
         chosen: tuple[float, float] | None = None, unit: str = "item") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.scatter([p.latency_s for p in every], [p.energy_per_item_j for p in every], s=8,
               color="0.75", label="candidate replicas")
    ax.plot([p.latency_s for p in front], [p.energy_per_item_j for p in front], "o-",
            color="tab:blue", label="frontier")
    if chosen is not None:
        ax.scatter([chosen[0]], [chosen[1]], marker="*", s=160, color="tab:red", zorder=5,
                   label="chosen plan")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("request latency, s (modeled)")
    ax.set_ylabel(f"energy per {unit}, J (modeled)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
