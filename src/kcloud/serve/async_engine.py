"""The engine under an asyncio server: one thread drives `Engine.step` in a loop; requests
come in from the event loop through an inbox and their events go back to one asyncio queue
each. The HTTP layer never touches workers, only this."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from kcloud.errors import KCloudError
from kcloud.runtime.engine import Engine, Event
from kcloud.runtime.scheduler import SamplingParams


@dataclass
class Stream:
    """A submitted request as its handler sees it."""

    id: int
    events: asyncio.Queue[Event]
    submitted: float = field(default_factory=time.perf_counter)


class AsyncEngine:
    def __init__(self, make: Callable[[], Engine]) -> None:
        self._make = make
        self.engine: Engine | None = None
        self.error: str | None = None
        self._inbox: queue.SimpleQueue[tuple[str, Any, Future[Any] | None]] = queue.SimpleQueue()
        self._streams: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue[Event]]] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.ready = threading.Event()
        self.on_step: Callable[[Engine, list[Event], float], None] | None = None

    # -- lifecycle (called from the server) ------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kcloud-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout)

    def _wake(self) -> None:
        eng = self.engine
        if eng is not None:
            with contextlib.suppress(Exception):
                eng.wake()

    # -- requests (called from the event loop) ---------------------------------------------
    async def submit(self, prompt: list[int] | None, params: SamplingParams | None,
                     value: tuple[Any, ...] | None = None, size: int = 1,
                     restartable: bool = False) -> Stream:
        """Queue a request; raises what `Engine.submit` raises (RequestError, Overloaded)."""
        if not self.ready.is_set():
            raise NotReady(self.error or "the engine is starting", "retry when /ready is 200")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        fut: Future[int] = Future()
        self._inbox.put(("submit", (prompt, params, value, size, restartable, loop, events),
                         fut))
        self._wake()
        rid = await asyncio.wrap_future(fut)
        return Stream(rid, events)

    def abort(self, rid: int) -> None:
        self._inbox.put(("abort", rid, None))
        self._wake()

    # -- the engine's thread ---------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.engine = self._make()
            self.engine.start()
        except KCloudError as exc:
            self.error = exc.message
            return
        except Exception as exc:  # reported by /ready and every request
            self.error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
            return
        self.ready.set()
        eng = self.engine
        try:
            while not self._stop.is_set():
                self._drain(eng)
                t0 = time.perf_counter()
                events = eng.step(0.05)
                if self.on_step is not None:
                    self.on_step(eng, events, time.perf_counter() - t0)
                self._deliver(events)
        finally:
            self.ready.clear()
            self._drain(eng)
            self._deliver([Event(rid, finished=True, reason="error",
                                 error="the server is shutting down")
                           for rid in list(self._streams)])
            eng.stop()

    def _drain(self, eng: Engine) -> None:
        while True:
            try:
                kind, arg, fut = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "submit":
                assert fut is not None
                prompt, params, value, size, restartable, loop, events = arg
                if self._stop.is_set():
                    fut.set_exception(NotReady("the server is shutting down", "retry later"))
                    continue
                try:
                    rid = eng.submit(prompt, params, restartable) if value is None \
                        else eng.submit_input(value, size)
                except Exception as exc:
                    fut.set_exception(exc)
                    continue
                self._streams[rid] = (loop, events)
                fut.set_result(rid)
            elif kind == "abort":
                eng.abort(arg)
                self._streams.pop(arg, None)

    def _deliver(self, events: list[Event]) -> None:
        """Hand a step's events to their streams: one wake-up of each event loop a step, not
        one an event (each wake-up is a write to the loop's pipe and a turn of the loop)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Event], Event]]] = {}
        for ev in events:
            got = self._streams.get(ev.id)
            if got is None:
                continue
            if ev.finished:
                self._streams.pop(ev.id, None)
            loop, queue_ = got
            by_loop.setdefault(loop, []).append((queue_, ev))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # its loop closed
                loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[asyncio.Queue[Event], Event]]) -> None:
    for q, ev in items:
        q.put_nowait(ev)


class NotReady(KCloudError):
    """The engine is not (or no longer) serving."""
