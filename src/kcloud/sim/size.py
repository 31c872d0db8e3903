"""Sizing a fleet: which devices, how many, for every service's SLO at the lowest cost or
energy; and the 2025 / 2028 / 2030 roadmap.

Per service and per candidate device set (one catalog device type, or an NPU joined by a PIM
type where the year has PIM), the planner plans the model on nodes of that set, once for the
service's own objective and once for the sizing's (`unit_objectives`: a node's throughput plan
can take every device of it in one pipeline, where the least-energy or least-cost pipeline
takes one or two), and each plan's first replica is a candidate replica unit. The simulator
then finds the fewest replicas of each unit that meet the SLO (a share `attainment` of
requests within every bound): an estimate from the replica's nominal rate, doubled until met,
then bisected. Each service's feasible options are
combined into fleets; the fleet returned is the one with the lowest objective that meets the
domestic-share floor and the power cap, beside the Pareto front of cost, energy and domestic
share. Every figure is modeled; those built on estimated or projected catalog numbers say so.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

from kcloud.errors import KCloudError
from kcloud.sim.fleet import Simulator
from kcloud.sim.services import FleetSpec, ServiceSpec, build_service, mean_lengths, plan_service

YEARS = (2025, 2028, 2030)
# Device kinds of each stage of the K-Cloud plan: NPUs and GPUs; then DRAM PIM joins them;
# then analog NVM PIM (a projection: `projected` devices are allowed from 2030).
STAGE_KINDS = {2025: ("npu", "gpu"), 2028: ("npu", "gpu", "pim"), 2030: ("npu", "gpu", "pim")}
NODE_DEVICES = 8
MAX_REPLICAS = 256
SIZING_REQUESTS = 1500  # requests per sizing simulation (per service)
DEFAULT_ATTAINMENT = 0.95


class SizingError(KCloudError):
    """No fleet meets the services' SLOs and constraints; names the service and nearest point."""


def stage_of(year: int) -> int:
    if year not in YEARS:
        raise KCloudError(f"unknown roadmap year {year}", "use 2025, 2028 or 2030")
    return year


def candidate_devices(year: int, only: list[str] | None = None) -> list[Any]:
    """Catalog devices on the market by `year` of the stage's kinds (projected from 2030)."""
    from kcloud.hardware.catalog import list_devices

    kinds = STAGE_KINDS[stage_of(year)]
    out = []
    for d in list_devices():
        if d.kind.value not in kinds or d.year > year or (d.projected and year < 2030):
            continue
        if only is not None and d.id not in only:
            continue
        out.append(d)
    return out


def candidate_sets(year: int, only: list[str] | None = None) -> list[tuple[str, ...]]:
    """Device sets to plan on: each type alone; each NPU with each PIM type of the year."""
    devs = candidate_devices(year, only)
    sets = [(d.id,) for d in devs]
    npus = [d.id for d in devs if d.kind.value == "npu"]
    pims = [d.id for d in devs if d.kind.value == "pim"]
    sets += [(n, p) for n in npus for p in pims]
    return sets


def _cluster(devs: tuple[str, ...], need_bytes: float) -> Any:
    from kcloud.hardware.catalog import get_device
    from kcloud.hardware.cluster import cluster_from_dict
    from kcloud.hardware.cost import usable_memory

    nodes = []
    for d in devs:
        mem = usable_memory(get_device(d))
        count = max(1, math.ceil(need_bytes * 1.25 / mem / NODE_DEVICES))
        nodes.append({"name": d.split("-")[-1], "count": min(count, 8),
                      "devices": {d: NODE_DEVICES}})
    return cluster_from_dict({"name": "+".join(devs), "nodes": nodes}, "sizing")


@dataclass
class Option:
    """A service served by `replicas` replicas of one replica unit."""

    service: str
    devices: tuple[str, ...]  # the set it was planned on
    unit: str  # the replica unit, e.g. 'furiosa-rngd x4'
    replicas: int
    device_counts: dict[str, int]
    domestic_devices: int
    cost_per_hour: float | None
    power_w: float  # average modeled power while serving the stream
    energy_per_request_j: float
    attainment: float
    meets: bool
    estimated: bool
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def n_devices(self) -> int:
        return sum(self.device_counts.values())


def _simulate(spec: ServiceSpec, planned: Any, n: int, seed: int) -> Any:
    svc = build_service(spec, planned, duration_s=None, seed=seed, replicas=n,
                        limit=SIZING_REQUESTS)
    svc.models = [planned.models[0]] * n
    return Simulator([svc], bin_s=60.0).run()


def _option(spec: ServiceSpec, devs: tuple[str, ...], planned: Any, n: int, res: Any,
            target: float) -> Option:
    d = res.to_dict()
    s = d["services"][spec.name]
    unit = planned.models[0]
    counts: dict[str, int] = {}
    for st in unit.stages:
        counts[st.device.id] = counts.get(st.device.id, 0) + st.tp * n
    dom = sum(c for t, c in counts.items() if res.domestic[t])
    prices = [res.price_per_hour[t] for t in counts]
    cost = None if any(p is None for p in prices) else sum(
        res.price_per_hour[t] * c for t, c in counts.items())  # type: ignore[operator]
    att = s["slo_attainment"] or 0.0
    return Option(spec.name, devs, _describe(unit), n, counts, dom, cost, d["avg_power_w"],
                  s["energy_per_request_j"] or 0.0, att,
                  att >= target and s["dropped"] == 0, d["estimated"], s)


def _describe(unit: Any) -> str:
    """A replica unit as 'furiosa-rngd x4 -> furiosa-rngd x4'."""
    return " -> ".join(f"{st.device.id} x{st.tp}" for st in unit.stages)


def unit_objectives(spec: ServiceSpec, objective: str) -> tuple[str, ...]:
    """The planner objectives whose plans give `spec` its candidate replica units: its own,
    and the sizing's `objective`."""
    return tuple(dict.fromkeys((spec.objective, objective)))


def plan_units(spec: ServiceSpec, devs: tuple[str, ...], objectives: tuple[str, ...]
               ) -> list[Any]:
    """`spec` planned on nodes of `devs` once per objective: the plans whose first replica
    (the unit) differs, leaving out those with no plan and those that leave no memory for a
    KV cache."""
    from kcloud.graph.loaders import load_model_spec
    from kcloud.hardware.cost import weight_bytes
    from kcloud.planner.goal import Goal
    from kcloud.planner.model import load_model

    prompt, out = mean_lengths(spec)
    probe = load_model_spec(spec.model, batch=1, seq_len=None, phase=None, kv_len=None)
    if probe.meta.get("is_llm"):
        graphs = load_model(spec.model, Goal(input_tokens=prompt, output_tokens=out))
    else:
        graphs = load_model(spec.model, Goal())
    cluster = _cluster(devs, weight_bytes(graphs.forward, _precision_of(devs[0])))
    units: dict[str, Any] = {}
    for objective in objectives:
        try:
            planned = plan_service(spec.model_copy(update={"objective": objective}),
                                   prompt=prompt, output=out, cluster=cluster,
                                   graphs=graphs)
        except KCloudError:
            continue
        if planned.is_llm and min(m.kv_token_capacity(spec.chunk_tokens)
                                  for m in planned.models) < 16:
            continue  # the plan leaves no memory for a KV cache
        units.setdefault(_describe(planned.models[0]), planned)
    return list(units.values())


def size_service(spec: ServiceSpec, devs: tuple[str, ...], *, seed: int = 0,
                 target: float = DEFAULT_ATTAINMENT,
                 objective: str | None = None) -> Option | None:
    """The fewest replicas of `spec` planned on `devs` that meet its SLO (None: no plan), the
    plan made for `objective` (default: the service's own)."""
    units = plan_units(spec, devs, (objective or spec.objective,))
    return size_unit(spec, devs, units[0], seed=seed, target=target) if units else None


def size_unit(spec: ServiceSpec, devs: tuple[str, ...], planned: Any, *, seed: int = 0,
              target: float = DEFAULT_ATTAINMENT) -> Option | None:
    """The fewest replicas of `planned`'s first replica that meet `spec`'s SLO (or, when no
    count does, the count that comes nearest; None: more than `MAX_REPLICAS` at first guess)."""
    prompt, out = mean_lengths(spec)
    unit = planned.models[0]
    # a first guess from the replica's nominal rate and the stream's load
    rate = _stream_rate(spec)
    work = rate * (out if planned.is_llm else 1)
    batch = min(32, spec.max_seqs) if planned.is_llm else spec.max_batch
    guess = max(1, math.ceil(work / max(unit.nominal_rate(batch, prompt + out // 2), 1e-9)))
    lo, hi = 0, None  # lo: largest failing count known; hi: smallest meeting option
    n = guess
    best: Option | None = None
    while n <= MAX_REPLICAS:
        opt = _option(spec, devs, planned, n, _simulate(spec, planned, n, seed), target)
        if best is None or opt.attainment > best.attainment:
            best = opt
        if opt.meets:
            hi = n
            best = opt
            break
        lo = n
        n *= 2
    if hi is None:
        return best  # the nearest point: not meeting
    while hi - lo > 1:
        mid = (lo + hi) // 2
        opt = _option(spec, devs, planned, mid, _simulate(spec, planned, mid, seed), target)
        if opt.meets:
            hi, best = mid, opt
        else:
            lo = mid
    return best


def _precision_of(dev_id: str) -> Any:
    from kcloud.hardware.catalog import get_device
    from kcloud.predict import default_precision

    return default_precision(get_device(dev_id), True)


def _stream_rate(spec: ServiceSpec) -> float:
    if spec.trace is not None:
        from kcloud.sim.streams import read_trace

        return read_trace(spec.trace).rate * spec.rate_scale
    return float(spec.rate or 0.0)


@dataclass
class Fleet:
    options: tuple[Option, ...]

    @property
    def cost_per_hour(self) -> float | None:
        c = [o.cost_per_hour for o in self.options]
        return None if any(x is None for x in c) else sum(c)  # type: ignore[arg-type]

    @property
    def power_w(self) -> float:
        return sum(o.power_w for o in self.options)

    @property
    def domestic_share(self) -> float:
        n = sum(o.n_devices for o in self.options)
        return sum(o.domestic_devices for o in self.options) / n if n else 0.0

    @property
    def meets_slo(self) -> bool:
        return all(o.meets for o in self.options)

    @property
    def estimated(self) -> bool:
        return any(o.estimated for o in self.options)

    def objective(self, name: str) -> float:
        if name == "energy":
            return self.power_w
        c = self.cost_per_hour
        return math.inf if c is None else c

    def devices(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for o in self.options:
            for t, c in o.device_counts.items():
                out[t] = out.get(t, 0) + c
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "fleet": self.devices(),
            "services": {o.service: {
                "unit": o.unit, "replicas": o.replicas, "devices": o.device_counts,
                "slo_attainment": o.attainment, "meets_slo": o.meets,
                "energy_per_request_j": o.energy_per_request_j, "avg_power_w": o.power_w,
                "cost_usd_per_hour": o.cost_per_hour,
                "ttft_s": o.result.get("ttft_s"), "tpot_s": o.result.get("tpot_s"),
                "e2e_s": o.result.get("e2e_s")} for o in self.options},
            "domestic_share": self.domestic_share,
            "energy_per_request_j": {o.service: o.energy_per_request_j for o in self.options},
            "avg_power_w": self.power_w,
            "cost_usd_per_hour": self.cost_per_hour,
            "meets_slo": self.meets_slo,
            "estimated": self.estimated,
            "figures": "modeled",
        }


def _pareto(fleets: list[Fleet]) -> list[Fleet]:
    def key(f: Fleet) -> tuple[float, float, float]:
        c = f.cost_per_hour
        return (math.inf if c is None else c, f.power_w, -f.domestic_share)

    pts = sorted(fleets, key=key)
    front: list[Fleet] = []
    for f in pts:
        k = key(f)
        if not any(all(a <= b for a, b in zip(key(g), k, strict=True)) and key(g) != k
                   for g in front):
            front.append(f)
    return front


def size_fleet(spec: FleetSpec, year: int, *, min_domestic_share: float = 0.0,
               objective: str = "cost", power_cap_w: float | None = None,
               target: float = DEFAULT_ATTAINMENT, strict: bool = True,
               progress: Any = None, devices: list[str] | None = None) -> dict[str, Any]:
    """Size every service of `spec` for `year`; see the module docstring."""
    if objective not in ("cost", "energy"):
        raise KCloudError(f"unknown sizing objective '{objective}'", "use cost or energy")
    if not 0.0 <= min_domestic_share <= 1.0:
        raise KCloudError(f"domestic share floor must lie in [0, 1], got {min_domestic_share}",
                          "give --min-domestic-share 0..1")
    per_service: list[list[Option]] = []
    nearest: dict[str, Option | None] = {}
    for s in spec.services:
        feasible, best_miss = [], None
        for devs in candidate_sets(year, s.devices or devices):
            if progress:
                progress(f"{year} {s.name}: {'+'.join(devs)}")
            for planned in plan_units(s, devs, unit_objectives(s, objective)):
                opt = size_unit(s, devs, planned, seed=spec.seed, target=target)
                if opt is None:
                    continue
                if opt.meets:
                    feasible.append(opt)
                elif best_miss is None or opt.attainment > best_miss.attainment:
                    best_miss = opt
        nearest[s.name] = best_miss
        if not feasible:
            slo = s.slo
            bounds = ", ".join(f"{k} {v:g} ms" for k, v in
                               (("TTFT", slo.ttft_ms), ("TPOT", slo.tpot_ms),
                                ("latency", slo.latency_ms)) if v is not None)
            near = (f"nearest: {best_miss.unit} x{best_miss.replicas} meets it for "
                    f"{best_miss.attainment:.0%} of requests" if best_miss else
                    "no device of the year can hold the model")
            raise SizingError(f"service {s.name}: no fleet of {year} devices meets its SLO "
                              f"({bounds or 'none'}) for {target:.0%} of requests; {near}",
                              "relax the SLO, lower the rate, or allow more devices")
        per_service.append(feasible)
    fleets = [Fleet(combo) for combo in itertools.product(*per_service)]
    ok = [f for f in fleets if f.domestic_share >= min_domestic_share - 1e-9
          and (power_cap_w is None or f.power_w <= power_cap_w)]
    front = _pareto(fleets)
    if not ok:
        closest = max(fleets, key=lambda f: (f.domestic_share, -f.power_w))
        if strict:
            why = []
            if power_cap_w is not None and min(f.power_w for f in fleets) > power_cap_w:
                why.append(f"the least power is {min(f.power_w for f in fleets):,.0f} W "
                           f"(cap {power_cap_w:,.0f} W)")
            why.append(f"the highest domestic share is {closest.domestic_share:.0%} "
                       f"(floor {min_domestic_share:.0%}) with {closest.devices()}")
            raise SizingError(f"no {year} fleet meets the constraints: {'; '.join(why)}",
                              "lower --min-domestic-share or raise --power-cap-w")
        ok = [closest]
    best = min(ok, key=lambda f: (f.objective(objective), -f.domestic_share))
    return {"year": year, "objective": objective, "min_domestic_share": min_domestic_share,
            "power_cap_w": power_cap_w, "slo_attainment_target": target,
            **best.to_dict(),
            "constraints_met": best.domestic_share >= min_domestic_share - 1e-9
            and (power_cap_w is None or best.power_w <= power_cap_w),
            "pareto": [{"fleet": f.devices(), "cost_usd_per_hour": f.cost_per_hour,
                        "avg_power_w": f.power_w, "domestic_share": f.domestic_share}
                       for f in front]}
