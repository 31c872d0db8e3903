"""Manifests and VM specs from plans: every generated file validates (core kinds with
kubernetes-validate, RayCluster / VirtualMachine / KubeVirt by their upstream schemas, libvirt
XML with virt-xml-validate), the output is a kustomize base kubectl renders, and what the
manifests ask for is what the plan, the catalog and the runtime name."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kcloud.hardware.catalog import get_device
from kcloud.hardware.cluster import cluster_from_dict
from kcloud.k8s.inventory import inventory_from_dict
from kcloud.k8s.manifests import (
    RAY_RESOURCE_PREFIX,
    Options,
    Tenant,
    build_manifests,
    plan_groups,
    write,
)
from kcloud.k8s.validate import ManifestInvalid, build_schemas, validate_file, validate_manifest
from kcloud.k8s.vm import VmOptions, vfio_resource, virt_xml_validate, write_vms
from kcloud.planner import Goal, Plan, make_plan

_REPO = Path(__file__).resolve().parents[1]
SHARED = next((p / "shared" / "schemas" for p in (_REPO.parent, _REPO.parent.parent)
               if (p / "shared" / "schemas").is_dir()), _REPO.parent / "shared" / "schemas")


@pytest.fixture(scope="module")
def plans() -> dict[str, Plan]:
    part = cluster_from_dict({"name": "rngd-parts", "nodes": [
        {"name": "rngd", "count": 2, "devices": {"furiosa-rngd:2core.12gb": 4}}]}, "test")
    return {
        "k-cloud-rack": make_plan("bert-large", "k-cloud-rack", Goal(objective="throughput")).plan,
        "gpu-dgx": make_plan("llama-2-7b", "gpu-dgx", Goal(objective="latency")).plan,
        "partitions": make_plan("mlp", part, Goal(objective="throughput")).plan,
    }


def _docs(folder: Path) -> dict[str, list[dict]]:
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d]
            for p in sorted(folder.glob("*.yaml"))}


@pytest.mark.parametrize("cluster", ["k-cloud-rack", "gpu-dgx"])
@pytest.mark.parametrize("serve", [False, True])
def test_manifests_of_builtin_clusters_validate(plans: dict[str, Plan], cluster: str,
                                                serve: bool, tmp_path: Path) -> None:
    plan = plans[cluster]
    opts = Options(name="demo", namespace="ml", serve=serve,
                   tenants=(Tenant("acme", {"furiosa-rngd": 8}),))
    write(build_manifests(plan, opts), tmp_path)
    files = _docs(tmp_path)
    kust = files.pop("kustomization.yaml")[0]  # checked by kubectl kustomize below
    for name in files:  # each file read back passes its schema
        assert validate_file(tmp_path / name) >= 1
    assert sorted(kust["resources"]) == sorted(files)
    assert ("serve.yaml" in files) is serve

    groups = plan_groups(plan)
    one_node = len({n for g in groups for n in g.nodes}) == 1
    assert one_node is (cluster == "gpu-dgx")  # both forms are covered
    # every device of the plan is asked for once
    assert sum(g.per_node * len(g.nodes) for g in groups) == len(plan.devices)
    cm = files["plan-configmap.yaml"][0]
    assert Plan.from_json(cm["data"]["plan.json"]) == plan
    kinds = [d["kind"] for d in files["device-plugin.yaml"]]
    assert kinds == ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "DaemonSet"]
    ns, quota, policy = files["tenant-acme.yaml"]
    assert ns["metadata"]["name"] == "acme"
    assert quota["spec"]["hard"] == {"requests.furiosa.ai/rngd": "8"}
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    pdb = files["pdb.yaml"][0]
    if serve:
        dep, svc = files["serve.yaml"]
        pod = dep["spec"]["template"]["spec"]["containers"][0]
        assert pod["command"][:4] == ["kcloud", "serve", "--plan", "/etc/kcloud/plan.json"]
        assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    if serve and one_node:  # one pod holds the plan's devices and runs its workers
        assert "raycluster.yaml" not in files and "--ray" not in pod["command"]
        for g in groups:
            assert pod["resources"]["limits"][get_device(g.device_type).k8s_resource] == \
                str(g.per_node)
        assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
        return
    if serve:
        assert pod["command"][-2:] == ["--ray", "ray://demo-ray:10001"]
    rc = files["raycluster.yaml"][0]
    workers = rc["spec"]["workerGroupSpecs"]
    assert len(workers) == len(groups) == len({g.device_type for g in groups})
    for g, w in zip(groups, workers, strict=True):
        dev = get_device(g.device_type)
        limits = w["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits[dev.k8s_resource] == str(g.per_node)
        assert w["replicas"] == len(g.nodes)
        ray = json.loads(w["rayStartParams"]["resources"].strip("'"))
        assert ray == {f"{RAY_RESOURCE_PREFIX}{g.device_type}": g.per_node}
    assert pdb["spec"]["minAvailable"] == sum(w["replicas"] for w in workers)


def test_ray_resource_names_are_the_runtimes() -> None:
    from kcloud.runtime.ray_executor import resource_name

    assert resource_name("furiosa-rngd") == f"{RAY_RESOURCE_PREFIX}furiosa-rngd"


def test_partition_plan_asks_for_partitions_and_configures_the_plugin(
        plans: dict[str, Plan], tmp_path: Path) -> None:
    files = build_manifests(plans["partitions"], Options(name="parts"))
    rc = files["raycluster.yaml"][0]
    (w,) = rc["spec"]["workerGroupSpecs"]
    assert "furiosa.ai/rngd-2core.12gb" in w["template"]["spec"]["containers"][0]["resources"][
        "limits"]
    ds = files["device-plugin.yaml"][-1]
    args = ds["spec"]["template"]["spec"]["containers"][0]["command"]
    assert args[args.index("--partition") + 1] == "furiosa-rngd=2core.12gb"


def test_kubectl_kustomize_renders_the_base(plans: dict[str, Plan], tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (.ci/run installs Debian's kubernetes-client)")
    write(build_manifests(plans["k-cloud-rack"], Options(name="demo", serve=True,
                                                         tenants=(Tenant("acme"),))), tmp_path)
    out = subprocess.run([kubectl, "kustomize", str(tmp_path)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    written = [d for ds in _docs(tmp_path).values() for d in ds if d["kind"] != "Kustomization"]
    assert sorted(d["kind"] for d in rendered) == sorted(d["kind"] for d in written)
    for d in rendered:
        validate_manifest(d)


def test_an_invalid_manifest_is_refused(plans: dict[str, Plan]) -> None:
    files = build_manifests(plans["gpu-dgx"], Options(name="demo"))
    rc = copy.deepcopy(files["raycluster.yaml"][0])
    rc["spec"]["workerGroupSpecs"][0]["replica"] = 1  # a typo: not in the CRD
    with pytest.raises(ManifestInvalid, match="RayCluster schema"):
        validate_manifest(rc)
    rc = copy.deepcopy(files["raycluster.yaml"][0])
    del rc["spec"]["headGroupSpec"]  # required by the CRD
    with pytest.raises(ManifestInvalid, match="headGroupSpec"):
        validate_manifest(rc)
    ds = copy.deepcopy(files["device-plugin.yaml"][-1])
    ds["spec"]["template"]["spec"]["containers"][0]["ports"] = [{"containerPort": "http"}]
    with pytest.raises(ManifestInvalid, match=r"Kubernetes 1\.32\.0"):
        validate_manifest(ds)
    cm = copy.deepcopy(files["plan-configmap.yaml"][0])
    cm["metadata"]["name"] = "Bad_Name"
    with pytest.raises(ManifestInvalid, match="not a valid name"):
        validate_manifest(cm)


def _inventory(node: str, dev_type: str, n: int):
    return inventory_from_dict({"node": node, "devices": [
        {"id": f"d{i}", "type": dev_type, "pci": f"0000:{0x17 + i:02x}:00.0"}
        for i in range(n)]})


def test_vm_specs_validate(plans: dict[str, Plan], tmp_path: Path) -> None:
    plan = plans["gpu-dgx"]
    res = write_vms(plan, VmOptions(name="demo",
                                    inventories={"dgx": _inventory("dgx", "nvidia-h100-sxm", 8)}),
                    tmp_path)
    docs = _docs(tmp_path)
    kv = docs["kubevirt-host-devices.yaml"][0]
    (sel,) = kv["spec"]["configuration"]["permittedHostDevices"]["pciHostDevices"]
    h100 = get_device("nvidia-h100-sxm")
    assert sel == {"pciVendorSelector": "10DE:2330", "resourceName": vfio_resource(h100)}
    vm = docs["vm-dgx.yaml"][0]
    dom = vm["spec"]["template"]["spec"]["domain"]
    assert [h["deviceName"] for h in dom["devices"]["hostDevices"]] == [vfio_resource(h100)] * 8
    assert dom["cpu"]["cores"] >= 8 and dom["memory"]["guest"].endswith("Gi")
    for name in docs:
        validate_file(tmp_path / name)
    xml = tmp_path / "libvirt" / "dgx.xml"
    text = xml.read_text()
    assert text.count("<hostdev ") == 8 and 'bus="0x17"' in text and "vfio" in text
    assert res.missing_inventory == []
    if shutil.which("virt-xml-validate") is None:
        pytest.skip("virt-xml-validate is not installed (.ci/run installs libvirt-clients)")
    assert res.libvirt_checked


def test_vm_specs_of_the_rack_validate(plans: dict[str, Plan], tmp_path: Path) -> None:
    res = write_vms(plans["k-cloud-rack"], VmOptions(name="demo"), tmp_path)
    assert res.missing_inventory  # no inventories: KubeVirt only, nodes named
    for p in res.files:
        validate_file(p)
    sels = _docs(tmp_path)["kubevirt-host-devices.yaml"][0]["spec"]["configuration"][
        "permittedHostDevices"]["pciHostDevices"]
    types = {g.device_type for g in plan_groups(plans["k-cloud-rack"])}
    assert {s["pciVendorSelector"] for s in sels} == {
        get_device(t).pci.selector.upper() for t in types}


def test_virt_xml_validate_rejects_a_broken_domain(tmp_path: Path) -> None:
    if shutil.which("virt-xml-validate") is None:
        pytest.skip("virt-xml-validate is not installed (.ci/run installs libvirt-clients)")
    bad = tmp_path / "bad.xml"
    bad.write_text("<domain type='kvm'><name>x</name><vcpu>two</vcpu></domain>\n")
    with pytest.raises(ManifestInvalid, match="virt-xml-validate"):
        virt_xml_validate(bad)


def test_carried_schemas_are_the_shared_upstream_ones(tmp_path: Path) -> None:
    if not SHARED.is_dir():
        pytest.skip(f"no shared schemas at {SHARED}")
    from kcloud.k8s.validate import SCHEMA_DIR

    for p in build_schemas(SHARED, tmp_path):
        assert p.read_bytes() == (SCHEMA_DIR / p.name).read_bytes(), p.name


def _kcloud(args: list[str], env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([sys.executable, "-c", "from kcloud.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_cli_manifests_and_vm(plans: dict[str, Plan], tmp_path: Path) -> None:
    plan_file = plans["gpu-dgx"].save(tmp_path / "plan.json")
    out = _kcloud(["k8s", "manifests", str(plan_file), "-o", str(tmp_path / "m"), "--serve",
                   "--tenant", "acme=nvidia-h100-sxm:4", "--json"])
    assert out.returncode == 0, out.stderr
    (line,) = out.stdout.strip().splitlines()
    d = json.loads(line)
    assert d["validated"]["kubernetes"] == "1.32.0"
    assert {Path(f["path"]).name for f in d["files"]} >= {"serve.yaml", "tenant-acme.yaml"}
    quota = _docs(tmp_path / "m")["tenant-acme.yaml"][1]
    assert quota["spec"]["hard"] == {"requests.nvidia.com/gpu": "4"}
    out = _kcloud(["k8s", "vm", str(plan_file), "-o", str(tmp_path / "v"), "--json"])
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["nodes_without_inventory"] == ["dgx"]


@pytest.mark.parametrize(("args", "says"), [
    (["k8s", "manifests", "nope.json", "-o", "x"], "no plan file"),
    (["k8s", "manifests", "PLAN", "-o", "x", "--tenant", "a=furiosa-rngd"], "TYPE:COUNT"),
    (["k8s", "manifests", "PLAN", "-o", "x", "--tenant", "a=furiosa-rngx:2"],
     "unknown device"),
    (["k8s", "device-plugin"], "one of --inventory FILE or --discover"),
    (["k8s", "device-plugin", "--inventory", "nope.yaml"], "no inventory file"),
    (["k8s", "device-plugin", "--discover", "--root", "/nonexistent"], "no PCI devices folder"),
    (["k8s", "device-plugin", "--discover", "--partition", "furiosa-rngd"], "TYPE=VALUE"),
    (["k8s", "device-plugin", "--discover", "--partitions-from-node"],
     "KUBERNETES_SERVICE_HOST is not set"),
])
def test_cli_bad_input_is_one_line(plans: dict[str, Plan], tmp_path: Path, args: list[str],
                                   says: str) -> None:
    plan_file = plans["gpu-dgx"].save(tmp_path / "plan.json")
    args = [str(plan_file) if a == "PLAN" else a for a in args]
    out = _kcloud(args, env={"KUBERNETES_SERVICE_HOST": ""})
    assert out.returncode == 2, out.stderr
    assert says in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
