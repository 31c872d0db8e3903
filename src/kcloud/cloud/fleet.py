"""The fleet as partition trees, and the placer.

Every fleet device is a row of `units` slices: an RNGD card has 8 (its cores: the 1-, 2- and
4-core SR-IOV instances take 1, 2 and 4), an ATOM-Max 4 (its dies), an A100/H100 7 (its MIG
compute slices: 1g..7g), a device without partitions 1. The slices come from the catalog's
partition list (`compute_fraction`, else 1/count): a device splits into 1/min(fraction) slices,
and a partition of fraction f takes round(f * units) of them, aligned to its own size, so that
the instances nest as a tree (a 4-core instance holds two 2-core ones, each two 1-core ones).
MIG's real placement table is close to this alignment rule but not identical (3g instances start
at slices 0 and 4 on hardware, 0 and 3 here).

The placer packs a plan's device groups (one per stage: a device type or partition, and the
stage's tensor-parallel degree) best-fit: a tensor-parallel group lands on one node, on the node
left with the least free capacity of that family that still fits it, and inside the node on the
most-used devices first, so that empty devices and empty nodes stay whole for large requests.
`policy="first-fit"` takes the first node and slot that fit instead (the baseline).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kcloud.hardware.cluster import Cluster, Link, cluster_from_dict
from kcloud.hardware.device import Device

POLICIES = ("best-fit", "first-fit")


@dataclass(frozen=True)
class Group:
    """One stage's devices: `count` x `type` (a catalog id or `id:partition`), on one node."""

    type: str
    count: int


@dataclass(frozen=True)
class Alloc:
    device: str  # fleet device id (`node/type/index`)
    partition: str | None  # None: the whole device
    offset: int
    units: int

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "partition": self.partition, "offset": self.offset,
                "units": self.units}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Alloc:
        return cls(d["device"], d.get("partition"), int(d["offset"]), int(d["units"]))


@dataclass
class FleetDevice:
    id: str
    node: str
    device: Device
    real: bool  # present on this host (figures measured), else emulated
    units: int
    profiles: dict[str, int]  # partition name -> slices it takes
    held: dict[int, tuple[int, str]] = field(default_factory=dict)  # offset -> (units, holder)
    cordoned: bool = False

    @property
    def type(self) -> str:
        return self.device.id

    @property
    def used_units(self) -> int:
        return sum(u for u, _ in self.held.values())

    @property
    def free_units(self) -> int:
        return 0 if self.cordoned else self.units - self.used_units

    def is_free(self, offset: int, units: int) -> bool:
        if self.cordoned or offset + units > self.units:
            return False
        return all(o + u <= offset or offset + units <= o for o, (u, _) in self.held.items())

    def slots_for(self, units: int) -> list[int]:
        """Free aligned offsets for an instance of `units` slices."""
        return [o for o in range(0, self.units - units + 1, units) if self.is_free(o, units)]

    def holders(self) -> set[str]:
        return {h for _, h in self.held.values()}


def partition_tree(dev: Device) -> tuple[int, dict[str, int]]:
    """(slices per device, slices per partition) of one catalog device."""
    if not dev.partitions:
        return 1, {}
    units = max(1, round(1.0 / min(p.compute_fraction for p in dev.partitions)))
    return units, {p.name: max(1, round(p.compute_fraction * units)) for p in dev.partitions}


def _link_spec(link: Link) -> dict[str, Any]:
    d: dict[str, Any] = {"bandwidth_gbps": link.bandwidth / 1e9, "latency_us": link.latency * 1e6,
                         "name": link.name}
    if link.collective_latency is not None:
        d["collective_latency_us"] = link.collective_latency * 1e6
    return d


class Fleet:
    """The devices of one or more clusters, with who holds which slices."""

    def __init__(self, clusters: Iterable[tuple[Cluster, bool]]) -> None:
        self.devices: dict[str, FleetDevice] = {}
        self.node_links: dict[str, Link] = {}
        self.network: Link | None = None
        names = []
        for cluster, real in clusters:
            self._add(cluster, real)
            names.append(cluster.name)
        self.name = "+".join(names)

    # -- building -----------------------------------------------------------------------------
    def _add(self, cluster: Cluster, real: bool) -> None:
        if self.network is None or cluster.network.bandwidth < self.network.bandwidth:
            self.network = cluster.network
        for node in cluster.nodes:
            self.node_links[node.name] = node.link
        for slot in cluster.slots:
            units, profiles = partition_tree(slot.device)
            self.devices[slot.id] = FleetDevice(slot.id, slot.node, slot.device, real, units,
                                                profiles)

    @property
    def nodes(self) -> list[str]:
        return list(dict.fromkeys(d.node for d in self.devices.values()))

    # -- holding ------------------------------------------------------------------------------
    def hold(self, allocs: Iterable[Alloc], holder: str) -> None:
        for a in allocs:
            self.devices[a.device].held[a.offset] = (a.units, holder)

    def release(self, holder: str) -> None:
        for d in self.devices.values():
            for o in [o for o, (_, h) in d.held.items() if h == holder]:
                del d.held[o]

    def held_by(self, holder: str) -> list[Alloc]:
        out = []
        for d in self.devices.values():
            for o, (u, h) in d.held.items():
                if h == holder:
                    part = next((p for p, pu in d.profiles.items() if pu == u), None) \
                        if u < d.units else None
                    out.append(Alloc(d.id, part, o, u))
        return out

    # -- demand sizes -------------------------------------------------------------------------
    def demand_units(self, dev: FleetDevice, type_: str) -> int | None:
        """Slices `type_` takes on `dev`, or None if `dev` cannot host it."""
        base, _, part = type_.partition(":")
        if base == dev.type and not part:
            return dev.units
        if type_ == dev.type:  # a device whose catalog id itself names a partition (host-cpu)
            return dev.units
        if base == dev.type and part in dev.profiles:
            return dev.profiles[part]
        return None

    # -- placement ----------------------------------------------------------------------------
    def place(self, groups: list[Group], holder: str, *, policy: str = "best-fit",
              real: bool | None = None) -> list[list[Alloc]] | None:
        """Slices for every group (all or nothing), held for `holder`; None if they do not fit.
        `real`: only devices present on this host (True), only emulated ones (False), any."""
        if policy not in POLICIES:
            raise ValueError(policy)
        out: list[list[Alloc]] = []
        taken: list[Alloc] = []
        prev_node: str | None = None
        for g in groups:
            got = self._place_group(g, policy, real, prev_node)
            if got is None:
                for a in taken:
                    del self.devices[a.device].held[a.offset]
                return None
            self.hold(got, holder)
            taken.extend(got)
            out.append(got)
            prev_node = self.devices[got[0].device].node
        return out

    def _candidates(self, g: Group, real: bool | None) -> dict[str, list[FleetDevice]]:
        by_node: dict[str, list[FleetDevice]] = defaultdict(list)
        for d in self.devices.values():
            if (real is None or d.real == real) and not d.cordoned \
                    and self.demand_units(d, g.type) is not None:
                by_node[d.node].append(d)
        return by_node

    def _fit_in_node(self, devs: list[FleetDevice], g: Group, policy: str) -> list[Alloc] | None:
        part = g.type.partition(":")[2] or None
        trial: dict[str, set[int]] = defaultdict(set)  # offsets taken in this trial
        picks: list[Alloc] = []
        for _ in range(g.count):
            best: tuple[tuple[int, ...], FleetDevice, int, int] | None = None
            for i, d in enumerate(devs):
                u = self.demand_units(d, g.type)
                assert u is not None
                free = [o for o in d.slots_for(u)
                        if not any(o < t + u and t < o + u for t in trial[d.id])]
                if not free:
                    continue
                if policy == "first-fit":
                    best = ((i,), d, free[0], u)
                    break
                left = d.free_units - u * (len(trial[d.id]) + 1)
                key = (left, i)  # the fullest device that still fits
                if best is None or key < best[0]:
                    best = (key, d, free[0], u)
            if best is None:
                return None
            _, d, o, u = best
            trial[d.id].add(o)
            whole = u == d.units
            picks.append(Alloc(d.id, None if whole else (part or None), o, u))
        return picks

    def _place_group(self, g: Group, policy: str, real: bool | None,
                     prev_node: str | None) -> list[Alloc] | None:
        by_node = self._candidates(g, real)
        best: tuple[tuple[float, ...], list[Alloc]] | None = None
        for rank, (node, devs) in enumerate(by_node.items()):
            picks = self._fit_in_node(devs, g, policy)
            if picks is None:
                continue
            if policy == "first-fit":
                return picks
            # tightest devices first (a partition fills a partly held card anywhere before
            # it splits a whole one), then the tightest node, then the previous stage's node
            after = defaultdict(int)
            for a in picks:
                after[a.device] += a.units
            dev_left = sum(self.devices[k].free_units - u for k, u in after.items())
            left = sum(d.free_units for d in devs) - sum(a.units for a in picks)
            key = (dev_left, left, 0 if node == prev_node else 1, rank)
            if best is None or key < best[0]:
                best = (key, picks)
        return best[1] if best else None

    # -- views --------------------------------------------------------------------------------
    def profiles(self, real: bool | None = None) -> list[str]:
        """Every partition profile of the fleet's free devices, as `id:partition`."""
        out: dict[str, None] = {}
        for d in self.devices.values():
            if (real is None or d.real == real) and not d.cordoned:
                for p in d.profiles:
                    if d.profiles[p] < d.units:
                        out[f"{d.type}:{p}"] = None
        return list(out)

    def free_cluster(self, *, real: bool | None = None, name: str = "free",
                     allow: dict[str, float] | None = None,
                     profile: str | None = None, max_devices: int | None = None
                     ) -> Cluster | None:
        """What is free, as a cluster the planner can plan on, each free slice counted once: a
        partly held device as the largest partitions its free slices still make; a fully free
        one as itself, or (`profile` = `id:partition`) one of that id as that partition's
        instances. `allow` caps the device-equivalents of each catalog id (a quota).
        `max_devices`: the plan will use at most this many, so each node offers at most that
        many of a type and at most that many nodes of one shape are kept (nodes of one shape
        are interchangeable to the planner; the placer picks among them)."""
        budget = dict(allow) if allow is not None else None
        split_type, _, split_part = (profile or "").partition(":")
        nodes: list[dict[str, Any]] = []
        for node in self.nodes:
            counts: dict[str, int] = defaultdict(int)
            for d in self.devices.values():
                if d.node != node or (real is not None and d.real != real) or d.cordoned:
                    continue
                if d.type == split_type and d.free_units == d.units and split_part in d.profiles:
                    u = d.profiles[split_part]
                    pieces = [(f"{d.type}:{split_part}", u)] * (d.units // u)
                else:
                    pieces = self._free_pieces(d)
                for type_, units in pieces:
                    if budget is not None:
                        left = budget.get(d.type, 0.0)
                        if left + 1e-9 < units / d.units:
                            continue
                        budget[d.type] = left - units / d.units
                    counts[type_] += 1
            if counts:
                if max_devices is not None:
                    counts = {k: min(v, max_devices) for k, v in counts.items()}
                nodes.append({"name": node, "devices": dict(counts),
                              "link": _link_spec(self.node_links[node])})
        if max_devices is not None:
            kept: list[dict[str, Any]] = []
            shapes: dict[str, int] = defaultdict(int)
            for n in nodes:
                shape = repr((sorted(n["devices"].items()), sorted(n["link"].items())))
                if shapes[shape] < max_devices:
                    shapes[shape] += 1
                    kept.append(n)
            nodes = kept
        if not nodes:
            return None
        net = self.network
        assert net is not None
        return cluster_from_dict({"name": name, "network": _link_spec(net), "nodes": nodes},
                                 name)

    def _free_pieces(self, d: FleetDevice) -> list[tuple[str, int]]:
        if d.free_units == 0:
            return []
        if d.free_units == d.units:
            return [(d.type, d.units)]
        out: list[tuple[str, int]] = []
        taken: set[int] = set()
        for part, u in sorted(d.profiles.items(), key=lambda kv: -kv[1]):
            for o in d.slots_for(u):
                span = set(range(o, o + u))
                if span & taken:
                    continue
                taken |= span
                out.append((f"{d.type}:{part}", u))
        return out

    def stranded(self) -> float:
        """Free capacity on partly held devices, in device-equivalents: slices that a
        whole-device request cannot use."""
        return sum(d.free_units / d.units for d in self.devices.values()
                   if d.used_units > 0 and d.free_units > 0)

    def utilization(self) -> float:
        total = sum(1 for _ in self.devices.values())
        return sum(d.used_units / d.units for d in self.devices.values()) / total if total else 0.0

    def to_dict(self, names: dict[str, str] | None = None) -> dict[str, Any]:
        """Every device and its partition tree: who holds which slices. `names`: holder id ->
        what to show for it."""
        names = names or {}
        out = []
        for d in self.devices.values():
            out.append({
                "id": d.id, "node": d.node, "type": d.type, "name": d.device.name,
                "kind": d.device.kind.value, "domestic": d.device.domestic,
                "mode": "real" if d.real else "emulated", "cordoned": d.cordoned,
                "units": d.units, "partitions": d.profiles,
                "held": [{"offset": o, "units": u, "holder": h, "by": names.get(h, h)}
                         for o, (u, h) in sorted(d.held.items())],
                "utilization": d.used_units / d.units,
            })
        return {"name": self.name, "devices": out}


def plan_groups(plan: Any) -> list[Group]:
    """A plan's device groups, stage by stage (a stage's devices form one tensor-parallel
    group on one node)."""
    return [Group(st.device_type, st.tp) for r in plan.replicas for st in r.stages]
