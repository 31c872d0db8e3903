"""Running a plan's workers as Ray actors, for more than one machine.

Each worker becomes an actor that asks for one unit of the custom resource `kcloud/<device
type>`, so Ray places it on a node that declares that device (`ray start --resources
'{"kcloud/furiosa-rngd": 8}'`). The actors run the same stage worker as the engine's processes
(`StageWorker`) and talk over torch.distributed gloo; the first worker's node hosts the
rendezvous. `address="local"` starts a Ray instance on this host (127.0.0.1) with the plan's
device types as resources, and stops it afterwards. Each actor builds its own stage
(`stage_worker.StageWorker`, as the engine's local workers do) and runs its schedule on it.
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
from kcloud.runtime.stage_worker import RunCommand, StageSpec, StageWorker
from kcloud.runtime.worker import WorkerResult, WorkerSpec, _one_line

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

    def run(self, stage: StageSpec, spec: WorkerSpec, feed: Any) -> WorkerResult:
        os.environ["MASTER_ADDR"] = stage.master_addr
        os.environ["MASTER_PORT"] = str(stage.port)
        worker = StageWorker(stage)
        try:
            worker.setup()
        except BaseException as exc:
            return ("error", spec.rank, f"setup: {_one_line(exc)}", False)
        try:
            return worker.run_schedule(RunCommand(spec, feed))
        finally:
            worker.close()


def run_on_ray(stages: list[StageSpec], specs: list[WorkerSpec], inputs: list[Any],
               timeout_s: float, address: str) -> dict[int, tuple[bytes | None, list[Any]]]:
    """Run the workers as Ray actors; results by rank as `_run_workers` gives them."""
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
        stages = [replace(s, master_addr=ip, port=port, pin_core=None,
                          torch_device="cuda:0" if s.backend == "cuda" else s.torch_device)
                  for s in stages]
        refs = {a.run.remote(st, s, None if x is None else ray.put(x)): s.rank
                for a, st, s, x in zip(actors, stages, specs, inputs, strict=True)}
        got = Results(specs, timeout_s)
        pending = list(refs)
        while pending and not got.over():
            ready, pending = ray.wait(pending, num_returns=1, timeout=0.1)
            for ref in ready:
                try:
                    got.take(ray.get(ref))
                except Exception as exc:  # the actor died or its process failed
                    got.lost(refs[ref], f"a Ray actor failure ({type(exc).__name__})")
        return got.outcome()
    finally:
        for a in actors:
            with contextlib.suppress(Exception):  # already gone
                ray.kill(a, no_restart=True)
        if started:
            ray.shutdown()
