"""`kcloud k8s`: the device plug-in, Kubernetes / KubeRay manifests and VM specs from a plan."""

from __future__ import annotations

import logging
import signal
import threading
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from kcloud.cli import app
from kcloud.cli._common import console, emit_json, err_console
from kcloud.errors import KCloudError

k8s_app = typer.Typer(
    name="k8s",
    help="Kubernetes and VMs: the NPU device plug-in, manifests and VM specs from a plan.",
    add_completion=False,
    no_args_is_help=True,
)

_JsonOption = Annotated[
    bool, typer.Option("--json", help="Print one JSON object on stdout instead of a table.")
]
_Out = Annotated[Path, typer.Option("-o", "--out", help="Folder to write the files into")]
_PlanArg = Annotated[Path, typer.Argument(metavar="PLAN.json",
                                          help="A plan written by `kcloud plan -o`")]


def _pairs(values: list[str] | None, flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values or []:
        key, sep, val = v.partition("=")
        if not sep or not key or not val:
            raise KCloudError(f"{flag} '{v}' is not TYPE=VALUE",
                              f"e.g. {flag} furiosa-rngd=2core.12gb")
        out[key.strip()] = val.strip()
    return out


@k8s_app.command("device-plugin")
def device_plugin(
    kubelet_dir: Annotated[Path, typer.Option(help="The kubelet's device-plugin folder")] =
        Path("/var/lib/kubelet/device-plugins"),
    inventory: Annotated[Path | None, typer.Option(help="Node inventory YAML file")] = None,
    discover: Annotated[bool, typer.Option("--discover",
                                           help="Find the devices in sysfs instead")] = False,
    root: Annotated[Path, typer.Option(help="Host root to read sysfs and /dev under")] =
        Path("/"),
    node: Annotated[str | None, typer.Option(help="Node name (default: $NODE_NAME, "
                                                  "hostname)")] = None,
    partition: Annotated[list[str] | None, typer.Option(
        help="TYPE=PROFILE: advertise TYPE's devices as partitions (with --discover)")] = None,
    partitions_from_node: Annotated[bool, typer.Option(
        "--partitions-from-node", help="Also take profiles from the node's "
        "kcloud.io/partition.TYPE labels (Kubernetes API; --partition wins)")] = False,
    health_interval: Annotated[float, typer.Option(help="Seconds between health checks")] = 5.0,
) -> None:
    """Serve the kubelet device plug-in API for this node's accelerators until SIGTERM."""
    from kcloud.k8s.inventory import discover as discover_devices
    from kcloud.k8s.inventory import load_inventory
    from kcloud.k8s.plugin import DevicePlugin

    if (inventory is None) == (not discover):
        raise KCloudError("give one of --inventory FILE or --discover",
                          "see `kcloud k8s device-plugin --help`")
    if health_interval <= 0:
        raise KCloudError("--health-interval must be > 0", "e.g. --health-interval 5")
    if inventory is not None:
        if partition or partitions_from_node:
            raise KCloudError("--partition and --partitions-from-node go with --discover",
                              "give partitions: in the inventory file")
        inv = load_inventory(inventory, root)
    else:
        profiles = _pairs(partition, "--partition")
        if partitions_from_node:
            import os
            import socket

            from kcloud.k8s.nodeinfo import node_partitions

            name = node or os.environ.get("NODE_NAME") or socket.gethostname()
            profiles = {**node_partitions(name), **profiles}
        inv = discover_devices(root, node, profiles)
    logging.basicConfig(level=logging.INFO, format="kcloud device-plugin: %(message)s")
    plugin = DevicePlugin(inv, kubelet_dir, health_interval_s=health_interval)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    plugin.start()
    for res, ids in plugin.resources.items():
        err_console.print(f"node {escape(inv.node)}: {escape(res)}: {len(ids)} devices "
                          f"({escape(', '.join(ids[:4]))}{', ...' if len(ids) > 4 else ''})")
    while not stop.wait(0.5):
        pass
    plugin.stop()


def _tenants(values: list[str] | None, plan: Any) -> tuple[Any, ...]:
    from kcloud.hardware.catalog import get_device
    from kcloud.k8s.manifests import Tenant, plan_groups

    out = []
    for v in values or []:
        name, sep, spec = v.partition("=")
        if not name:
            raise KCloudError(f"--tenant '{v}' has no name", "e.g. --tenant acme")
        if not sep:  # the plan's own devices
            quota = {g.device_type: g.per_node * len(g.nodes) for g in plan_groups(plan)}
        else:
            quota = {}
            for item in spec.split(","):
                dtype, colon, n = item.partition(":")
                if not colon or not n.strip().isdigit():
                    raise KCloudError(f"--tenant '{v}': '{item}' is not TYPE:COUNT",
                                      "e.g. --tenant acme=furiosa-rngd:8,rebellions-atom:4")
                get_device(dtype.strip())  # an unknown type is a one-line error
                quota[dtype.strip()] = int(n)
        out.append(Tenant(name, quota))
    return tuple(out)


def _ray_version() -> str:
    try:
        return metadata.version("ray")
    except metadata.PackageNotFoundError:
        from kcloud.k8s.manifests import Options

        return Options(name="x").ray_version


def _file_table(title: str, rows: list[tuple[str, str]]) -> None:
    t = Table(title=title, header_style="bold", title_justify="left")
    t.add_column("file")
    t.add_column("kinds")
    for f, kinds in rows:
        t.add_row(escape(f), escape(kinds))
    console.print(t)


@k8s_app.command("manifests")
def manifests(
    plan_file: _PlanArg,
    out: _Out,
    namespace: Annotated[str, typer.Option(help="Namespace of the workload")] = "kcloud",
    image: Annotated[str | None, typer.Option(help="Container image with kcloud")] = None,
    name: Annotated[str | None, typer.Option(help="Name of the RayCluster and the rest "
                                                  "(default: from the model)")] = None,
    serve: Annotated[bool, typer.Option("--serve", help="Also a `kcloud serve` Deployment "
                                                        "and Service")] = False,
    tenant: Annotated[list[str] | None, typer.Option(
        help="NAME or NAME=TYPE:COUNT,...: a tenant namespace with a device quota "
             "(default quota: the plan's devices)")] = None,
    as_json: _JsonOption = False,
) -> None:
    """Write KubeRay / Kubernetes manifests (a kustomize base) for a plan, each validated."""
    from kcloud.k8s.manifests import DEFAULT_IMAGE, Options, build_manifests, dns_label, write
    from kcloud.k8s.validate import K8S_VERSION
    from kcloud.planner.plan import Plan

    plan = Plan.load(plan_file)
    opts = Options(name=dns_label(name or plan.model, 40), namespace=dns_label(namespace),
                   image=image or DEFAULT_IMAGE, serve=serve, tenants=_tenants(tenant, plan),
                   ray_version=_ray_version())
    files = build_manifests(plan, opts)
    written = write(files, out)
    rows = [(str(p), ", ".join(d["kind"] for d in files.get(p.name, [])) or "Kustomization")
            for p in written]
    if as_json:
        emit_json({"out": str(out), "files": [{"path": f, "kinds": k.split(", ")}
                                              for f, k in rows],
                   "validated": {"kubernetes": K8S_VERSION, "custom": ["ray.io/v1 RayCluster"]}})
        return
    _file_table(f"{opts.name}: manifests in {out}", rows)
    console.print(f"validated: core kinds against Kubernetes {K8S_VERSION} (kubernetes-validate, "
                  "strict), RayCluster against KubeRay's CRD schema; apply with "
                  f"`kubectl apply -k {out}`")


@k8s_app.command("vm")
def vm(
    plan_file: _PlanArg,
    out: _Out,
    namespace: Annotated[str, typer.Option(help="Namespace of the VirtualMachines")] = "kcloud",
    name: Annotated[str | None, typer.Option(help="Name prefix (default: from the model)")] =
        None,
    vm_image: Annotated[str | None, typer.Option(help="containerDisk image of the guest")] =
        None,
    inventory: Annotated[list[Path] | None, typer.Option(
        help="Node inventory file (PCI addresses for the libvirt XML); repeat per node")] = None,
    as_json: _JsonOption = False,
) -> None:
    """Write KubeVirt VirtualMachines and libvirt domain XML for a plan, with its NPUs passed
    through."""
    from kcloud.k8s.inventory import load_inventory
    from kcloud.k8s.manifests import dns_label
    from kcloud.k8s.vm import DEFAULT_VM_IMAGE, VmOptions, write_vms
    from kcloud.planner.plan import Plan

    plan = Plan.load(plan_file)
    invs = {}
    for f in inventory or []:
        inv = load_inventory(f)
        invs[inv.node] = inv
    opts = VmOptions(name=dns_label(name or plan.model, 30), namespace=dns_label(namespace),
                     vm_image=vm_image or DEFAULT_VM_IMAGE, inventories=invs)
    res = write_vms(plan, opts, out)
    libvirt = "virt-xml-validate" if res.libvirt_checked else "not checked (virt-xml-validate " \
        "is not installed)" if any(p.suffix == ".xml" for p in res.files) else "none written"
    if as_json:
        emit_json({"out": str(out), "files": [str(p) for p in res.files],
                   "libvirt_validated": res.libvirt_checked,
                   "nodes_without_inventory": res.missing_inventory})
        return
    _file_table(f"{opts.name}: VM specs in {out}",
                [(str(p), "libvirt domain" if p.suffix == ".xml" else
                  "KubeVirt" if p.name.startswith("kubevirt") else "VirtualMachine")
                 for p in res.files])
    console.print(f"validated: KubeVirt documents against KubeVirt's API definitions; libvirt "
                  f"XML: {libvirt}")
    if res.missing_inventory:
        console.print("no libvirt XML for " + escape(", ".join(res.missing_inventory)) +
                      " (their PCI addresses come from --inventory FILE)")


@k8s_app.command("resources")
def resources(as_json: _JsonOption = False) -> None:
    """The Kubernetes resource names and PCI ids of the catalog's devices and partitions."""
    from kcloud.hardware.catalog import list_devices
    from kcloud.k8s.vm import vfio_resource

    rows = []
    for d in list_devices(include_host=False):
        rows.append({"device": d.id, "resource": d.k8s_resource,
                     "partitions": [d.partition_resource(p.name) for p in d.partitions],
                     "pci": d.pci.selector if d.pci else None,
                     "pci_estimated": bool(d.pci and d.pci.estimated),
                     "pci_source": d.pci.source if d.pci else None,
                     "vfio_resource": vfio_resource(d)})
    if as_json:
        emit_json({"devices": rows})
        return
    t = Table(title="Kubernetes resources of the catalog (* = estimated PCI ids)",
              header_style="bold", title_justify="left")
    for col in ("device", "resource", "partition resources", "PCI vendor:device"):
        t.add_column(col)
    for r in rows:
        t.add_row(escape(r["device"]), escape(r["resource"]),
                  escape(", ".join(r["partitions"]) or "-"),
                  escape((r["pci"] or "-") + (" *" if r["pci_estimated"] else "")))
    console.print(t)


app.add_typer(k8s_app, name="k8s")
