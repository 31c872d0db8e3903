"""The kubelet device plug-in (API v1beta1, gRPC over unix sockets) for a node's accelerators.

One gRPC server per resource (device type, or device type and partition profile), each on its
own socket in the kubelet's device-plugin folder, registered with the kubelet's `Registration`
service on `kubelet.sock`. The protocol follows kubernetes/kubelet's
pkg/apis/deviceplugin/v1beta1 (see `proto/deviceplugin.proto`); what each call does:

- `ListAndWatch`: the resource's devices with their health and NUMA node, sent again whenever
  a health check changes one (an unhealthy device is listed as `Unhealthy`).
- `Allocate`: per container, the device nodes of the devices it got (rw), the mounts the
  inventory names for their type, and `KCLOUD_VISIBLE_DEVICES` (the device ids, comma
  separated) with `KCLOUD_DEVICE_TYPE` (the catalog id, `type:partition` for partitions).
- `GetPreferredAllocation`: the set that keeps devices together: parts of one chip first,
  then chips that share a chip-to-chip link or PCIe switch, then a NUMA node.
- `PreStartContainer`: refuses a container whose devices turned unhealthy since allocation.

A device split into partitions is advertised only as its partition instances (`rngd0:2core.12gb:1`)
under the partition's resource name, never also as the whole device.

Lifecycle: the plug-in re-registers when the kubelet restarts (a new `kubelet.sock`, whose
restart also removes the plug-in's sockets, so the servers are started again), re-registers
when a `ListAndWatch` stream breaks and the kubelet does not open a new one within
`relist_grace_s`, retries a refused or failed registration with backoff, and `stop()` (SIGTERM
in the CLI) closes the servers and removes its sockets.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc

from kcloud.hardware.catalog import get_device
from kcloud.k8s.inventory import Inventory, NodeDevice
from kcloud.k8s.proto import deviceplugin_pb2 as pb
from kcloud.k8s.proto import deviceplugin_pb2_grpc as pb_grpc

log = logging.getLogger("kcloud.k8s.plugin")

API_VERSION = "v1beta1"
KUBELET_SOCKET = "kubelet.sock"
DEFAULT_KUBELET_DIR = "/var/lib/kubelet/device-plugins"
HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"
VISIBLE_DEVICES_ENV = "KCLOUD_VISIBLE_DEVICES"
DEVICE_TYPE_ENV = "KCLOUD_DEVICE_TYPE"


@dataclass(frozen=True)
class Unit:
    """One advertised device: a whole device, or one partition instance of one."""

    id: str
    device: NodeDevice
    partition: str | None = None

    @property
    def device_type(self) -> str:
        return self.device.type + (f":{self.partition}" if self.partition else "")


def resource_units(inv: Inventory) -> dict[str, list[Unit]]:
    """The resources a node advertises and the units of each, from its inventory."""
    out: dict[str, list[Unit]] = {}
    for d in inv.devices:
        dev = get_device(d.type)
        profile = inv.partitions.get(d.type)
        if profile is None:
            out.setdefault(dev.k8s_resource, []).append(Unit(d.id, d))
            continue
        part = next(p for p in dev.partitions if p.name == profile)
        units = out.setdefault(dev.partition_resource(profile), [])
        units.extend(Unit(f"{d.id}:{profile}:{k}", d, profile) for k in range(part.count))
    return out


def socket_name(resource: str) -> str:
    return "kcloud-" + resource.replace("/", "_") + ".sock"


def preferred(units: list[Unit], inv: Inventory, available: list[str], must: list[str],
              size: int) -> list[str]:
    """A preferred set of `size` ids from `available` holding `must`: most pairs that are parts
    of one chip (weight 4), linked chips (2), chips on one NUMA node (1); ties by listed order."""
    by_id = {u.id: u for u in units}
    pool = [i for i in available if i in by_id]
    must = [i for i in must if i in by_id]

    def affinity(a: str, b: str) -> int:
        ua, ub = by_id[a], by_id[b]
        if ua.device.id == ub.device.id:
            return 4
        score = 2 if inv.linked(ua.device.id, ub.device.id) else 0
        if ua.device.numa is not None and ua.device.numa == ub.device.numa:
            score += 1
        return score

    def grow(chosen: list[str]) -> tuple[int, list[str]]:
        chosen = list(chosen)
        while len(chosen) < size:
            rest = [i for i in pool if i not in chosen]
            if not rest:
                break
            best = max(rest, key=lambda i: sum(affinity(i, c) for c in chosen))
            chosen.append(best)
        total = sum(affinity(a, b) for k, a in enumerate(chosen) for b in chosen[k + 1:])
        return total, chosen

    if must or size <= 1:
        return grow(must)[1][:max(size, len(must))]
    best_total, best = -1, []
    for seed in pool:
        total, chosen = grow([seed])
        if total > best_total:
            best_total, best = total, chosen
    return best


class ResourceServer(pb_grpc.DevicePluginServicer):
    """The DevicePlugin service of one resource."""

    def __init__(self, plugin: DevicePlugin, resource: str, units: list[Unit]) -> None:
        self.plugin = plugin
        self.resource = resource
        self.units = units
        self.by_id = {u.id: u for u in units}
        self.path = plugin.kubelet_dir / socket_name(resource)
        self.server: grpc.Server | None = None
        self.registered = False
        self.streams = 0  # open ListAndWatch streams
        self.stream_lost_at: float | None = None  # when the last stream ended (None: never/open)
        self.next_register = 0.0  # monotonic time of the next registration attempt
        self.backoff = plugin.retry_s

    # -- server lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        if self.path.exists() or self.path.is_symlink():
            self.path.unlink()
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix=
                                                        f"kcloud-dp-{self.resource}"))
        pb_grpc.add_DevicePluginServicer_to_server(self, server)
        server.add_insecure_port(f"unix://{self.path}")
        server.start()
        self.server = server
        self.registered = False
        self.stream_lost_at = None
        self.next_register = 0.0

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(grace=0.5).wait(2.0)
            self.server = None
        if self.path.exists() or self.path.is_symlink():
            self.path.unlink()

    def socket_gone(self) -> bool:
        return not self.path.exists()

    def register(self) -> bool:
        """Register with the kubelet; False (and a later retry) when it is not there or
        refuses."""
        req = pb.RegisterRequest(
            version=API_VERSION, endpoint=self.path.name, resource_name=self.resource,
            options=pb.DevicePluginOptions(pre_start_required=True,
                                           get_preferred_allocation_available=True))
        target = f"unix://{self.plugin.kubelet_dir / KUBELET_SOCKET}"
        try:
            with grpc.insecure_channel(target) as channel:
                pb_grpc.RegistrationStub(channel).Register(req, timeout=5.0)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            log.warning("registering %s with the kubelet failed (%s); retrying in %.1f s",
                        self.resource, code, self.backoff)
            self.next_register = time.monotonic() + self.backoff
            self.backoff = min(self.backoff * 2, 30.0)
            return False
        log.info("registered %s (%d devices) at %s", self.resource, len(self.units),
                 self.path.name)
        self.registered = True
        self.stream_lost_at = None
        self.backoff = self.plugin.retry_s
        return True

    # -- the service --------------------------------------------------------------------------
    def _device_list(self) -> pb.ListAndWatchResponse:
        out = []
        for u in self.units:
            topo = pb.TopologyInfo(nodes=[pb.NUMANode(ID=u.device.numa)]) \
                if u.device.numa is not None else None
            out.append(pb.Device(ID=u.id, health=HEALTHY if self.plugin.is_healthy(u.device)
                                 else UNHEALTHY, topology=topo))
        return pb.ListAndWatchResponse(devices=out)

    def GetDevicePluginOptions(self, request: pb.Empty, context: grpc.ServicerContext
                               ) -> pb.DevicePluginOptions:
        return pb.DevicePluginOptions(pre_start_required=True,
                                      get_preferred_allocation_available=True)

    def ListAndWatch(self, request: pb.Empty, context: grpc.ServicerContext
                     ) -> Iterator[pb.ListAndWatchResponse]:
        plugin = self.plugin
        with plugin.cond:
            self.streams += 1
            self.stream_lost_at = None

        def ended() -> None:
            with plugin.cond:
                self.streams -= 1
                if self.streams == 0 and not plugin.stopping.is_set():
                    self.stream_lost_at = time.monotonic()
                plugin.cond.notify_all()

        context.add_callback(ended)
        seen = -1
        while context.is_active() and not plugin.stopping.is_set():
            with plugin.cond:
                if plugin.health_version == seen:
                    plugin.cond.wait(timeout=0.5)
                    continue
                seen = plugin.health_version
            yield self._device_list()

    def GetPreferredAllocation(self, request: pb.PreferredAllocationRequest,
                               context: grpc.ServicerContext) -> pb.PreferredAllocationResponse:
        out = []
        for creq in request.container_requests:
            ids = preferred(self.units, self.plugin.inventory, list(creq.available_deviceIDs),
                            list(creq.must_include_deviceIDs), int(creq.allocation_size))
            out.append(pb.ContainerPreferredAllocationResponse(deviceIDs=ids))
        return pb.PreferredAllocationResponse(container_responses=out)

    def _units(self, ids: list[str], context: grpc.ServicerContext) -> list[Unit]:
        unknown = [i for i in ids if i not in self.by_id]
        if unknown:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"unknown {self.resource} device(s): {', '.join(unknown)}")
        units = [self.by_id[i] for i in ids]
        sick = [u.id for u in units if not self.plugin.is_healthy(u.device)]
        if sick:
            self.plugin.check_health()  # the kubelet learns of it through ListAndWatch too
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"unhealthy {self.resource} device(s): {', '.join(sick)}")
        return units

    def Allocate(self, request: pb.AllocateRequest, context: grpc.ServicerContext
                 ) -> pb.AllocateResponse:
        out = []
        for creq in request.container_requests:
            units = self._units(list(creq.devices_ids), context)
            nodes: list[str] = []
            for u in units:
                nodes.extend(n for n in u.device.dev if n not in nodes)
            mounts: list[pb.Mount] = []
            for t in dict.fromkeys(u.device.type for u in units):
                mounts.extend(pb.Mount(container_path=m.container, host_path=m.host,
                                       read_only=m.read_only)
                              for m in self.plugin.inventory.mounts.get(t, ()))
            envs = {VISIBLE_DEVICES_ENV: ",".join(u.id for u in units),
                    DEVICE_TYPE_ENV: ",".join(dict.fromkeys(u.device_type for u in units))}
            out.append(pb.ContainerAllocateResponse(
                envs=envs, mounts=mounts,
                devices=[pb.DeviceSpec(container_path=n, host_path=n, permissions="rw")
                         for n in nodes]))
        return pb.AllocateResponse(container_responses=out)

    def PreStartContainer(self, request: pb.PreStartContainerRequest,
                          context: grpc.ServicerContext) -> pb.PreStartContainerResponse:
        self._units(list(request.devices_ids), context)
        return pb.PreStartContainerResponse()


class DevicePlugin:
    """Every resource of one node, served and registered with its kubelet.

    `start()` returns once the servers listen; a background thread then registers them, checks
    health every `health_interval_s`, and watches the kubelet's socket every `watch_interval_s`.
    """

    def __init__(self, inventory: Inventory, kubelet_dir: str | os.PathLike[str] =
                 DEFAULT_KUBELET_DIR, *, health_interval_s: float = 5.0,
                 watch_interval_s: float = 1.0, relist_grace_s: float = 5.0,
                 retry_s: float = 1.0) -> None:
        self.inventory = inventory
        self.kubelet_dir = Path(kubelet_dir)
        self.health_interval_s = health_interval_s
        self.watch_interval_s = watch_interval_s
        self.relist_grace_s = relist_grace_s
        self.retry_s = retry_s
        self.cond = threading.Condition()
        self.stopping = threading.Event()
        self.health_version = 0
        self._health = {d.id: inventory.healthy(d) for d in inventory.devices}
        self.servers = [ResourceServer(self, r, us)
                        for r, us in sorted(resource_units(inventory).items())]
        self._kubelet_id: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self.registrations = 0  # successful Register calls, for the logs and tests

    @property
    def resources(self) -> dict[str, list[str]]:
        return {s.resource: [u.id for u in s.units] for s in self.servers}

    def is_healthy(self, dev: NodeDevice) -> bool:
        with self.cond:
            return self._health[dev.id]

    def check_health(self) -> bool:
        """Re-check every device; on a change, wake the ListAndWatch streams. True if changed."""
        now = {d.id: self.inventory.healthy(d) for d in self.inventory.devices}
        with self.cond:
            if now == self._health:
                return False
            for dev_id, ok in now.items():
                if ok != self._health[dev_id]:
                    log.warning("device %s is now %s", dev_id, HEALTHY if ok else UNHEALTHY)
            self._health = now
            self.health_version += 1
            self.cond.notify_all()
        return True

    def _kubelet_socket_id(self) -> tuple[int, int] | None:
        try:
            st = (self.kubelet_dir / KUBELET_SOCKET).stat()
        except OSError:
            return None
        return st.st_ino, st.st_ctime_ns

    def start(self) -> None:
        self.kubelet_dir.mkdir(parents=True, exist_ok=True)
        for s in self.servers:
            s.start()
        self._thread = threading.Thread(target=self._loop, name="kcloud-device-plugin",
                                        daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        last_health = time.monotonic()
        waiting_logged = False
        while not self.stopping.is_set():
            kubelet = self._kubelet_socket_id()
            if kubelet is None and not waiting_logged:
                log.info("waiting for the kubelet's socket %s", self.kubelet_dir / KUBELET_SOCKET)
            waiting_logged = kubelet is None
            if kubelet is not None and kubelet != self._kubelet_id:
                if self._kubelet_id is not None:
                    log.info("the kubelet restarted: serving and registering again")
                    for s in self.servers:
                        s.stop()
                        s.start()
                self._kubelet_id = kubelet
                for s in self.servers:
                    s.registered = False
                    s.next_register = 0.0
            now = time.monotonic()
            for s in self.servers:
                if self.stopping.is_set():
                    break
                if s.socket_gone():  # removed under us: listen again, then register again
                    log.info("socket %s was removed: serving it again", s.path.name)
                    s.stop()
                    s.start()
                with self.cond:
                    lost = (s.registered and s.streams == 0 and s.stream_lost_at is not None
                            and now - s.stream_lost_at > self.relist_grace_s)
                if lost:
                    log.info("ListAndWatch of %s broke and was not reopened: registering "
                             "again", s.resource)
                    s.registered = False
                    s.stream_lost_at = None
                if kubelet is not None and not s.registered and now >= s.next_register \
                        and s.register():
                    with self.cond:
                        self.registrations += 1
                        self.cond.notify_all()
            if now - last_health >= self.health_interval_s:
                self.check_health()
                last_health = now
            self.stopping.wait(self.watch_interval_s)

    def stop(self) -> None:
        """Close every server and remove its socket (the kubelet then drops the resources)."""
        self.stopping.set()
        with self.cond:
            self.cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        for s in self.servers:
            s.stop()
        log.info("device plug-in stopped")

    def wait_registered(self, n: int, timeout_s: float) -> bool:
        """Wait until `n` registrations in all have succeeded (for tests and the CLI)."""
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while self.registrations < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
        return True
