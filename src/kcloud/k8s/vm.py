"""VMs from a plan: a KubeVirt `VirtualMachine` per node of the plan with its accelerators passed
through (VFIO `hostDevices`, permitted by PCI vendor:device id from the catalog in a `KubeVirt`
configuration), and a libvirt domain XML per node for hosts without Kubernetes.

vCPUs and memory follow the same sizing as the containers (`manifests.host_resources`), plus
`GUEST_OS_CPU` and `GUEST_OS_MEMORY` for the guest's own system. A partition device type is
passed through as the whole devices that hold its partitions (VFIO hands out PCI functions).

libvirt needs each device's PCI address, which only the node knows: it comes from the node's
inventory (`--inventory`, the device plug-in's file); a node without one gets no domain XML.
Validation: KubeVirt documents by their Swagger definitions (`validate`), domain XML by
`virt-xml-validate` (libvirt's own RelaxNG schemas) where it is installed.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kcloud.errors import KCloudError
from kcloud.hardware.catalog import get_device
from kcloud.hardware.device import Device, DeviceKind
from kcloud.k8s.inventory import Inventory
from kcloud.k8s.manifests import (
    RAY_RESOURCE_PREFIX,
    dns_label,
    dump,
    host_resources,
    slot_parts,
)
from kcloud.k8s.validate import ManifestInvalid, validate_manifest
from kcloud.planner.plan import Plan

GUEST_OS_CPU = 2
GUEST_OS_MEMORY = 4 * 2**30
GIB = 2**30
DEFAULT_VM_IMAGE = "quay.io/containerdisks/ubuntu:22.04"


@dataclass(frozen=True)
class VmOptions:
    name: str
    namespace: str = "kcloud"
    vm_image: str = DEFAULT_VM_IMAGE
    inventories: Mapping[str, Inventory] = field(default_factory=dict)  # node -> inventory
    disk_dir: str = "/var/lib/libvirt/images"


@dataclass(frozen=True)
class NodeVm:
    """What one plan node's VM holds."""

    node: str
    cpus: int
    memory_gib: int
    passthrough: tuple[tuple[Device, int], ...]  # (whole catalog device, how many)
    ray_resources: Mapping[str, int]


def vfio_resource(dev: Device) -> str:
    """KubeVirt's resource name for the device passed through with VFIO (`furiosa.ai/rngd-vfio`)."""
    domain = dev.k8s_resource.split("/", 1)[0] if dev.k8s_resource else "kcloud.io"
    return f"{domain}/{dev.id.split('-', 1)[-1]}-vfio"


def node_vms(plan: Plan) -> list[NodeVm]:
    types: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    memory: dict[str, float] = defaultdict(float)
    for r in plan.replicas:
        for st in r.stages:
            for slot in st.devices:
                node, dtype = slot_parts(slot)
                types[node][dtype] += 1
                memory[node] += st.memory_bytes
    out = []
    for node, counts in types.items():
        cpus = GUEST_OS_CPU
        devices = 0
        passthrough: dict[str, int] = defaultdict(int)
        for dtype, n in counts.items():
            dev = get_device(dtype)
            if dev.kind is DeviceKind.CPU:
                cpus += n
                continue
            devices += n
            base_id, _, part = dtype.partition(":")
            base = get_device(base_id)
            per = next((p.count for p in base.partitions if p.name == part), 1) if part else 1
            passthrough[base_id] += math.ceil(n / per)
        req = host_resources(devices, memory[node], cpu_devices=0)
        cpus += req[0]
        mem = math.ceil((req[1] + GUEST_OS_MEMORY) / GIB)
        out.append(NodeVm(node, cpus, mem,
                          tuple((get_device(d), n) for d, n in passthrough.items()),
                          {f"{RAY_RESOURCE_PREFIX}{t}": n for t, n in counts.items()}))
    return out


def kubevirt_config(vms: list[NodeVm]) -> dict[str, Any]:
    """The KubeVirt configuration that permits the plan's devices by PCI vendor:device id
    (merge it into the cluster's KubeVirt resource)."""
    seen: dict[str, Device] = {}
    for vm in vms:
        for dev, _ in vm.passthrough:
            seen.setdefault(dev.id, dev)
    pci = []
    for dev in seen.values():
        if dev.pci is None:
            raise KCloudError(f"device {dev.id} has no PCI ids in the catalog",
                              "add a pci: block to its catalog file")
        pci.append({"pciVendorSelector": dev.pci.selector.upper(),
                    "resourceName": vfio_resource(dev)})
    return {"apiVersion": "kubevirt.io/v1", "kind": "KubeVirt",
            "metadata": {"name": "kubevirt", "namespace": "kubevirt"},
            "spec": {"configuration": {
                "developerConfiguration": {"featureGates": ["HostDevices"]},
                "permittedHostDevices": {"pciHostDevices": pci}}}}


def _cloud_init(vm: NodeVm, plan: Plan) -> str:
    import json

    resources = json.dumps(dict(vm.ray_resources))
    return ("#cloud-config\n"
            f"hostname: {dns_label(vm.node)}\n"
            "write_files:\n"
            "  - path: /etc/kcloud/ray-resources.json\n"
            f"    content: '{resources}'\n"
            "  - path: /etc/kcloud/model\n"
            f"    content: '{plan.model}'\n")


def virtual_machine(vm: NodeVm, plan: Plan, o: VmOptions) -> dict[str, Any]:
    name = dns_label(f"{o.name}-{vm.node}")
    labels = {"app.kubernetes.io/name": "kcloud", "app.kubernetes.io/instance": o.name,
              "kcloud.io/node": dns_label(vm.node)}
    host_devices = []
    for dev, n in vm.passthrough:
        short = dns_label(dev.id.split("-", 1)[-1])
        host_devices.extend({"name": f"{short}{k}", "deviceName": vfio_resource(dev)}
                            for k in range(n))
    memory = f"{vm.memory_gib}Gi"
    return {
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
        "metadata": {"name": name, "namespace": o.namespace, "labels": labels,
                     "annotations": {"kcloud.io/model": plan.model}},
        "spec": {
            "runStrategy": "Always",
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "domain": {
                        "cpu": {"cores": vm.cpus, "sockets": 1, "threads": 1},
                        "memory": {"guest": memory},
                        "resources": {"requests": {"memory": memory}},
                        "devices": {
                            "disks": [{"name": "rootdisk", "disk": {"bus": "virtio"}},
                                      {"name": "cloudinit", "disk": {"bus": "virtio"}}],
                            "interfaces": [{"name": "default", "masquerade": {}}],
                            "hostDevices": host_devices,
                        },
                    },
                    "networks": [{"name": "default", "pod": {}}],
                    "volumes": [
                        {"name": "rootdisk", "containerDisk": {"image": o.vm_image}},
                        {"name": "cloudinit",
                         "cloudInitNoCloud": {"userData": _cloud_init(vm, plan)}},
                    ],
                },
            },
        },
    }


def _address(pci: str) -> dict[str, str]:
    dom, bus, rest = pci.split(":")
    slot, func = rest.split(".")
    return {"domain": f"0x{dom}", "bus": f"0x{bus}", "slot": f"0x{slot}",
            "function": f"0x{func}"}


def libvirt_domain(vm: NodeVm, o: VmOptions, inv: Inventory) -> str:
    """The domain XML of `vm`, its devices at the PCI addresses the node's inventory gives."""
    name = dns_label(f"{o.name}-{vm.node}")
    dom = ET.Element("domain", type="kvm")
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "memory", unit="GiB").text = str(vm.memory_gib)
    ET.SubElement(dom, "vcpu", placement="static").text = str(vm.cpus)
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", arch="x86_64", machine="q35").text = "hvm"
    ET.SubElement(os_el, "boot", dev="hd")
    feats = ET.SubElement(dom, "features")
    ET.SubElement(feats, "acpi")
    ET.SubElement(feats, "apic")
    ET.SubElement(dom, "cpu", mode="host-passthrough")
    devs = ET.SubElement(dom, "devices")
    disk = ET.SubElement(devs, "disk", type="file", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type="qcow2")
    ET.SubElement(disk, "source", file=f"{o.disk_dir}/{name}.qcow2")
    ET.SubElement(disk, "target", dev="vda", bus="virtio")
    nic = ET.SubElement(devs, "interface", type="network")
    ET.SubElement(nic, "source", network="default")
    ET.SubElement(nic, "model", type="virtio")
    for dev, n in vm.passthrough:
        have = [d for d in inv.devices if d.type == dev.id and d.pci]
        if len(have) < n:
            raise KCloudError(f"inventory of node {inv.node} lists {len(have)} {dev.id} with a "
                              f"PCI address; the plan uses {n}",
                              "give every device's pci: address in the inventory")
        for d in have[:n]:
            hd = ET.SubElement(devs, "hostdev", mode="subsystem", type="pci", managed="yes")
            ET.SubElement(hd, "driver", name="vfio")
            src = ET.SubElement(hd, "source")
            ET.SubElement(src, "address", **_address(d.pci or ""))
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode") + "\n"


def virt_xml_validate(path: Path) -> bool:
    """Check a domain XML with libvirt's `virt-xml-validate`; False when it is not installed,
    ManifestInvalid when it rejects the file."""
    exe = shutil.which("virt-xml-validate")
    if exe is None:
        return False
    res = subprocess.run([exe, str(path), "domain"], capture_output=True, text=True,
                         timeout=60)
    if res.returncode != 0:
        why = (res.stderr or res.stdout).strip().splitlines()
        raise ManifestInvalid(f"generated {path.name} fails virt-xml-validate: "
                              f"{why[0] if why else 'rejected'}",
                              "this is a K-Cloud bug: please report it")
    return True


@dataclass
class VmOutput:
    files: list[Path]
    libvirt_checked: bool  # every domain XML passed virt-xml-validate
    missing_inventory: list[str]  # plan nodes with no inventory: no domain XML for them


def write_vms(plan: Plan, o: VmOptions, out: Path) -> VmOutput:
    vms = node_vms(plan)
    docs: dict[str, list[dict[str, Any]]] = {"kubevirt-host-devices.yaml": [kubevirt_config(vms)]}
    for vm in vms:
        docs[f"vm-{dns_label(vm.node)}.yaml"] = [virtual_machine(vm, plan, o)]
    for ds in docs.values():
        for d in ds:
            validate_manifest(d)
    domains = {vm.node: libvirt_domain(vm, o, o.inventories[vm.node])
               for vm in vms if vm.node in o.inventories}
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for name, ds in docs.items():
        p = out / name
        p.write_text(dump(ds))
        files.append(p)
    checked = bool(domains)
    if domains:
        (out / "libvirt").mkdir(exist_ok=True)
    for node, xml in domains.items():
        p = out / "libvirt" / f"{dns_label(node)}.xml"
        tmp = p.with_suffix(".xml.tmp")  # checked before it takes its name
        tmp.write_text(xml)
        try:
            checked = virt_xml_validate(tmp) and checked
        except ManifestInvalid:
            tmp.unlink()
            raise
        tmp.replace(p)
        files.append(p)
    return VmOutput(files, checked, [vm.node for vm in vms if vm.node not in o.inventories])
