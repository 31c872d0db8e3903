"""A node's accelerators: from an inventory file, or discovered from the host's sysfs.

An inventory file:

    node: npu-0
    devices:
      - {id: rngd0, type: furiosa-rngd, pci: "0000:17:00.0", numa: 0, dev: [/dev/rngd/npu0]}
      - {id: rngd1, type: furiosa-rngd, pci: "0000:18:00.0", numa: 0}
    links: [[rngd0, rngd1]]          # chip-to-chip or same-switch groups (each pair linked)
    partitions: {}                   # e.g. {furiosa-rngd: 2core.12gb}
    mounts:                          # host folders a container of a type gets, e.g. SDK libs
      furiosa-rngd: [{host: /usr/lib/furiosa, container: /usr/lib/furiosa, read_only: true}]

Discovery reads what the Linux kernel publishes under `<root>/sys/bus/pci/devices/<address>/`:
`vendor` and `device` (matched against the catalog's PCI ids), `numa_node`, the device nodes its
drivers created (each `uevent` below the device with a `DEVNAME=`, present under `<root>/dev`),
and the PCIe tree (two devices behind one PCIe switch are linked). `root` is `/` on a node and a
fake tree in tests.

Health: a device is healthy while each of its device nodes exists under `<root>` and, where
the host has a sysfs PCI tree, its PCI function is still there.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kcloud.errors import CatalogError, KCloudError
from kcloud.hardware.catalog import get_device, load_catalog
from kcloud.hardware.device import Device

_BDF = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
_HINT = "fix the inventory file (see `kcloud k8s device-plugin --help`)"


class InventoryError(KCloudError):
    """A malformed inventory file or a host that cannot be read."""


@dataclass(frozen=True)
class Mount:
    host: str
    container: str
    read_only: bool = True


@dataclass(frozen=True)
class NodeDevice:
    id: str  # unique on the node; the device plug-in's device ID (or the prefix of its parts)
    type: str  # catalog id
    pci: str | None = None  # PCI address, domain:bus:slot.function
    numa: int | None = None
    dev: tuple[str, ...] = ()  # device nodes (host paths, mapped to the same container path)


@dataclass(frozen=True)
class Inventory:
    node: str
    devices: tuple[NodeDevice, ...]
    links: frozenset[frozenset[str]] = frozenset()  # linked pairs of device ids
    partitions: Mapping[str, str] = field(default_factory=dict)  # catalog id -> partition name
    mounts: Mapping[str, tuple[Mount, ...]] = field(default_factory=dict)  # catalog id -> mounts
    root: Path = Path("/")  # host root the health check looks under

    def __post_init__(self) -> None:
        object.__setattr__(self, "partitions", MappingProxyType(dict(self.partitions)))
        object.__setattr__(self, "mounts", MappingProxyType(dict(self.mounts)))

    def device(self, dev_id: str) -> NodeDevice:
        for d in self.devices:
            if d.id == dev_id:
                return d
        raise KeyError(dev_id)

    def linked(self, a: str, b: str) -> bool:
        return frozenset((a, b)) in self.links

    def healthy(self, dev: NodeDevice) -> bool:
        """Whether `dev` is usable now: its device nodes exist and its PCI function is there."""
        for node in dev.dev:
            if not _under(self.root, node).exists():
                return False
        pci_root = _under(self.root, "/sys/bus/pci/devices")
        return not (dev.pci and pci_root.is_dir() and not (pci_root / dev.pci).exists())


def _under(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


# -- inventory file ----------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _DeviceIn(_Strict):
    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=40)]
    type: Annotated[str, Field(min_length=1)]
    pci: Annotated[str, Field(pattern=r"^[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$")] \
        | None = None
    numa: Annotated[int, Field(ge=0)] | None = None
    dev: list[Annotated[str, Field(pattern=r"^/dev/\S+$")]] = Field(default_factory=list)


class _MountIn(_Strict):
    host: Annotated[str, Field(pattern=r"^/")]
    container: Annotated[str, Field(pattern=r"^/")]
    read_only: bool = True


class _InventoryIn(_Strict):
    node: Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", max_length=253)]
    devices: list[_DeviceIn] = Field(min_length=1)
    links: list[list[str]] = Field(default_factory=list)
    partitions: dict[str, str] = Field(default_factory=dict)
    mounts: dict[str, list[_MountIn]] = Field(default_factory=dict)


def _catalog_device(dev_type: str, field: str) -> Device:
    try:
        dev = get_device(dev_type)
    except CatalogError as exc:
        raise InventoryError(f"inventory: field {field}: {exc.problem}", exc.hint) from None
    if ":" in dev_type:
        raise InventoryError(f"inventory: field {field}: '{dev_type}' is a partition",
                             "list whole devices and give the profile under partitions:")
    return dev


def inventory_from_dict(data: Any, source: str = "inventory", root: Path | str = "/") -> Inventory:
    try:
        raw = _InventoryIn.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise InventoryError(f"{source}: field {where}: {err['msg']}", _HINT) from None
    ids: set[str] = set()
    devices = []
    for i, d in enumerate(raw.devices):
        if d.id in ids:
            raise InventoryError(f"{source}: field devices.{i}.id: '{d.id}' is listed twice",
                                 "give each device its own id")
        ids.add(d.id)
        _catalog_device(d.type, f"devices.{i}.type")
        devices.append(NodeDevice(d.id, d.type, d.pci.lower() if d.pci else None, d.numa,
                                  tuple(d.dev)))
    links: set[frozenset[str]] = set()
    for i, group in enumerate(raw.links):
        for dev_id in group:
            if dev_id not in ids:
                raise InventoryError(f"{source}: field links.{i}: unknown device '{dev_id}'",
                                     "link device ids listed under devices:")
        links.update(frozenset((a, b)) for a in group for b in group if a != b)
    types = {d.type for d in devices}
    for dev_type, profile in raw.partitions.items():
        dev = _catalog_device(dev_type, f"partitions.{dev_type}")
        names = [p.name for p in dev.partitions]
        if profile not in names:
            hint = f"its partitions: {', '.join(names)}" if names else \
                f"{dev_type} has no partitions"
            raise InventoryError(f"{source}: field partitions.{dev_type}: no partition "
                                 f"'{profile}'", hint)
        if dev_type not in types:
            raise InventoryError(f"{source}: field partitions.{dev_type}: no such device on "
                                 "the node", "partition a type listed under devices:")
    mounts = {t: tuple(Mount(m.host, m.container, m.read_only) for m in ms)
              for t, ms in raw.mounts.items()}
    return Inventory(raw.node, tuple(devices), frozenset(links), raw.partitions, mounts,
                     Path(root))


def load_inventory(path: str | os.PathLike[str], root: Path | str = "/") -> Inventory:
    p = Path(path)
    if not p.is_file():
        raise InventoryError(f"no inventory file at {p}", "give a node inventory YAML file")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise InventoryError(f"inventory {p}: not valid YAML{where}", "fix the file's syntax") \
            from None
    return inventory_from_dict(data, f"inventory {p}", root)


# -- discovery from sysfs ----------------------------------------------------------------------
def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _pci_table() -> dict[str, Device]:
    """Catalog devices by `vendor:device` (the first by id where two share ids)."""
    out: dict[str, Device] = {}
    for dev in sorted(load_catalog(include_host=False).values(), key=lambda d: d.id):
        if dev.pci is not None:
            out.setdefault(dev.pci.selector, dev)
    return out


def _dev_nodes(root: Path, func: Path) -> tuple[str, ...]:
    """Device nodes the drivers of PCI function `func` created: DEVNAME of each uevent below it
    (the kernel's class devices, e.g. drm/card0 or misc/rngd0), kept where /dev has them."""
    out: list[str] = []
    for depth in ("*/uevent", "*/*/uevent", "*/*/*/uevent"):
        for uevent in sorted(func.glob(depth)):
            for line in (_read(uevent) or "").splitlines():
                if line.startswith("DEVNAME="):
                    node = "/dev/" + line.removeprefix("DEVNAME=").strip().lstrip("/")
                    if _under(root, node).exists() and node not in out:
                        out.append(node)
    return tuple(out)


def _switch_of(func: Path) -> str | None:
    """The PCIe switch a function sits behind: its grandparent in the device tree when that is
    itself a PCI function (a switch's upstream port), None below a root port."""
    real = func.resolve()
    grand = real.parent.parent
    return str(grand) if _BDF.match(grand.name) else None


def discover(root: Path | str = "/", node: str | None = None,
             partitions: Mapping[str, str] | None = None,
             mounts: Mapping[str, Iterable[Mount]] | None = None) -> Inventory:
    """The catalog's accelerators on this host, read from `<root>/sys/bus/pci/devices`."""
    root = Path(root)
    pci_root = _under(root, "/sys/bus/pci/devices")
    if not pci_root.is_dir():
        raise InventoryError(f"no PCI devices folder at {pci_root}",
                             "run on a Linux host (or give --root a sysfs tree), or pass "
                             "--inventory FILE")
    table = _pci_table()
    found: list[tuple[NodeDevice, str | None]] = []
    counts: dict[str, int] = {}
    for func in sorted(pci_root.iterdir()):
        vendor = (_read(func / "vendor") or "").lower().removeprefix("0x")
        device = (_read(func / "device") or "").lower().removeprefix("0x")
        dev = table.get(f"{vendor}:{device}")
        if dev is None:
            continue
        numa_text = _read(func / "numa_node")
        numa = int(numa_text) if numa_text and numa_text.lstrip("-").isdigit() else -1
        short = dev.id.split("-", 1)[-1]
        k = counts.get(short, 0)
        counts[short] = k + 1
        found.append((NodeDevice(f"{short}{k}", dev.id, func.name.lower(),
                                 numa if numa >= 0 else None, _dev_nodes(root, func)),
                      _switch_of(func)))
    if not found:
        raise InventoryError(f"no catalog accelerator found under {pci_root}",
                             "check the driver is loaded (lspci -nn), or pass --inventory FILE")
    links = frozenset(frozenset((a.id, b.id)) for a, sa in found for b, sb in found
                      if a.id != b.id and sa is not None and sa == sb)
    devices = tuple(d for d, _ in found)
    name = node or os.environ.get("NODE_NAME") or socket.gethostname()
    data = {"node": name.lower(), "devices": [{"id": d.id, "type": d.type} for d in devices],
            "partitions": dict(partitions or {})}
    checked = inventory_from_dict(data, "discovered devices", root)  # same checks as a file
    return Inventory(checked.node, devices, links, checked.partitions,
                     {t: tuple(ms) for t, ms in (mounts or {}).items()}, root)
