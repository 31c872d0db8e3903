"""Running the `kcloud` command as a user does (a child process) for the fuzz and fault
suites: its exit code, stderr, time, and what it left behind (processes, run directories)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

KCLOUD = [sys.executable, "-m", "kcloud.cli"]


@dataclass
class Ran:
    code: int
    out: str
    err: str
    seconds: float

    @property
    def err_lines(self) -> list[str]:
        return [ln for ln in self.err.splitlines() if ln.strip()]


def env(tmp: Path) -> dict[str, str]:
    """The environment of a `kcloud` child: its own temporary folder (to count what it
    leaves there), no colours, the test session's cache."""
    tmp.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "TMPDIR": str(tmp), "NO_COLOR": "1", "COLUMNS": "150"}


def run(args: list[str], tmp: Path, timeout_s: float = 240.0, cwd: Path | None = None) -> Ran:
    t0 = time.monotonic()
    p = subprocess.run([*KCLOUD, *args], capture_output=True, text=True, timeout=timeout_s,
                       env=env(tmp), cwd=cwd, stdin=subprocess.DEVNULL)
    return Ran(p.returncode, p.stdout, p.stderr, time.monotonic() - t0)


def live(pids: list[int]) -> list[int]:
    """Those of `pids` still running (a zombie has ended)."""
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def wait_gone(pids: list[int], within_s: float) -> float | None:
    """Seconds until none of `pids` runs; None when some still run after `within_s`."""
    t0 = time.monotonic()
    while live(pids):
        if time.monotonic() - t0 > within_s:
            return None
        time.sleep(0.05)
    return time.monotonic() - t0


def run_dirs(tmp: Path) -> list[Path]:
    return sorted(tmp.glob("kcloud-*"))
