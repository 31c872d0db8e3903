"""The vocabulary of hardware: sourced figures, devices, partitions.

Every number in the catalog is a `Figure`: a value in SI base units (FLOP/s, bytes, bytes/s,
watts, USD/hour) with the source it came from and whether it is `estimated` (no primary source,
or inferred). Anything computed from an estimated figure is estimated too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType

from kcloud.precision import FALLBACK, Precision


class DeviceKind(StrEnum):
    NPU = "npu"
    PIM = "pim"
    GPU = "gpu"
    CPU = "cpu"


@dataclass(frozen=True)
class Figure:
    value: float
    source: str
    estimated: bool = False
    note: str = ""


@dataclass(frozen=True)
class Partition:
    """A slice of one device handed out on its own (SR-IOV instance, die, core group)."""

    name: str
    count: int  # how many such partitions one device splits into
    compute_fraction: float  # share of the device's compute each partition gets
    memory_bytes: float  # memory each partition gets
    source: str = ""


@dataclass(frozen=True)
class PciId:
    """A device's PCI vendor and device ids (4 lower-case hex digits each), with their source.

    `estimated` marks ids that are not published (in the PCI ID Repository or by the vendor)."""

    vendor: str
    device: str
    source: str
    estimated: bool = False
    note: str = ""

    @property
    def selector(self) -> str:
        """`vendor:device`, as lspci -d, sysfs matching and KubeVirt's pciVendorSelector take it."""
        return f"{self.vendor}:{self.device}"


# The Kubernetes extended-resource name of a partition when the catalog does not say: the
# device's resource with the partition name appended (`furiosa.ai/rngd-2core.12gb`).
DEFAULT_PARTITION_RESOURCE = "{resource}-{partition}"


@dataclass(frozen=True)
class Device:
    id: str
    name: str
    vendor: str
    kind: DeviceKind
    year: int
    domestic: bool  # a Korean-made chip (counts toward the K-Cloud domestic share)
    peak_flops: Mapping[Precision, Figure]  # dense FLOP/s (or OP/s) per precision
    memory_bytes: Figure
    memory_bw: Figure  # bytes/s
    max_power_w: Figure
    idle_power_w: Figure
    sram_bytes: Figure | None = None
    host_link_bw: Figure | None = None  # bytes/s, one direction
    chip_link_bw: Figure | None = None  # bytes/s, device to device (NVLink, C2C), one direction
    price_per_hour: Figure | None = None  # USD per device-hour
    partitions: tuple[Partition, ...] = ()
    projected: bool = False  # a device that does not exist yet: every figure is a projection
    notes: str = ""
    sources: Mapping[str, str] = field(default_factory=dict)  # key -> citation
    pci: PciId | None = None
    # Kubernetes extended-resource name a device plug-in advertises it under ("" for devices
    # that are not handed out as devices, such as CPU cores), and the template of its
    # partitions' names ({resource} and {partition} are filled in).
    k8s_resource: str = ""
    k8s_partition_resource: str = DEFAULT_PARTITION_RESOURCE

    def __post_init__(self) -> None:
        object.__setattr__(self, "peak_flops", MappingProxyType(dict(self.peak_flops)))
        object.__setattr__(self, "sources", MappingProxyType(dict(self.sources)))

    # -- precision --------------------------------------------------------------------------
    def supports(self, precision: Precision) -> bool:
        return precision in self.peak_flops

    def resolve_precision(self, precision: Precision) -> Precision | None:
        """The precision this device would actually run `precision` at, or None if it cannot."""
        if precision in self.peak_flops:
            return precision
        for alt in FALLBACK[precision]:
            if alt in self.peak_flops:
                return alt
        return None

    def peak(self, precision: Precision) -> float:
        return self.peak_flops[precision].value

    @property
    def figures(self) -> dict[str, Figure]:
        out: dict[str, Figure] = {f"peak_{p.value}": f for p, f in self.peak_flops.items()}
        for key in ("memory_bytes", "memory_bw", "max_power_w", "idle_power_w", "sram_bytes",
                    "host_link_bw", "chip_link_bw", "price_per_hour"):
            fig = getattr(self, key)
            if fig is not None:
                out[key] = fig
        return out

    @property
    def estimated_fields(self) -> list[str]:
        return [k for k, f in self.figures.items() if f.estimated or self.projected]

    def partition_resource(self, name: str) -> str:
        """The Kubernetes resource name of partition `name` of this device."""
        if not self.k8s_resource:
            return ""
        return self.k8s_partition_resource.format(resource=self.k8s_resource, partition=name)

    def partition(self, name: str) -> Device:
        """This device cut down to one partition: compute, bandwidth and power scale by share."""
        for p in self.partitions:
            if p.name == name:
                break
        else:
            raise KeyError(name)
        s = p.compute_fraction

        def scaled(f: Figure | None, by: float) -> Figure | None:
            if f is None:
                return None
            return Figure(f.value * by, f.source, f.estimated, f"{f.note} (x{by:g} for {name})")

        return Device(
            id=f"{self.id}:{p.name}",
            name=f"{self.name} [{p.name}]",
            vendor=self.vendor,
            kind=self.kind,
            year=self.year,
            domestic=self.domestic,
            peak_flops={k: scaled(v, s) for k, v in self.peak_flops.items()},  # type: ignore[misc]
            memory_bytes=Figure(p.memory_bytes, p.source or self.memory_bytes.source,
                                self.memory_bytes.estimated),
            memory_bw=scaled(self.memory_bw, s),  # type: ignore[arg-type]
            max_power_w=scaled(self.max_power_w, s),  # type: ignore[arg-type]
            idle_power_w=scaled(self.idle_power_w, s),  # type: ignore[arg-type]
            sram_bytes=scaled(self.sram_bytes, s),
            host_link_bw=scaled(self.host_link_bw, s),
            chip_link_bw=self.chip_link_bw,
            price_per_hour=scaled(self.price_per_hour, s),
            partitions=(),
            projected=self.projected,
            notes=self.notes,
            sources=self.sources,
            pci=self.pci,
            k8s_resource=self.partition_resource(p.name),
        )
