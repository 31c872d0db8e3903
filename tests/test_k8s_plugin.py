"""The device plug-in against a stub kubelet: registration, devices, allocation, health,
kubelet restart, a broken ListAndWatch stream, partitions, topology, SIGTERM; discovery from a
fake sysfs tree; the generated gRPC modules match the .proto."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml

from kcloud.k8s.inventory import InventoryError, discover, inventory_from_dict, load_inventory
from kcloud.k8s.plugin import DevicePlugin, preferred, resource_units
from kcloud.k8s.proto import deviceplugin_pb2 as pb
from tests.k8s_stub import StubKubelet, Watch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # unix socket paths are limited to 108 bytes: pytest's tmp_path can be longer
    d = Path(tempfile.mkdtemp(prefix="kdp", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _host(root: Path, n: int = 4) -> dict:
    """A node of `n` RNGDs whose device nodes exist under `root`; rngd0-1 and rngd2-3 linked."""
    devices = []
    for i in range(n):
        node = root / "dev" / "rngd" / f"npu{i}"
        node.parent.mkdir(parents=True, exist_ok=True)
        node.touch()
        devices.append({"id": f"rngd{i}", "type": "furiosa-rngd",
                        "pci": f"0000:{0x17 + i:02x}:00.0", "numa": i // 2,
                        "dev": [f"/dev/rngd/npu{i}"]})
    links = [[f"rngd{i}", f"rngd{i + 1}"] for i in range(0, n - 1, 2)]
    return {"node": "npu-0", "devices": devices, "links": links,
            "mounts": {"furiosa-rngd": [{"host": "/opt/furiosa", "container": "/opt/furiosa"}]}}


def _plugin(kdir: Path, inv) -> DevicePlugin:
    return DevicePlugin(inv, kdir, health_interval_s=0.05, watch_interval_s=0.05,
                        relist_grace_s=0.3, retry_s=0.05)


def test_registers_lists_allocates_sees_health_and_kubelet_restart(short_dir: Path) -> None:
    kdir, root = short_dir / "dp", short_dir / "root"
    kdir.mkdir()
    kubelet = StubKubelet(kdir).start()
    inv = inventory_from_dict(_host(root), root=root)
    plugin = _plugin(kdir, inv)
    plugin.start()
    try:
        reg = kubelet.next_registration()
        assert reg.version == "v1beta1"
        assert reg.resource_name == "furiosa.ai/rngd"
        assert reg.options.get_preferred_allocation_available and reg.options.pre_start_required
        assert (kdir / reg.endpoint).exists()
        channel, stub = kubelet.plugin(reg)
        with channel:
            opts = stub.GetDevicePluginOptions(pb.Empty(), timeout=5)
            assert opts.get_preferred_allocation_available
            watch = Watch(stub)
            assert watch.next() == {f"rngd{i}": "Healthy" for i in range(4)}

            resp = stub.Allocate(pb.AllocateRequest(container_requests=[
                pb.ContainerAllocateRequest(devices_ids=["rngd0", "rngd1"])]), timeout=5)
            c = resp.container_responses[0]
            assert c.envs["KCLOUD_VISIBLE_DEVICES"] == "rngd0,rngd1"
            assert c.envs["KCLOUD_DEVICE_TYPE"] == "furiosa-rngd"
            assert [(d.host_path, d.container_path, d.permissions) for d in c.devices] == [
                ("/dev/rngd/npu0", "/dev/rngd/npu0", "rw"),
                ("/dev/rngd/npu1", "/dev/rngd/npu1", "rw")]
            assert [(m.host_path, m.container_path, m.read_only) for m in c.mounts] == [
                ("/opt/furiosa", "/opt/furiosa", True)]
            with pytest.raises(grpc.RpcError) as err:
                stub.Allocate(pb.AllocateRequest(container_requests=[
                    pb.ContainerAllocateRequest(devices_ids=["rngd9"])]), timeout=5)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

            # the device node of rngd2 vanishes: it is listed again as Unhealthy
            (root / "dev" / "rngd" / "npu2").unlink()
            assert watch.next()["rngd2"] == "Unhealthy"
            with pytest.raises(grpc.RpcError) as err:
                stub.PreStartContainer(pb.PreStartContainerRequest(devices_ids=["rngd2"]),
                                       timeout=5)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            (root / "dev" / "rngd" / "npu2").touch()
            assert watch.next()["rngd2"] == "Healthy"
            watch.cancel()

        # the kubelet restarts (and removes the plug-in's socket): it registers again
        while not kubelet.registrations.empty():
            kubelet.registrations.get_nowait()
        kubelet.restart()
        again = kubelet.next_registration()
        assert again.resource_name == "furiosa.ai/rngd"
        channel, stub = kubelet.plugin(again)
        with channel:
            watch = Watch(stub)
            assert set(watch.next()) == {f"rngd{i}" for i in range(4)}
            watch.cancel()
    finally:
        plugin.stop()
        kubelet.stop()
    assert not list(kdir.glob("kcloud-*.sock"))  # stop() removes its sockets


def test_broken_list_and_watch_stream_reregisters(short_dir: Path) -> None:
    kdir, root = short_dir / "dp", short_dir / "root"
    kdir.mkdir()
    kubelet = StubKubelet(kdir).start()
    plugin = _plugin(kdir, inventory_from_dict(_host(root, 2), root=root))
    plugin.start()
    try:
        reg = kubelet.next_registration()
        channel, stub = kubelet.plugin(reg)
        with channel:
            watch = Watch(stub)
            watch.next()
            watch.cancel()  # the stream breaks and the kubelet does not reopen it
            again = kubelet.next_registration()
            assert again.resource_name == reg.resource_name
            watch = Watch(stub)  # the kubelet's new stream lists the devices again
            assert watch.next() == {"rngd0": "Healthy", "rngd1": "Healthy"}
            watch.cancel()
    finally:
        plugin.stop()
        kubelet.stop()


def test_registration_is_retried_until_the_kubelet_is_up(short_dir: Path) -> None:
    kdir, root = short_dir / "dp", short_dir / "root"
    kdir.mkdir()
    plugin = _plugin(kdir, inventory_from_dict(_host(root, 1), root=root))
    plugin.start()
    try:
        time.sleep(0.3)  # no kubelet yet: nothing registered, plug-in keeps serving
        assert plugin.registrations == 0
        kubelet = StubKubelet(kdir).start()
        assert kubelet.next_registration().resource_name == "furiosa.ai/rngd"
        kubelet.stop()
    finally:
        plugin.stop()


def test_partitions_are_advertised_instead_of_the_whole_device(short_dir: Path) -> None:
    kdir, root = short_dir / "dp", short_dir / "root"
    kdir.mkdir()
    spec = _host(root, 4)
    spec["partitions"] = {"furiosa-rngd": "2core.12gb"}
    spec["devices"].append({"id": "atom0", "type": "rebellions-atom"})
    inv = inventory_from_dict(spec, root=root)
    units = resource_units(inv)
    assert sorted(units) == ["furiosa.ai/rngd-2core.12gb", "rebellions.ai/atom"]
    assert len(units["furiosa.ai/rngd-2core.12gb"]) == 16  # 4 cards x 4 instances
    kubelet = StubKubelet(kdir).start()
    plugin = _plugin(kdir, inv)
    plugin.start()
    try:
        regs = {kubelet.next_registration().resource_name for _ in range(2)}
        assert regs == {"furiosa.ai/rngd-2core.12gb", "rebellions.ai/atom"}
        assert plugin.resources["rebellions.ai/atom"] == ["atom0"]
        server = next(s for s in plugin.servers if s.resource.endswith("2core.12gb"))
        channel, stub = kubelet.plugin(pb.RegisterRequest(endpoint=server.path.name))
        with channel:
            watch = Watch(stub)
            listed = watch.next()
            watch.cancel()
            assert "rngd0" not in listed and "rngd0:2core.12gb:3" in listed
            # the preferred pair: two instances of one chip
            pref = stub.GetPreferredAllocation(pb.PreferredAllocationRequest(container_requests=[
                pb.ContainerPreferredAllocationRequest(
                    available_deviceIDs=["rngd0:2core.12gb:0", "rngd2:2core.12gb:0",
                                         "rngd2:2core.12gb:1"], allocation_size=2)]), timeout=5)
            assert set(pref.container_responses[0].deviceIDs) == {"rngd2:2core.12gb:0",
                                                                  "rngd2:2core.12gb:1"}
            resp = stub.Allocate(pb.AllocateRequest(container_requests=[
                pb.ContainerAllocateRequest(devices_ids=["rngd1:2core.12gb:0"])]), timeout=5)
            c = resp.container_responses[0]
            assert c.envs["KCLOUD_DEVICE_TYPE"] == "furiosa-rngd:2core.12gb"
            assert [d.host_path for d in c.devices] == ["/dev/rngd/npu1"]
    finally:
        plugin.stop()
        kubelet.stop()


def test_preferred_allocation_follows_links_then_numa(tmp_path: Path) -> None:
    spec = _host(tmp_path, 4)
    spec["links"] = [["rngd1", "rngd3"]]  # rngd1-rngd3 linked across NUMA nodes 0 and 1
    inv = inventory_from_dict(spec, root=tmp_path)
    units = resource_units(inv)["furiosa.ai/rngd"]
    ids = [u.id for u in units]
    assert set(preferred(units, inv, ids, [], 2)) == {"rngd1", "rngd3"}  # the link first
    assert set(preferred(units, inv, ids, ["rngd0"], 2)) == {"rngd0", "rngd1"}  # then NUMA
    assert preferred(units, inv, ["rngd0", "rngd2"], ["rngd2"], 1) == ["rngd2"]


def _fake_sysfs(root: Path) -> None:
    """Two RNGDs behind one PCIe switch, one on its own root port, one NIC (not matched)."""
    top = root / "sys" / "devices" / "pci0000:16"
    switch = top / "0000:16:01.0" / "0000:17:00.0"
    funcs = {
        "0000:19:00.0": (switch / "0000:18:00.0" / "0000:19:00.0", "0x1ed2", "0x0001", "0"),
        "0000:1a:00.0": (switch / "0000:18:01.0" / "0000:1a:00.0", "0x1ed2", "0x0001", "0"),
        "0000:40:00.0": (top / "0000:16:02.0" / "0000:40:00.0", "0x1ed2", "0x0001", "1"),
        "0000:50:00.0": (top / "0000:16:03.0" / "0000:50:00.0", "0x15b3", "0x101b", "1"),
    }
    bus = root / "sys" / "bus" / "pci" / "devices"
    bus.mkdir(parents=True)
    for k, (addr, (path, vendor, device, numa)) in enumerate(funcs.items()):
        path.mkdir(parents=True)
        (path / "vendor").write_text(vendor + "\n")
        (path / "device").write_text(device + "\n")
        (path / "numa_node").write_text(numa + "\n")
        os.symlink(os.path.relpath(path, bus), bus / addr)
        if vendor == "0x1ed2":
            cls = path / "rngd_mgmt" / f"rngd{k}"
            cls.mkdir(parents=True)
            (cls / "uevent").write_text(f"MAJOR=510\nMINOR={k}\nDEVNAME=rngd/npu{k}mgmt\n")
            (root / "dev" / "rngd").mkdir(parents=True, exist_ok=True)
            (root / "dev" / "rngd" / f"npu{k}mgmt").touch()


def test_discovery_from_a_fake_sysfs_tree(tmp_path: Path) -> None:
    _fake_sysfs(tmp_path)
    inv = discover(tmp_path, node="npu-7", partitions={"furiosa-rngd": "4core.24gb"})
    assert inv.node == "npu-7"
    assert [(d.id, d.type, d.pci, d.numa) for d in inv.devices] == [
        ("rngd0", "furiosa-rngd", "0000:19:00.0", 0), ("rngd1", "furiosa-rngd", "0000:1a:00.0", 0),
        ("rngd2", "furiosa-rngd", "0000:40:00.0", 1)]
    assert inv.devices[0].dev == ("/dev/rngd/npu0mgmt",)
    assert inv.linked("rngd0", "rngd1") and not inv.linked("rngd0", "rngd2")
    assert all(inv.healthy(d) for d in inv.devices)
    shutil.rmtree(tmp_path / "sys" / "devices" / "pci0000:16" / "0000:16:02.0")
    (tmp_path / "sys" / "bus" / "pci" / "devices" / "0000:40:00.0").unlink()  # hot-removed
    assert not inv.healthy(inv.devices[2])
    assert list(resource_units(inv)) == ["furiosa.ai/rngd-4core.24gb"]


def test_bad_inventories_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(InventoryError, match=r"devices\.0\.type: unknown device 'furiosa-rngx'"):
        inventory_from_dict({"node": "n", "devices": [{"id": "a", "type": "furiosa-rngx"}]})
    with pytest.raises(InventoryError, match=r"partitions\.furiosa-rngd: no partition '3pe'"):
        inventory_from_dict({"node": "n", "devices": [{"id": "a", "type": "furiosa-rngd"}],
                             "partitions": {"furiosa-rngd": "3pe"}})
    with pytest.raises(InventoryError, match=r"links\.0: unknown device 'b'"):
        inventory_from_dict({"node": "n", "devices": [{"id": "a", "type": "furiosa-rngd"}],
                             "links": [["a", "b"]]})
    with pytest.raises(InventoryError, match="'a' is listed twice"):
        inventory_from_dict({"node": "n", "devices": [{"id": "a", "type": "furiosa-rngd"}] * 2})
    with pytest.raises(InventoryError, match="no PCI devices folder"):
        discover(tmp_path)
    f = tmp_path / "inv.yaml"
    f.write_text("node: [")
    with pytest.raises(InventoryError, match="not valid YAML"):
        load_inventory(f)


def test_generated_grpc_modules_match_the_proto(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    proto = "kcloud/k8s/proto/deviceplugin.proto"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{REPO / 'src'}",
                    f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}",
                    str(REPO / "src" / proto)], check=True)
    for name in ("deviceplugin_pb2.py", "deviceplugin_pb2_grpc.py"):
        made = (tmp_path / "kcloud" / "k8s" / "proto" / name).read_text()
        assert made == (REPO / "src" / "kcloud" / "k8s" / "proto" / name).read_text(), \
            f"{name} is stale: regenerate it (see the header of deviceplugin.proto)"


def test_wire_names_are_the_kubelets() -> None:
    # the upstream service and message names and field numbers (kubelet's v1beta1 api.proto)
    svc = pb.DESCRIPTOR.services_by_name["DevicePlugin"]
    assert svc.full_name == "v1beta1.DevicePlugin"
    assert [m.name for m in svc.methods] == ["GetDevicePluginOptions", "ListAndWatch",
                                             "GetPreferredAllocation", "Allocate",
                                             "PreStartContainer"]
    assert pb.DESCRIPTOR.services_by_name["Registration"].full_name == "v1beta1.Registration"
    fields = {f.name: f.number for f in pb.ContainerAllocateResponse.DESCRIPTOR.fields}
    assert fields == {"envs": 1, "mounts": 2, "devices": 3}
    assert {f.name: f.number for f in pb.Device.DESCRIPTOR.fields} == {
        "ID": 1, "health": 2, "topology": 3}


@pytest.mark.slow
def test_cli_serves_and_exits_cleanly_on_sigterm(short_dir: Path) -> None:
    kdir, root = short_dir / "dp", short_dir / "root"
    kdir.mkdir()
    inv = short_dir / "inv.yaml"
    inv.write_text(yaml.safe_dump(_host(root, 2)))
    kubelet = StubKubelet(kdir).start()
    proc = subprocess.Popen([sys.executable, "-m", "kcloud.cli", "k8s", "device-plugin",
                             "--kubelet-dir", str(kdir), "--inventory", str(inv),
                             "--root", str(root)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        reg = kubelet.next_registration(timeout=60)
        assert reg.resource_name == "furiosa.ai/rngd"
        assert (kdir / reg.endpoint).exists()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert not (kdir / reg.endpoint).exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        kubelet.stop()


class _FakeApi:
    """A Kubernetes API stand-in on 127.0.0.1: GET /api/v1/nodes/NAME with a bearer token."""

    def __init__(self, nodes: dict[str, dict[str, str]], token: str) -> None:
        import http.server
        import json
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                name = self.path.removeprefix("/api/v1/nodes/")
                if self.headers.get("Authorization") != f"Bearer {token}":
                    code, body = 401, {"kind": "Status", "code": 401}
                elif name in nodes:
                    code, body = 200, {"kind": "Node", "metadata": {"name": name,
                                                                    "labels": nodes[name]}}
                else:
                    code, body = 404, {"kind": "Status", "code": 404}
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_partitions_from_the_nodes_labels(tmp_path: Path) -> None:
    from kcloud.errors import KCloudError
    from kcloud.k8s.nodeinfo import node_partitions

    token = tmp_path / "token"
    token.write_text("s3cret\n")
    api = _FakeApi({"npu-7": {"kcloud.io/partition.furiosa-rngd": "4core.24gb",
                              "kubernetes.io/hostname": "npu-7"}}, "s3cret")
    try:
        profiles = node_partitions("npu-7", api.url, token)
        assert profiles == {"furiosa-rngd": "4core.24gb"}
        _fake_sysfs(tmp_path)
        inv = discover(tmp_path, node="npu-7", partitions=profiles)
        assert list(resource_units(inv)) == ["furiosa.ai/rngd-4core.24gb"]
        with pytest.raises(KCloudError, match="answered 404"):
            node_partitions("npu-8", api.url, token)
        token.write_text("wrong")
        with pytest.raises(KCloudError, match="get` on nodes"):
            node_partitions("npu-7", api.url, token)
    finally:
        api.close()
