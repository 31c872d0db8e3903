"""`kcloud.runtime.lifecycle` on its own: children die with a SIGKILLed parent, SIGTERM
unwinds through `finally`, user code runs in a child under a time limit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from kcloud.errors import KCloudError
from kcloud.runtime import lifecycle

# A parent that starts two children holding its lifeline, prints their PIDs, then waits.
PARENT = textwrap.dedent("""
    import json, sys, time, multiprocessing as mp
    from kcloud.runtime import lifecycle

    def child(lifeline, pdeathsig):
        lifeline.pdeathsig = pdeathsig
        lifeline.hold()
        time.sleep(600)

    if __name__ == "__main__":
        ctx = mp.get_context("spawn")
        line = lifecycle.Lifeline(ctx)
        pdeathsig = sys.argv[1] == "signal"
        procs = [ctx.Process(target=child, args=(line, pdeathsig)) for _ in range(2)]
        lifecycle.start(procs)
        time.sleep(float(sys.argv[2]))  # the children are past their imports
        print(json.dumps([p.pid for p in procs]), flush=True)
        time.sleep(600)
""")


def _gone(pids: list[int], within_s: float) -> float | None:
    """Seconds until every pid is gone (or a zombie), None if some outlive `within_s`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < within_s:
        alive = [p for p in pids if psutil.pid_exists(p)
                 and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return time.monotonic() - t0
        time.sleep(0.05)
    return None


@pytest.mark.slow
@pytest.mark.parametrize("how", ["signal", "pipe"])
def test_children_die_when_the_parent_is_killed(tmp_path: Path, how: str) -> None:
    # "signal": the kernel's parent-death signal; "pipe": the watchdog thread alone (what a
    # child started from another thread, or on another OS, relies on).
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(script), how, "3"], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert parent.stdout is not None
        pids = json.loads(parent.stdout.readline())
        assert all(psutil.pid_exists(p) for p in pids)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        took = _gone(pids, 5.0)
        assert took is not None, f"children {pids} outlived their SIGKILLed parent"
    finally:
        parent.kill()
        for p in psutil.Process().children(recursive=True):
            p.kill()


def test_sigterm_unwinds_through_finally(tmp_path: Path) -> None:
    code = textwrap.dedent(f"""
        import sys, time
        from kcloud.runtime import lifecycle
        with lifecycle.signals_unwind():
            try:
                print("ready", flush=True)
                time.sleep(60)
            except lifecycle.Interrupted as exc:
                print("interrupted", exc.exit_code, flush=True)
                raise SystemExit(exc.exit_code)
            finally:
                open({str(tmp_path / "cleaned")!r}, "w").close()
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "ready"
    p.send_signal(signal.SIGTERM)
    assert p.wait(10) == 143
    assert p.stdout.read().strip() == "interrupted 143"
    assert (tmp_path / "cleaned").exists()


def _loop() -> None:
    while True:
        pass


def _exit0() -> None:
    os._exit(0)


def _raises() -> None:
    raise ValueError("bad layer")


@pytest.mark.slow
def test_user_code_in_a_child_process() -> None:
    assert lifecycle.call_in_child(pow, 2, 10, timeout_s=30, what="pow", hint="h") == 1024
    t0 = time.monotonic()
    with pytest.raises(KCloudError, match=r"loop did not finish within 1 s; raise it"):
        lifecycle.call_in_child(_loop, timeout_s=1, what="loop", hint="raise it")
    assert time.monotonic() - t0 < 60
    with pytest.raises(KCloudError, match=r"exit ended the process \(exit code 0\)"):
        lifecycle.call_in_child(_exit0, timeout_s=30, what="exit", hint="h")
    with pytest.raises(KCloudError, match=r"^f failed: ValueError: bad layer$"):
        lifecycle.call_in_child(_raises, timeout_s=30, what="f", hint="h")
    assert not [p for p in psutil.Process().children(recursive=True)
                if p.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in
                " ".join(p.cmdline())]
