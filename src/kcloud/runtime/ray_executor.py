"""Running a plan's workers as Ray actors, for more than one machine.

Each worker becomes an actor that asks for one unit of the custom resource `kcloud/<device
type>`, so Ray places it on a node that declares that device (`ray start --resources
'{"kcloud/furiosa-rngd": 8}'`). The actors run the same body as the worker processes
(`run_worker`) and talk over torch.distributed gloo; the first worker's node hosts the
rendezvous. `address="local"` starts a Ray instance on this host (127.0.0.1) with the plan's
device types as resources, and stops it afterwards.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections import Counter
from dataclasses import replace
from typing import Any

from kcloud.errors import KCloudError
from kcloud.runtime.executor import Results
from kcloud.runtime.worker import WorkerResult, WorkerSpec, run_worker

RESOURCE_PREFIX = "kcloud/"


def resource_name(device_type: str) -> str:
    """The Ray custom resource that stands for one device of `device_type`."""
    return f"{RESOURCE_PREFIX}{device_type}"


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise KCloudError("--ray needs the ray package, which is not installed",
                          "pip install 'kcloud[ray]'") from None
    return ray


class StageActor:
    """One worker of a plan (wrapped by `ray.remote` when a run starts)."""

    def address(self) -> tuple[str, int]:
        """This node's address and a free port on it (for the rendezvous)."""
        import ray

        ip = ray.util.get_node_ip_address()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((ip, 0))
            return ip, int(s.getsockname()[1])

    def node_ip(self) -> str:
        import ray

        return str(ray.util.get_node_ip_address())

    def run(self, spec: WorkerSpec, state: bytes, inputs: bytes | None) -> WorkerResult:
        os.environ["MASTER_ADDR"] = spec.master_addr
        os.environ["MASTER_PORT"] = str(spec.port)
        return run_worker(spec, state, inputs)


def _node_alive(ray: Any, ip: str) -> bool:
    with contextlib.suppress(Exception):  # the cluster state cannot be read: say nothing more
        return any(n.get("Alive") for n in ray.nodes() if n.get("NodeManagerAddress") == ip)
    return True


def run_on_ray(specs: list[WorkerSpec], states: list[bytes], inputs: list[bytes | None],
               timeout_s: float, address: str,
               placement: dict[int, str] | None = None,
               ) -> dict[int, tuple[bytes | None, list[Any]]]:
    """Run the workers as Ray actors; results by rank as `_run_workers` gives them.
    `placement`, when given, receives the address of the node each rank's actor runs on; a
    node that leaves mid-run ends it with one line naming the node."""
    ray = _import_ray()
    need = Counter(resource_name(s.device_type) for s in specs)
    started = False
    if not ray.is_initialized():
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        try:
            if address == "local":
                ray.init(address="local", include_dashboard=False, resources=dict(need),
                         _node_ip_address="127.0.0.1", log_to_driver=False,
                         configure_logging=False)
            else:
                ray.init(address=address, log_to_driver=False, configure_logging=False)
        except Exception as exc:  # connection refused, no cluster at the address
            raise KCloudError(f"cannot start or reach Ray at '{address}': "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                              "pass --ray local, or the address of a running Ray cluster"
                              ) from None
        started = True
    actors: list[Any] = []
    try:
        have = ray.cluster_resources()
        short = [f"{k} (needs {v}, has {int(have.get(k, 0))})" for k, v in need.items()
                 if have.get(k, 0) < v]
        if short:
            raise KCloudError(f"the Ray cluster lacks devices for the plan: {', '.join(short)}",
                              "start its nodes with `ray start --resources "
                              "'{\"kcloud/<device-type>\": N}'`")
        remote = ray.remote(StageActor)
        for s in specs:
            opts: dict[str, Any] = {"resources": {resource_name(s.device_type): 1},
                                    "num_cpus": 0, "max_restarts": 0}
            if s.backend == "cuda":
                opts["num_gpus"] = 1
            actors.append(remote.options(**opts).remote())
        try:
            ip, port = ray.get(actors[0].address.remote(), timeout=min(timeout_s, 120.0))
        except ray.exceptions.GetTimeoutError:
            raise KCloudError("Ray did not place the first worker within "
                              f"{min(timeout_s, 120.0):.0f} s",
                              "check that the cluster's nodes are up and declare the plan's "
                              "devices") from None
        where = dict(zip((s.rank for s in specs),
                         ray.get([a.node_ip.remote() for a in actors],
                                 timeout=min(timeout_s, 120.0)), strict=True))
        if placement is not None:
            placement.update(where)
        specs = [replace(s, master_addr=ip, port=port,
                         torch_device="cuda:0" if s.backend == "cuda" else s.torch_device)
                 for s in specs]
        refs = {a.run.remote(s, ray.put(st), None if x is None else ray.put(x)): s.rank
                for a, s, st, x in zip(actors, specs, states, inputs, strict=True)}
        got = Results(specs, timeout_s)
        pending = list(refs)
        while pending and not got.over():
            ready, pending = ray.wait(pending, num_returns=1, timeout=0.1)
            for ref in ready:
                try:
                    got.take(ray.get(ref))
                except Exception as exc:  # the actor died or its process failed
                    rank = refs[ref]
                    node = where[rank]
                    cause = (f"its Ray node {node} leaving the cluster"
                             if not _node_alive(ray, node)
                             else f"a Ray actor failure on node {node}")
                    got.lost(rank, f"{cause} ({type(exc).__name__})")
        return got.outcome()
    finally:
        for a in actors:
            with contextlib.suppress(Exception):  # already gone
                ray.kill(a, no_restart=True)
        if started:
            ray.shutdown()
