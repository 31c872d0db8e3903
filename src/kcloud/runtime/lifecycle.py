"""Process lifecycle: no process of a run outlives its driver, SIGTERM and Ctrl-C unwind a
driver like an error. Torch-free, so that the CLI and any
driver can use it.

- `Lifeline` (made in the parent, held by each child): the child dies when the parent dies,
  whatever kills it. On Linux the kernel sends the child SIGKILL when its parent exits
  (prctl(PR_SET_PDEATHSIG), see prctl(2)); everywhere a watchdog thread in the child reads a
  pipe whose write end only the parent holds, and ends the child at end-of-file. The
  parent-death signal follows the parent *thread* that started the child, so it is only set
  when the child is started from the main thread; the pipe covers the rest.
- `signals_unwind`: SIGTERM (and SIGINT) raise `Interrupted` in the main thread, so `finally`
  clean-ups run as they do for an error; the CLI turns it into one line and exit 128 + signal.
- `call_in_child`: user code (a model file's import and factory) in a child process under a
  time limit, so that a loop, a hang or `os._exit` in it is a one-line error.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from kcloud.errors import KCloudError, one_line

STARTUP_S = 120.0  # a child's start (interpreter, imports) on a loaded host, at most
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


# ---- children die with their parent -----------------------------------------------------------


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send `sig` to this process when its parent thread exits (Linux);
    False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


@dataclass
class Lifeline:
    """Made by a parent before it starts children (any number), passed to each (it pickles
    through multiprocessing), held by the child with `hold()` as its first act."""

    ctx: Any = None  # a multiprocessing context (default: spawn)
    parent_pid: int = field(default_factory=os.getpid)
    pdeathsig: bool = field(
        default_factory=lambda: threading.current_thread() is threading.main_thread())

    def __post_init__(self) -> None:
        ctx = self.ctx or mp.get_context("spawn")
        self.ctx = None
        self._reader, self._writer = ctx.Pipe(duplex=False)

    def __getstate__(self) -> dict[str, Any]:
        # Only the read end travels; the write end stays in the parent alone.
        return {"parent_pid": self.parent_pid, "pdeathsig": self.pdeathsig,
                "_reader": self._reader, "_writer": None, "ctx": None}

    def hold(self) -> None:
        """In the child: die with the parent from now on."""
        if self.pdeathsig:
            set_parent_death_signal()
        if os.getppid() != self.parent_pid:  # the parent died before the signal was set
            os._exit(1)
        reader = self._reader

        def watch() -> None:
            with contextlib.suppress(EOFError, OSError):
                while True:
                    reader.recv()
            os._exit(1)  # end of file: the parent is gone

        threading.Thread(target=watch, name="kcloud-lifeline", daemon=True).start()

    def close(self) -> None:
        """In the parent: let go (the children it started end). Closing is optional: the
        write end closes anyway when the parent process ends."""
        for end in (self._writer, self._reader):
            if end is not None:
                with contextlib.suppress(OSError):
                    end.close()


def start(procs: list[Any]) -> None:
    """Start multiprocessing children that ignore SIGINT from birth (a spawned interpreter
    keeps an inherited SIG_IGN), so that a Ctrl-C at the terminal, which reaches the whole
    process group, is answered by the driver alone; it reaps them."""
    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    try:
        for p in procs:
            p.start()
    finally:
        if main:
            signal.signal(signal.SIGINT, old)


def ignore_sigint() -> None:
    """In a child: a Ctrl-C at the terminal reaches the whole process group; the driver
    alone answers it (and reaps the child)."""
    with contextlib.suppress(ValueError):  # not the main thread
        signal.signal(signal.SIGINT, signal.SIG_IGN)


# ---- signals -----------------------------------------------------------------------------------


class Interrupted(BaseException):
    """SIGTERM or SIGINT in a driver: unwinds like an error (a BaseException, so that no
    `except Exception` swallows it)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


def _raise(signum: int, _frame: Any) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_unwind(*signums: int) -> Iterator[None]:
    """While the block runs, the signals (default SIGTERM and SIGINT) raise `Interrupted` in
    the main thread; outside the main thread this does nothing."""
    sigs = signums or (signal.SIGTERM, signal.SIGINT)
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, _raise) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# ---- user code in a child process ------------------------------------------------------------


def _child(lifeline: Lifeline, conn: Any, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    lifeline.hold()
    ignore_sigint()
    conn.send(("ready", None))  # imports done: the time limit is on `fn` alone
    try:
        out: tuple[str, Any] = ("ok", fn(*args))
    except KCloudError as exc:
        out = ("error", (exc.problem, exc.hint))
    except BaseException as exc:  # any failure of user code becomes one line
        out = ("error", (one_line(exc), None))
    try:
        conn.send(out)
    except Exception as exc:
        conn.send(("error", (f"its result cannot be returned ({type(exc).__name__})", None)))
    conn.close()


def call_in_child(fn: Callable[..., Any], *args: Any, timeout_s: float, what: str,
                  hint: str) -> Any:
    """`fn(*args)` in a spawned child process that dies with this one; its result, or a
    one-line `KCloudError` naming `what` when it raises, exits without a result or runs past
    `timeout_s` (`hint`: how to change that limit). `fn` and its result must pickle."""
    if not timeout_s > 0:
        raise KCloudError(f"the time limit for {what} must be positive, got {timeout_s:g} s",
                          hint)
    ctx = mp.get_context("spawn")
    lifeline = Lifeline(ctx)
    reader, writer = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(lifeline, writer, fn, args), daemon=True,
                       name="kcloud-user-code")
    try:
        start([proc])
        writer.close()
        try:
            if reader.poll(STARTUP_S):
                reader.recv()  # "ready"
            if not reader.poll(timeout_s):
                raise KCloudError(f"{what} did not finish within {timeout_s:g} s", hint)
            status, value = reader.recv()
            proc.join(5.0)  # let it finish its own exit (a kill there leaks its semaphores)
        except EOFError:
            proc.join(5.0)
            raise KCloudError(f"{what} ended the process (exit code {proc.exitcode}) without "
                              "returning", "do not exit from the model file or factory"
                              ) from None
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(5.0)
        reader.close()
        lifeline.close()
    if status == "error":
        problem, why = value
        raise KCloudError(problem if why else f"{what} failed: {problem}", why)
    return value
