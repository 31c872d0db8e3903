"""Device plug-in benchmark: Allocate and ListAndWatch round trips over its unix socket.

    python benchmarks/bench_k8s.py [--devices 8] [--calls 2000]

A plug-in for one node of `--devices` RNGD cards (device nodes in a temporary host tree) serves
on a unix socket; a gRPC client calls it as the kubelet does. Figures (all measured, wall
clock, median and p99):

- `Allocate` of 1 and of all devices (device nodes, mounts and environment built per call);
- `ListAndWatch`: opening a stream until its first device list, and a health change (a device
  node removed, the check run) until the stream delivers the new list (one way: pushed on the
  open stream, no request leg);
- beside them, the baseline: `GetDevicePluginOptions`, a call that does no work, i.e. gRPC's
  own round trip on this socket. For scale, the kubelet (pkg/kubelet/cm/devicemanager) dials
  a plug-in with a 10 s timeout and gives PreStartContainer 30 s; Allocate has no deadline.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from kcloud.k8s.inventory import inventory_from_dict
from kcloud.k8s.plugin import DevicePlugin
from kcloud.k8s.proto import deviceplugin_pb2 as pb
from kcloud.k8s.proto import deviceplugin_pb2_grpc as pb_grpc


def _stats(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {"median_us": statistics.median(xs) * 1e6,
            "p99_us": xs[min(len(xs) - 1, int(0.99 * len(xs)))] * 1e6, "n": len(xs)}


def _time(fn: Callable[[], object], n: int) -> list[float]:
    for _ in range(min(50, n)):  # warm the channel and the server's threads
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--changes", type=int, default=200)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    logging.getLogger("kcloud.k8s").setLevel(logging.ERROR)  # the health flips are on purpose

    tmp = Path(tempfile.mkdtemp(prefix="kdpb", dir="/tmp"))
    try:
        root = tmp / "root"
        devices = []
        for i in range(args.devices):
            node = root / "dev" / "rngd" / f"npu{i}"
            node.parent.mkdir(parents=True, exist_ok=True)
            node.touch()
            devices.append({"id": f"rngd{i}", "type": "furiosa-rngd",
                            "numa": i * 2 // args.devices, "dev": [f"/dev/rngd/npu{i}"]})
        inv = inventory_from_dict({"node": "bench", "devices": devices}, root=root)
        plugin = DevicePlugin(inv, tmp / "dp", health_interval_s=3600, watch_interval_s=3600)
        plugin.start()
        server = plugin.servers[0]
        ids = [d["id"] for d in devices]
        with grpc.insecure_channel(f"unix://{server.path}") as channel:
            stub = pb_grpc.DevicePluginStub(channel)
            figures = {
                "GetDevicePluginOptions (baseline: gRPC round trip)": _stats(_time(
                    lambda: stub.GetDevicePluginOptions(pb.Empty(), timeout=5), args.calls)),
                "Allocate 1 device": _stats(_time(lambda: stub.Allocate(pb.AllocateRequest(
                    container_requests=[pb.ContainerAllocateRequest(devices_ids=ids[:1])]),
                    timeout=5), args.calls)),
                f"Allocate {len(ids)} devices": _stats(_time(lambda: stub.Allocate(
                    pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(
                        devices_ids=ids)]), timeout=5), args.calls)),
            }

            def first_list() -> None:
                call = stub.ListAndWatch(pb.Empty())
                next(call)
                call.cancel()

            figures["ListAndWatch open -> first list"] = _stats(
                _time(first_list, max(50, args.calls // 10)))

            call = stub.ListAndWatch(pb.Empty())
            next(call)
            node = root / "dev" / "rngd" / "npu0"
            lat = []
            for k in range(args.changes):
                if k % 2 == 0:
                    node.unlink()
                else:
                    node.touch()
                t0 = time.perf_counter()
                plugin.check_health()
                resp = next(call)
                lat.append(time.perf_counter() - t0)
                want = "Unhealthy" if k % 2 == 0 else "Healthy"
                assert resp.devices[0].health == want, resp
            call.cancel()
            figures["ListAndWatch health change -> new list"] = _stats(lat)
        plugin.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    if args.json:
        print(json.dumps({"figures": "measured", "devices": args.devices, "results": figures}))
        return
    base = figures["GetDevicePluginOptions (baseline: gRPC round trip)"]["median_us"]
    print(f"device plug-in over a unix socket, {args.devices} devices (all figures measured)")
    print(f"{'call':48} {'median':>10} {'p99':>10} {'x baseline':>11}")
    for name, f in figures.items():
        print(f"{name:48} {f['median_us']:8.0f} us {f['p99_us']:8.0f} us "
              f"{f['median_us'] / base:10.1f}x")
    print("for scale: the kubelet dials a plug-in with a 10 s timeout, gives PreStartContainer "
          "30 s, Allocate no deadline")


if __name__ == "__main__":
    main()
