"""A stub kubelet for the device plug-in tests: a real gRPC `Registration` server on
`kubelet.sock` in a folder, which records each registration and talks to the plug-in's socket
as the kubelet does (ListAndWatch, Allocate, ...)."""

from __future__ import annotations

import queue
import threading
from concurrent import futures
from pathlib import Path

import grpc

from kcloud.k8s.proto import deviceplugin_pb2 as pb
from kcloud.k8s.proto import deviceplugin_pb2_grpc as pb_grpc


class StubKubelet(pb_grpc.RegistrationServicer):
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.registrations: queue.Queue[pb.RegisterRequest] = queue.Queue()
        self.server: grpc.Server | None = None

    def Register(self, request: pb.RegisterRequest, context: grpc.ServicerContext) -> pb.Empty:
        if request.version != "v1beta1":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "unsupported version")
        self.registrations.put(request)
        return pb.Empty()

    def start(self) -> StubKubelet:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_RegistrationServicer_to_server(self, server)
        server.add_insecure_port(f"unix://{self.folder / 'kubelet.sock'}")
        server.start()
        self.server = server
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(grace=None).wait()
            self.server = None
        sock = self.folder / "kubelet.sock"
        if sock.exists():
            sock.unlink()

    def restart(self) -> None:
        """As the kubelet restarts: stop, remove every socket in the folder, listen again."""
        self.stop()
        for sock in self.folder.glob("*.sock"):
            sock.unlink()
        self.start()

    def next_registration(self, timeout: float = 10.0) -> pb.RegisterRequest:
        return self.registrations.get(timeout=timeout)

    def plugin(self, req: pb.RegisterRequest) -> tuple[grpc.Channel, pb_grpc.DevicePluginStub]:
        channel = grpc.insecure_channel(f"unix://{self.folder / req.endpoint}")
        return channel, pb_grpc.DevicePluginStub(channel)


class Watch:
    """A ListAndWatch stream read on a thread, its lists in a queue."""

    def __init__(self, stub: pb_grpc.DevicePluginStub) -> None:
        self.call = stub.ListAndWatch(pb.Empty())
        self.lists: queue.Queue[dict[str, str]] = queue.Queue()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for resp in self.call:
                self.lists.put({d.ID: d.health for d in resp.devices})
        except grpc.RpcError:
            pass

    def next(self, timeout: float = 10.0) -> dict[str, str]:
        return self.lists.get(timeout=timeout)

    def cancel(self) -> None:
        self.call.cancel()
        self.thread.join(timeout=5)
