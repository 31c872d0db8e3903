"""Clusters: nodes of devices, links inside a node and the network between nodes.

A cluster is given by name (built-ins) or as a YAML file:

    name: my-rack
    network: {bandwidth_gbps: 25, latency_us: 10}      # between nodes, GB/s one direction
    nodes:
      - name: npu0
        count: 2                                         # two identical nodes (npu0-0, npu0-1)
        devices: {furiosa-rngd: 8}
        link: {bandwidth_gbps: 64, latency_us: 2}        # optional: inside the node
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, model_validator

from kcloud import inputs
from kcloud.errors import CatalogError, KCloudError
from kcloud.hardware.device import Device


@dataclass(frozen=True)
class Link:
    bandwidth: float  # bytes/s, one direction
    latency: float  # seconds
    name: str = ""
    collective_latency: float | None = None  # s, one small all-reduce (None: `latency`)

    @property
    def collective_s(self) -> float:
        """Fixed time of one collective call among devices on this link."""
        return self.latency if self.collective_latency is None else self.collective_latency

    def transfer_s(self, nbytes: float) -> float:
        return self.latency + nbytes / self.bandwidth


@dataclass(frozen=True)
class Slot:
    """One device in the cluster: `node/device-type/index`."""

    id: str
    node: str
    device: Device


@dataclass(frozen=True)
class Node:
    name: str
    devices: tuple[tuple[str, int], ...]  # (catalog id, count)
    link: Link  # between devices of this node


@dataclass(frozen=True)
class Cluster:
    name: str
    nodes: tuple[Node, ...]
    network: Link
    source: str = "built-in"

    @cached_property
    def slots(self) -> tuple[Slot, ...]:
        from kcloud.hardware.catalog import get_device

        out = []
        for node in self.nodes:
            for dev_id, count in node.devices:
                dev = get_device(dev_id)
                out.extend(Slot(f"{node.name}/{dev_id}/{i}", node.name, dev) for i in range(count))
        return tuple(out)

    @cached_property
    def device_types(self) -> dict[str, Device]:
        return {s.device.id: s.device for s in self.slots}

    @cached_property
    def counts(self) -> Counter[str]:
        return Counter(s.device.id for s in self.slots)

    def max_per_node(self, device_id: str) -> int:
        return max((c for n in self.nodes for d, c in n.devices if d == device_id), default=0)

    def node_of(self, slot_id: str) -> Node:
        name = slot_id.split("/", 1)[0]
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(slot_id)

    def link_between(self, a: str, b: str) -> Link:
        return self.node_of(a).link if a.split("/", 1)[0] == b.split("/", 1)[0] else self.network

    def intra_link(self, device_id: str) -> Link:
        """The link among devices of one type inside a node (for tensor parallelism)."""
        for n in self.nodes:
            if any(d == device_id for d, _ in n.devices):
                return n.link
        return self.network

    @property
    def size(self) -> int:
        return len(self.slots)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "devices": dict(self.counts),
            "size": self.size,
            "network": {"bandwidth_Bps": self.network.bandwidth,
                        "latency_s": self.network.latency},
            "nodes": [{"name": n.name, "devices": dict(n.devices),
                       "link": {"name": n.link.name, "bandwidth_Bps": n.link.bandwidth,
                                "latency_s": n.link.latency,
                                "collective_latency_s": n.link.collective_s}}
                      for n in self.nodes],
        }


# ---------------------------------------------------------------------------------------------
# YAML spec


class _LinkSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # bounded far above any link (1 PB/s), so that GB/s -> B/s stays finite
    bandwidth_gbps: float = Field(gt=0, le=1e6, allow_inf_nan=False)
    latency_us: float = Field(default=5.0, ge=0, allow_inf_nan=False)
    collective_latency_us: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    name: str = ""

    def build(self) -> Link:
        coll = None if self.collective_latency_us is None else self.collective_latency_us * 1e-6
        return Link(self.bandwidth_gbps * 1e9, self.latency_us * 1e-6, self.name, coll)


class _NodeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    devices: dict[str, StrictInt] = Field(min_length=1)
    count: StrictInt = Field(default=1, ge=1, le=inputs.MAX_DEVICES)
    link: _LinkSpec | None = None


class _ClusterSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    network: _LinkSpec = _LinkSpec(bandwidth_gbps=12.5, latency_us=10, name="ethernet-100g")
    nodes: list[_NodeSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _bounded(self) -> _ClusterSpec:
        total = sum(n.count * sum(n.devices.values()) for n in self.nodes)
        if total > inputs.MAX_DEVICES:
            raise ValueError(f"{total:,} devices, more than a cluster may hold "
                             f"({inputs.MAX_DEVICES:,})")
        return self


def _default_intra_link(devices: list[Device]) -> Link:
    """Inside a node: the devices' chip-to-chip link if all have one, else their host link."""
    chip = [d.chip_link_bw.value for d in devices if d.chip_link_bw]
    if chip and len(chip) == len(devices):
        return Link(min(chip), 3e-6, "chip-to-chip")
    host = [d.host_link_bw.value for d in devices if d.host_link_bw]
    return Link(min(host) if host else 16e9, 8e-6, "pcie")


def cluster_from_dict(data: Any, source: str) -> Cluster:
    from kcloud.hardware.catalog import get_device

    if not isinstance(data, dict):
        raise KCloudError(f"cluster {source}: must hold a mapping (name, network, nodes)",
                          "fix the cluster file (see `kcloud clusters show k-cloud-rack`)")
    try:
        spec = _ClusterSpec.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = str(err["msg"]).removeprefix("Value error, ")
        raise KCloudError(f"cluster {source}: field {where}: {msg}",
                          "fix the cluster file (see `kcloud clusters show k-cloud-rack`)"
                          ) from None
    nodes: list[Node] = []
    names: set[str] = set()
    for ni, n in enumerate(spec.nodes):
        devs: list[Device] = []
        for dev_id, count in n.devices.items():
            if count < 1:
                raise KCloudError(f"cluster {source}: field nodes.{ni}.devices.{dev_id}: count "
                                  f"must be >= 1", "fix the cluster file")
            try:
                devs.append(get_device(dev_id))
            except CatalogError as exc:
                raise KCloudError(f"cluster {source}: field nodes.{ni}.devices: {exc.problem}",
                                  exc.hint) from None
        link = n.link.build() if n.link else _default_intra_link(devs)
        for k in range(n.count):
            name = n.name if n.count == 1 else f"{n.name}-{k}"
            if name in names:
                raise KCloudError(f"cluster {source}: node name '{name}' is used twice",
                                  "give each node a unique name")
            names.add(name)
            nodes.append(Node(name, tuple(n.devices.items()), link))
    return Cluster(spec.name, tuple(nodes), spec.network.build(), source)


BUILTIN: dict[str, dict[str, Any]] = {
    "k-cloud-rack": {
        "name": "k-cloud-rack",
        "network": {"bandwidth_gbps": 25, "latency_us": 8, "name": "ethernet-200g-rdma"},
        "nodes": [
            {"name": "atom", "count": 2, "devices": {"rebellions-atom": 8}},
            {"name": "rngd", "count": 2, "devices": {"furiosa-rngd": 8}},
            {"name": "warboy", "devices": {"furiosa-warboy": 8}},
            {"name": "pim", "devices": {"skhynix-aimx": 8}},
            {"name": "a100", "devices": {"nvidia-a100-sxm-80gb": 8}},
        ],
    },
    # K-Cloud stage 2 (2026-2028): DRAM PIM beside domestic NPUs, on the node's PCIe Gen5
    # fabric (64 GB/s each way, as the NPUs' host links), for decode attention offload: per
    # ATOM-Max, four HBM-PIM stacks (one HBM-PIM card of four stacks, as on the MI100 boards
    # HBM-PIM was shown on); per RNGD, one AiMX card.
    "k-cloud-rack-2028": {
        "name": "k-cloud-rack-2028",
        "network": {"bandwidth_gbps": 25, "latency_us": 8, "name": "ethernet-200g-rdma"},
        "nodes": [
            {"name": "atom-pim", "count": 2,
             "devices": {"rebellions-atom-max": 8, "samsung-hbm-pim": 32},
             "link": {"bandwidth_gbps": 64, "latency_us": 2, "name": "pcie-gen5"}},
            {"name": "rngd-aim", "count": 2,
             "devices": {"furiosa-rngd": 8, "skhynix-aimx": 8},
             "link": {"bandwidth_gbps": 64, "latency_us": 2, "name": "pcie-gen5"}},
        ],
    },
    "gpu-dgx": {
        "name": "gpu-dgx",
        "network": {"bandwidth_gbps": 50, "latency_us": 5, "name": "infiniband-400g"},
        "nodes": [{"name": "dgx", "devices": {"nvidia-h100-sxm": 8}}],
    },
}


def local_cpu_spec(cores: int | None = None) -> dict[str, Any]:
    """This machine's cores as devices, joined by the measured worker-to-worker link (gloo
    over loopback, measured once and cached with the host measurement)."""
    from kcloud.hardware.host import host_link

    n = cores or os.cpu_count() or 1
    bw, lat, coll = host_link()
    link = {"bandwidth_gbps": bw / 1e9, "latency_us": lat * 1e6,
            "collective_latency_us": coll * 1e6, "name": "loopback (measured)"}
    return {
        "name": "local-cpu",
        "network": link,
        "nodes": [{"name": "local", "devices": {"host-cpu:1core": n}, "link": link}],
    }


def builtin_names() -> list[str]:
    return ["local-cpu", *BUILTIN]


def load_cluster(name_or_path: str) -> Cluster:
    """A built-in cluster by name, or a YAML cluster file."""
    if name_or_path == "local-cpu":
        return cluster_from_dict(local_cpu_spec(), "local-cpu")
    if name_or_path in BUILTIN:
        return cluster_from_dict(BUILTIN[name_or_path], name_or_path)
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        text = inputs.read_text(p, "cluster file",
                                f"give a YAML file or one of: {', '.join(builtin_names())}")
        try:
            data = inputs.yaml_data(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise KCloudError(f"cluster {p}: not valid YAML{where}",
                              "fix the file's syntax") from None
        return cluster_from_dict(data, str(p))
    raise KCloudError(f"unknown cluster '{name_or_path}'",
                      f"use one of: {', '.join(builtin_names())}, or a YAML file")
