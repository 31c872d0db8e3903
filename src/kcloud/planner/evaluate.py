"""Exact figures of one replica (a pipeline) and of a set of replicas.

A micro-batch of b items runs through the stages in turn; its latency is the sum of the stage
times (stages on cores of one CPU share its last-level cache: `shared_cache_times`) and of the
transfers between stages (for an LLM pipeline, also the hops of its tokens from
the last stage back to the first, one per decode step, counted as the last stage's), plus what
its first pass loses on devices that sat idle (a request reaches a quiet pipeline): the
resume of its first stage (`arrival`; each later stage's is part of the hop that wakes it)
and every stage's refill of the weights its device's cache held (`refill`). In steady
state every stage and every transfer works
on a different micro-batch, so the pipeline completes one micro-batch per period = the largest
stage or transfer time. A request of `batch` items spans ceil(batch / b) micro-batches and waits
(ceil(batch / b) - 1) periods behind its own earlier micro-batches.

Each device draws its busy power (cost model) while its stage works and its idle power for the
rest of the period; energy per item is a period's energy over the items of a micro-batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kcloud.hardware.steps import period_energy
from kcloud.planner.dp import Path
from kcloud.planner.space import StageSpace, shared_cache_times


@dataclass(frozen=True)
class Template:
    """One replica's pipeline with its exact modeled figures."""

    space: StageSpace
    path: Path
    stage_time: tuple[float, ...]
    stage_comm: tuple[float, ...]  # tensor-parallel collectives inside each stage
    stage_mem: tuple[float, ...]  # bytes per device
    stage_power: tuple[float, ...]  # busy power per device, W
    transfers: tuple[float, ...]  # cut transfers between consecutive stages (+ LLM tokens)
    latency_s: float  # one micro-batch through the pipeline
    period_s: float
    request_latency_s: float  # a request of goal.batch items, queueing included
    throughput: float  # items per second
    power_w: float
    energy_per_item_j: float
    price_per_s: float | None  # USD per second of all its devices (None: a device is unpriced)
    devices: tuple[tuple[int, int], ...]  # (type index, devices)

    @property
    def b(self) -> int:
        return self.space.b

    @property
    def n_devices(self) -> int:
        return sum(n for _, n in self.devices)

    @property
    def domestic_devices(self) -> int:
        return sum(n for t, n in self.devices if self.space.types[t].domestic)

    @property
    def cost_per_item(self) -> float | None:
        return None if self.price_per_s is None else self.price_per_s / self.throughput

    @property
    def device_hours_per_item(self) -> float:
        return self.n_devices / 3600.0 / self.throughput

    @property
    def comm_s(self) -> float:
        return sum(self.transfers) + sum(self.stage_comm)

    @property
    def key(self) -> tuple[object, ...]:
        return (self.space.b, self.path.stages, self.path.links)

    def objective(self, name: str) -> float:
        """The figure `name` optimizes, as a value to minimize."""
        return objective_value(name, self.request_latency_s, self.throughput,
                               self.energy_per_item_j, self.cost_per_item)

    def describe(self, short: bool = False) -> str:
        """'furiosa-rngd x4 [0:40) -> nvidia-a100-sxm-80gb x8 [40:83), micro-batch 8', or with
        `short` consecutive stages of one kind folded: 'furiosa-rngd x2 (3 stages) -> ...'."""
        parts: list[list[object]] = []
        for o, i, j in self.path.stages:
            opt = self.space.options[o]
            kind = f"{self.space.types[opt.type].id} x{opt.tp}"
            if opt.offload:
                kind += f" + {self.space.types[opt.pim].id} x{opt.pim_count} (attention)"
            if short and parts and parts[-1][0] == kind:
                parts[-1][1] = int(parts[-1][1]) + 1  # type: ignore[call-overload]
            else:
                parts.append([kind, 1, f"[{i}:{j})"])
        text = [f"{k} ({n} stages)" if short and n != 1 else (k if short else f"{k} {r}")
                for k, n, r in parts]
        return " -> ".join(text) + f", micro-batch {self.b}"


def objective_value(name: str, latency_s: float, throughput: float, energy_j: float,
                    cost: float | None) -> float:
    """The figure objective `name` optimizes, as a value to minimize."""
    if name == "latency":
        return latency_s
    if name == "throughput":
        return -throughput
    if name == "energy":
        return energy_j
    return math.inf if cost is None else cost


def queue_periods(batch: int, b: int) -> int:
    return max(0, math.ceil(batch / b) - 1)


def evaluate(space: StageSpace, path: Path, batch: int) -> Template:
    o, i, j = (np.array(x) for x in zip(*path.stages, strict=True))
    alone = space.time[o, i, j].tolist()
    times = shared_cache_times(space, list(path.stages), path.links, alone)
    comms = space.comm[o, i, j].tolist()
    mems = space.mem[o, i, j].tolist()
    tps = space.opt_tp[o].tolist()
    idle = space.opt_idle_w[o].tolist()
    prices = space.opt_price_s[o].tolist()
    powers = []
    energy = 0.0  # busy energy of all devices per micro-batch
    price: float | None = 0.0
    for busy0, tau0, tau, tp, p, ty in zip(space.busy_j[o, i, j].tolist(), alone, times, tps,
                                            prices, space.opt_type[o].tolist(), strict=True):
        busy = busy0 * (tau / tau0 if tau0 > 0 else 1.0)
        powers.append(busy / tau if tau > 0 else space.types[ty].device.idle_power_w.value)
        energy += tp * busy
        price = None if price is None or math.isnan(p) else price + p
    use = space.opt_use[o].sum(axis=0).tolist()  # an offload's PIM group included
    transfers = space.trans[space.opt_type[o[:-1]], np.array(path.links, dtype=np.int64),
                            j[:-1]].tolist()
    first = space.options[path.stages[0][0]].type
    if transfers and space.model.is_llm:  # the tokens' way back, over the slowest link kind
        transfers.append(float(space.feedback[first, max(path.links)]))
    latency = (float(space.arrival[first]) + float(space.refill[o, i, j].sum()) + sum(times)
               + sum(transfers))
    period = max([*times, *transfers])
    # energy per period: busy energy + idle power for the rest of the period
    e_period = energy + sum(period_energy(0.0, w, tau, period)
                            for w, tau in zip(idle, times, strict=True))
    items = space.items
    return Template(
        space=space, path=path, stage_time=tuple(times), stage_comm=tuple(comms),
        stage_mem=tuple(mems), stage_power=tuple(powers), transfers=tuple(transfers),
        latency_s=latency, period_s=period,
        request_latency_s=latency + queue_periods(batch, space.b) * period,
        throughput=items / period, power_w=e_period / period,
        energy_per_item_j=e_period / items, price_per_s=price,
        devices=tuple((ty, n) for ty, n in enumerate(use) if n),
    )


@dataclass(frozen=True)
class Mix:
    """Replicas: templates with their counts. Plan-level figures."""

    parts: tuple[tuple[Template, int], ...]

    @property
    def throughput(self) -> float:
        return sum(t.throughput * n for t, n in self.parts)

    @property
    def power_w(self) -> float:
        return sum(t.power_w * n for t, n in self.parts)

    @property
    def latency_s(self) -> float:
        return max(t.request_latency_s for t, _ in self.parts)

    @property
    def energy_per_item_j(self) -> float:
        return self.power_w / self.throughput

    @property
    def n_devices(self) -> int:
        return sum(t.n_devices * n for t, n in self.parts)

    @property
    def domestic_share(self) -> float:
        d = sum(t.domestic_devices * n for t, n in self.parts)
        return d / self.n_devices if self.n_devices else 0.0

    @property
    def cost_per_item(self) -> float | None:
        prices = [t.price_per_s for t, _ in self.parts]
        if any(p is None for p in prices):
            return None
        return sum(t.price_per_s * n for t, n in self.parts  # type: ignore[operator]
                   ) / self.throughput

    @property
    def device_hours_per_item(self) -> float:
        return self.n_devices / 3600.0 / self.throughput

    @property
    def comm_share(self) -> float:
        worst = max((t for t, _ in self.parts), key=lambda t: t.request_latency_s)
        return worst.comm_s / worst.latency_s if worst.latency_s > 0 else 0.0

    def usage(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for t, n in self.parts:
            for ty, c in t.devices:
                out[ty] = out.get(ty, 0) + c * n
        return out

    def objective(self, name: str) -> float:
        return objective_value(name, self.latency_s, self.throughput, self.energy_per_item_j,
                               self.cost_per_item)


def mix_of(templates: Sequence[Template], counts: Sequence[int]) -> Mix:
    return Mix(tuple((t, int(n)) for t, n in zip(templates, counts, strict=True) if n > 0))
