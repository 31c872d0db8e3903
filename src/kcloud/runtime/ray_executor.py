"""The engine's workers as Ray actors, for more than one machine.

Each worker becomes a resident actor (`ResidentActor`, holding a `StageWorker`) that asks for one
unit of the custom resource `kcloud/<device type>`, so Ray places it on a node that declares
that device (`ray start --resources '{"kcloud/furiosa-rngd": 8}'`). The actors talk over
torch.distributed gloo (the first worker's node hosts the rendezvous). On the driver side each
actor looks like a local worker process to the engine (`RayProc`), so serving and `kcloud run`
use the same engine over processes or actors. `address="local"` starts a Ray instance on this
host (127.0.0.1) with the plan's device types as resources, and stops it afterwards; a node
that leaves ends the run (or fails the replica) with one line naming it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections import Counter
from typing import Any

from kcloud.errors import KCloudError
from kcloud.runtime.stage_worker import RunCommand, StageSpec, StageWorker
from kcloud.runtime.worker import _one_line

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


def _free_address() -> tuple[str, int]:
    """This node's address and a free port on it (for the rendezvous)."""
    import ray

    ip = ray.util.get_node_ip_address()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((ip, 0))
        return ip, int(s.getsockname()[1])


def _node_alive(ray: Any, ip: str) -> bool:
    with contextlib.suppress(Exception):  # the cluster state cannot be read: say nothing more
        return any(n.get("Alive") for n in ray.nodes() if n.get("NodeManagerAddress") == ip)
    return True


# ---- the engine's workers as resident Ray actors ----------------------------------------------


class ResidentActor:
    """A resident engine worker inside a Ray actor: built once, then step commands (or a
    run's schedule) one call each (wrapped by `ray.remote` when the engine starts)."""

    def __init__(self) -> None:
        self.worker: StageWorker | None = None

    def address(self) -> tuple[str, int]:
        return _free_address()

    def node_ip(self) -> str:
        import ray

        return str(ray.util.get_node_ip_address())

    def setup(self, stage: StageSpec) -> str | None:
        """Build the stage; None, or the one-line error of a failure."""
        os.environ["MASTER_ADDR"] = stage.master_addr
        os.environ["MASTER_PORT"] = str(stage.port)
        self.worker = StageWorker(stage)
        try:
            self.worker.setup()
        except BaseException as exc:
            return f"setup: {_one_line(exc)}"
        return None

    def execute(self, cmd: Any) -> Any:
        assert self.worker is not None
        if isinstance(cmd, RunCommand):
            return self.worker.run_schedule(cmd)
        return self.worker.execute(cmd)


class RayConnection:
    """A Ray cluster the engine uses: reached (or, for "local", started with the plan's
    device types as resources) once, checked for the plan's devices, left (or stopped)."""

    def __init__(self, address: str, device_types: list[str], timeout_s: float = 30.0) -> None:
        self.ray = _import_ray()
        need = Counter(resource_name(t) for t in device_types)
        self.started = False
        if not self.ray.is_initialized():
            try:
                if address == "local":
                    self.ray.init(address="local", include_dashboard=False,
                                  resources=dict(need), _node_ip_address="127.0.0.1",
                                  log_to_driver=False, configure_logging=False)
                else:
                    self.ray.init(address=address, log_to_driver=False,
                                  configure_logging=False)
            except Exception as exc:  # connection refused, no cluster at the address
                raise KCloudError(
                    f"cannot start or reach Ray at '{address}': "
                    f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                    "pass --ray local, or the address of a running Ray cluster") from None
            self.started = True
        have = self.ray.cluster_resources()
        short = [f"{k} (needs {v}, has {int(have.get(k, 0))})" for k, v in need.items()
                 if have.get(k, 0) < v]
        if short:
            self.close()
            raise KCloudError(f"the Ray cluster lacks devices for the plan: {', '.join(short)}",
                              "start its nodes with `ray start --resources "
                              "'{\"kcloud/<device-type>\": N}'`")
        self.timeout_s = timeout_s

    def actors(self, specs: list[StageSpec]) -> list[Any]:
        remote = self.ray.remote(ResidentActor)
        out = []
        for s in specs:
            opts: dict[str, Any] = {"resources": {resource_name(s.device_type): 1},
                                    "num_cpus": 0, "max_restarts": 0}
            if s.backend == "cuda":
                opts["num_gpus"] = 1
            out.append(remote.options(**opts).remote())
        return out

    def rendezvous(self, actor: Any) -> tuple[str, int]:
        try:
            return tuple(self.ray.get(actor.address.remote(), timeout=self.timeout_s))  # type: ignore[return-value]
        except self.ray.exceptions.GetTimeoutError:
            raise KCloudError(f"Ray did not place the first worker within {self.timeout_s:.0f}"
                              " s", "check that the cluster's nodes are up and declare the "
                              "plan's devices") from None

    def node_alive(self, ip: str) -> bool:
        return _node_alive(self.ray, ip)

    def close(self) -> None:
        if self.started:
            with contextlib.suppress(Exception):
                self.ray.shutdown()
            self.started = False


class RayProc:
    """One engine worker as a Ray actor, with the face of a local worker process (`exitcode`,
    `pid`, `kill`, `join`, `is_alive`): a thread here sends it the commands of its queue and
    puts what comes back on the engine's result queue, with heartbeats while it waits."""

    def __init__(self, conn: RayConnection, actor: Any, spec: StageSpec, commands: Any,
                 results: Any) -> None:
        import threading

        self.conn, self.actor, self.spec = conn, actor, spec
        self.commands, self.results = commands, results
        self.exitcode: int | None = None
        self.how: str | None = None  # what ended it, in words
        self.pid: int | None = None
        self.node = "?"
        self._thread = threading.Thread(target=self._loop, daemon=True,
                                        name=f"kcloud-ray-{spec.replica}-{spec.rank}")

    def start(self) -> None:
        self._thread.start()

    def _call(self, ref: Any) -> Any:
        ray = self.conn.ray
        while True:
            done, _ = ray.wait([ref], timeout=0.5)
            if done:
                return ray.get(done[0])
            self.results.put(("beat", self.spec.rank))

    def _loop(self) -> None:
        ray = self.conn.ray
        rank = self.spec.rank
        try:
            self.node = self._call(self.actor.node_ip.remote())
            err = self._call(self.actor.setup.remote(self.spec))
            if err is not None:
                self.results.put(("error", rank, err))
                self.exitcode = 1
                return
            self.pid = -1
            self.results.put(("ready", rank))
            while True:
                cmd = self.commands.get()
                if cmd is None:
                    break
                t0 = time.perf_counter()
                out = self._call(self.actor.execute.remote(cmd))
                if isinstance(cmd, RunCommand):
                    self.results.put(("run", rank, out))
                else:
                    self.results.put(("result", rank, cmd.step, out,
                                      time.perf_counter() - t0))
            self.exitcode = 0
        except Exception as exc:  # the actor died, or its node left
            left = not self.conn.node_alive(self.node)
            self.how = (f"its Ray node {self.node} leaving the cluster" if left
                        else f"a Ray actor failure on node {self.node}") + \
                f" ({type(exc).__name__})"
            self.exitcode = 1
        finally:
            with contextlib.suppress(Exception):
                ray.kill(self.actor, no_restart=True)

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.ray.kill(self.actor, no_restart=True)
        if self.exitcode is None:
            self.exitcode = -9

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()
