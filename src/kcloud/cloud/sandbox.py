"""Engine sandboxes: one process tree per deployment, behind one small interface.

A backend starts a `SandboxSpec` (argv, its own writable directory, environment, limits) and
returns a `Sandbox` (pid, alive, stop). Backends:

- `bwrap` (bubblewrap): new pid, mount, IPC, UTS and network namespaces; the system read-only
  (`--ro-bind / /`), a fresh /tmp, /dev and /proc; the control plane's data directory hidden
  under an empty tmpfs, and only the deployment's own directory bound back, writable. The
  engine reaches the world only through the unix socket in its directory (the gateway's path).
- `runc` (an OCI runtime): the same view as an OCI bundle (`config.json`, runtime-spec 1.0:
  read-only root, tmpfs masks, namespaces pid/ipc/uts/mount/network, no new privileges).
- `none`: a plain process group, no isolation (only with `--isolation none`).

Memory and process-count limits go through cgroup v1 (`memory`, `pids`) where the host mounts
those controllers writable, as this one does; the cgroup v2 tree here has no controllers
enabled (`cgroup.controllers` is empty), so v2 limits are not available; `limits_status()` says
which applies. The bwrap and none backends enter the cgroups before the engine starts (a small
`sh` wrapper writes its own pid into `cgroup.procs`, then execs), so no child escapes them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

CGROUP_V1 = Path("/sys/fs/cgroup")
CGROUP_V2 = Path("/sys/fs/cgroup/unified")
CGROUP_PARENT = "kcloud"
PID_FILE = "sandbox.pid"


@dataclass(frozen=True)
class SandboxSpec:
    name: str  # unique: the deployment id
    root: Path  # the deployment's own writable directory
    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    hide: tuple[Path, ...] = ()  # directories the engine must not see (the data directory)
    memory_bytes: int | None = None
    pids_max: int | None = None
    device_nodes: tuple[str, ...] = ()  # /dev nodes of the allocated real accelerators
    log: str = "engine.log"  # stdout + stderr, inside `root`


class Sandbox(Protocol):
    name: str
    pid: int  # the outermost process (the one the control plane started)

    def alive(self) -> bool: ...

    def stop(self, timeout: float = 10.0) -> int | None: ...


# ---------------------------------------------------------------------------------------------
# cgroup v1 limits


def limits_status() -> str:
    """Which resource limits this host allows, in words."""
    v1 = _cgroup_v1_ok()
    v2 = _cgroup_v2_controllers()
    if v1:
        return "cgroup v1 memory and pids limits"
    if v2:
        return f"cgroup v2 controllers {' '.join(v2)} present but not used"
    return "no writable cgroup memory/pids controller: limits not enforced"


def _cgroup_v2_controllers() -> list[str]:
    try:
        return (CGROUP_V2 / "cgroup.controllers").read_text().split()
    except OSError:
        return []


def _cgroup_v1_ok() -> bool:
    for ctl in ("memory", "pids"):
        base = CGROUP_V1 / ctl
        if not (base / "cgroup.procs").exists() or not os.access(base, os.W_OK):
            return False
    return True


class Cgroups:
    """The v1 memory and pids cgroups of one sandbox."""

    def __init__(self, name: str) -> None:
        self.dirs = {ctl: CGROUP_V1 / ctl / CGROUP_PARENT / name for ctl in ("memory", "pids")}

    def create(self, memory_bytes: int | None, pids_max: int | None) -> None:
        for d in self.dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        if memory_bytes is not None:
            (self.dirs["memory"] / "memory.limit_in_bytes").write_text(str(memory_bytes))
            swap = self.dirs["memory"] / "memory.memsw.limit_in_bytes"
            if swap.exists():
                with contextlib.suppress(OSError):
                    swap.write_text(str(memory_bytes))
        if pids_max is not None:
            (self.dirs["pids"] / "pids.max").write_text(str(pids_max))

    def wrap(self, argv: list[str]) -> list[str]:
        """argv that first joins these cgroups, then execs `argv`."""
        script = 'for d in "$1" "$2"; do echo $$ > "$d/cgroup.procs"; done; shift 2; exec "$@"'
        return ["sh", "-c", script, "kcloud-sandbox", str(self.dirs["memory"]),
                str(self.dirs["pids"]), *argv]

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in (self.dirs["pids"] / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def oom_kills(self) -> int:
        try:
            for line in (self.dirs["memory"] / "memory.oom_control").read_text().splitlines():
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
        except OSError:
            pass
        return 0

    def remove(self) -> None:
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for d in self.dirs.values():
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# processes


class ProcessSandbox:
    """A sandbox that is one child process tree (bwrap or none backends)."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], root: Path,
                 cgroups: Cgroups | None, inner_pid: int | None = None) -> None:
        self.name = name
        self.proc = proc
        self.pid = proc.pid
        self.root = root
        self.cgroups = cgroups
        self.inner_pid = inner_pid  # bwrap: the engine's pid as the host sees it
        (root / PID_FILE).write_text(str(self.pid))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc.poll() is None:
            target = self.inner_pid or self.pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(target, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _kill_group(self.pid)
                self.proc.wait(5)
        if self.cgroups:
            self.cgroups.remove()
        (self.root / PID_FILE).unlink(missing_ok=True)
        return self.proc.returncode


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _open_log(spec: SandboxSpec) -> int:
    return os.open(spec.root / spec.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)


def _spawn(spec: SandboxSpec, argv: list[str], pass_fds: tuple[int, ...] = ()
           ) -> tuple[subprocess.Popen[bytes], Cgroups | None]:
    cg = None
    if (spec.memory_bytes or spec.pids_max) and _cgroup_v1_ok():
        cg = Cgroups(spec.name)
        cg.create(spec.memory_bytes, spec.pids_max)
        argv = cg.wrap(argv)
    log = _open_log(spec)
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                cwd=spec.root, env=spec.env, start_new_session=True,
                                pass_fds=pass_fds)
    finally:
        os.close(log)
    return proc, cg


class NoneBackend:
    name = "none"

    @staticmethod
    def problem() -> str | None:
        return None

    def start(self, spec: SandboxSpec) -> Sandbox:
        proc, cg = _spawn(spec, list(spec.argv))
        return ProcessSandbox(spec.name, proc, spec.root, cg)


class BwrapBackend:
    name = "bwrap"

    @staticmethod
    def problem() -> str | None:
        """Why bubblewrap cannot sandbox here, or None when it can."""
        exe = shutil.which("bwrap")
        if exe is None:
            return "bubblewrap (bwrap) is not installed (apt-get install bubblewrap)"
        r = subprocess.run([exe, "--unshare-pid", "--unshare-ipc", "--unshare-net",
                            "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev", "true"],
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            return f"bwrap cannot create namespaces here: {r.stderr.strip()[:200]}"
        return None

    def argv(self, spec: SandboxSpec, info_fd: int) -> list[str]:
        a = ["bwrap", "--die-with-parent", "--new-session", "--unshare-pid", "--unshare-ipc",
             "--unshare-uts", "--unshare-net", "--unshare-cgroup-try",
             "--hostname", spec.name[:60], "--info-fd", str(info_fd),
             "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
        for p in _code_under_tmp():
            a += ["--ro-bind", p, p]
        for node in spec.device_nodes:
            a += ["--dev-bind", node, node]
        for h in spec.hide:
            a += ["--tmpfs", str(h)]
        a += ["--bind", str(spec.root), str(spec.root), "--chdir", str(spec.root),
              "--clearenv"]
        for k, v in spec.env.items():
            a += ["--setenv", k, v]
        return [*a, "--", *spec.argv]

    def start(self, spec: SandboxSpec) -> Sandbox:
        r, w = os.pipe()
        try:
            proc, cg = _spawn(spec, self.argv(spec, w), pass_fds=(w,))
        finally:
            os.close(w)
        inner = None
        with os.fdopen(r, "rb") as f:  # bwrap writes {"child-pid": N} once the child runs
            data = f.read()
        try:
            inner = int(json.loads(data.decode() or "{}").get("child-pid"))
        except (ValueError, TypeError):
            inner = None
        return ProcessSandbox(spec.name, proc, spec.root, cg, inner)


class RuncSandbox:
    def __init__(self, name: str, proc: subprocess.Popen[bytes], root: Path, state: Path,
                 cid: str) -> None:
        self.name = name
        self.proc = proc
        self.pid = proc.pid
        self.root = root
        self.state = state
        self.cid = cid
        (root / PID_FILE).write_text(str(self.pid))

    def _runc(self, *args: str) -> None:
        subprocess.run(["runc", "--root", str(self.state), *args], capture_output=True,
                       timeout=30)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc.poll() is None:
            self._runc("kill", self.cid, "TERM")
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._runc("kill", "--all", self.cid, "KILL")
                self.proc.wait(10)
        self._runc("delete", "--force", self.cid)
        (self.root / PID_FILE).unlink(missing_ok=True)
        return self.proc.returncode


class RuncBackend:
    """The same sandbox as an OCI bundle run by runc (runtime-spec 1.0 `config.json`)."""

    name = "runc"

    def __init__(self, state: Path | None = None) -> None:
        self.state = state or Path("/run/kcloud-runc")

    @staticmethod
    def problem() -> str | None:
        if shutil.which("runc") is None:
            return "runc is not installed (apt-get install runc)"
        if os.geteuid() != 0:
            return "runc needs root here (no rootless set-up)"
        return None

    def config(self, spec: SandboxSpec) -> dict:
        # the host's system directories, read-only, in an otherwise empty root
        mounts = [{"destination": f"/{d}", "type": "bind", "source": f"/{d}",
                   "options": ["rbind", "ro", "nosuid"]} for d in _system_dirs()]
        mounts += [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "nodev", "mode=1777"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
        ]
        mounts += [{"destination": p, "type": "bind", "source": p,
                    "options": ["rbind", "ro", "nosuid"]} for p in _code_under_tmp()]
        mounts += [{"destination": str(h), "type": "tmpfs", "source": "tmpfs",
                    "options": ["nosuid", "nodev", "mode=755"]} for h in spec.hide]
        mounts.append({"destination": str(spec.root), "type": "bind", "source": str(spec.root),
                       "options": ["rbind", "rw"]})
        mounts += [{"destination": n, "type": "bind", "source": n, "options": ["bind", "rw"]}
                   for n in spec.device_nodes]
        resources: dict = {}
        if spec.memory_bytes:
            resources["memory"] = {"limit": spec.memory_bytes}
        if spec.pids_max:
            resources["pids"] = {"limit": spec.pids_max}
        caps = ["CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_CHOWN", "CAP_DAC_OVERRIDE",
                "CAP_FOWNER", "CAP_SETUID", "CAP_SETGID"]
        return {
            "ociVersion": "1.0.2",
            "process": {
                "terminal": False, "user": {"uid": 0, "gid": 0},
                "args": list(spec.argv),
                "env": [f"{k}={v}" for k, v in spec.env.items()],
                "cwd": str(spec.root), "noNewPrivileges": True,
                "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
            },
            "root": {"path": "rootfs", "readonly": True},
            "hostname": spec.name[:60],
            "mounts": mounts,
            "linux": {
                "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")],
                "cgroupsPath": f"/{CGROUP_PARENT}-runc/{spec.name}",
                "resources": resources,
                "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list"],
                "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger", "/proc/bus"],
            },
        }

    def start(self, spec: SandboxSpec) -> Sandbox:
        bundle = self.state / "bundles" / spec.name
        rootfs = bundle / "rootfs"
        rootfs.mkdir(parents=True, exist_ok=True)
        for name, target in _system_links():
            link = rootfs / name
            if not link.is_symlink():
                link.symlink_to(target)
        (bundle / "config.json").write_text(json.dumps(self.config(spec), indent=1))
        self.state.mkdir(parents=True, exist_ok=True)
        subprocess.run(["runc", "--root", str(self.state), "delete", "--force", spec.name],
                       capture_output=True, timeout=30)
        log = _open_log(spec)
        try:
            proc = subprocess.Popen(["runc", "--root", str(self.state), "run", "--bundle",
                                     str(bundle), spec.name], stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=log, start_new_session=True)
        finally:
            os.close(log)
        return RuncSandbox(spec.name, proc, spec.root, self.state, spec.name)


_NOT_SYSTEM = {"proc", "sys", "dev", "tmp", "run", "mnt", "media", "lost+found", "boot"}


def _system_dirs() -> list[str]:
    return sorted(e.name for e in os.scandir("/") if e.is_dir(follow_symlinks=False)
                  and e.name not in _NOT_SYSTEM)


def _system_links() -> list[tuple[str, str]]:
    return sorted((e.name, os.readlink(e.path)) for e in os.scandir("/") if e.is_symlink())


BACKENDS = {"bwrap": BwrapBackend, "runc": RuncBackend, "none": NoneBackend}


def backend(name: str) -> NoneBackend | BwrapBackend | RuncBackend:
    if name not in BACKENDS:
        raise ValueError(name)
    return BACKENDS[name]()


def reap_orphan(root: Path) -> bool:
    """Kill the process group a previous control plane left running in `root` (its pid file
    names it, and its command line names `root`). True when one was found."""
    pid_file = root / PID_FILE
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return False
    found = False
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        if str(root) in cmd:
            _kill_group(pid)
            found = True
    except OSError:
        pass
    pid_file.unlink(missing_ok=True)
    return found


def _code_under_tmp() -> list[str]:
    """The Python installation and K-Cloud's own code, where they lie under /tmp (a fresh
    tmpfs in a sandbox would hide them): bound back read-only so the engine can start."""
    import kcloud

    tmp = Path("/tmp").resolve()
    out: list[str] = []
    for p in (sys.prefix, sys.base_prefix, str(Path(kcloud.__file__).resolve().parents[1])):
        path = Path(p).resolve()
        if path != tmp and path.is_relative_to(tmp) and str(path) not in out:
            out.append(str(path))
    return out
