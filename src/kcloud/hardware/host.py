"""The host CPU as a device, measured by a short micro-benchmark.

Peak compute is the best fp32 (and, when cheap to measure, bf16) matmul rate with all the
cores this process may use; memory bandwidth is the best rate of large tensor copies, counting
the bytes read and written. The run takes under two seconds and is cached as JSON in
`$KCLOUD_CACHE_DIR` (default `$XDG_CACHE_HOME/kcloud`, else `~/.cache/kcloud`), keyed by CPU
model, core count and torch version. Memory capacity comes from the OS; power is estimated.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from kcloud.errors import CatalogError
from kcloud.hardware.device import Device, DeviceKind, Figure, Partition
from kcloud.precision import Precision

T = TypeVar("T")

HOST_ID = "host-cpu"
ENV_CACHE_DIR = "KCLOUD_CACHE_DIR"
CACHE_VERSION = 1

WATTS_PER_CORE = 6.0  # estimated board power per core at full load
IDLE_SHARE = 0.3  # idle power as a share of max

# Time budget of the micro-benchmark, seconds (torch import not included).
_BUDGET_FP32 = 0.6
_BUDGET_BF16 = 0.3
_BUDGET_COPY = 0.3
_COPY_BYTES_MAX = 128 * 2**20


@dataclass(frozen=True)
class HostMeasurement:
    """What the micro-benchmark measured on this host."""

    cpu_model: str
    cores: int
    torch_version: str
    date: str  # ISO date of the run
    fp32_flops: float
    memory_bw: float  # bytes/s, read + write
    bf16_flops: float | None = None
    seconds: float = 0.0  # how long the run took

    @property
    def source(self) -> str:
        return f"measured on this host by kcloud micro-benchmark {self.date}"


# -- host facts --------------------------------------------------------------------------------
def host_cores() -> int:
    """The number of CPU cores (logical) this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _cpuinfo() -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return info
    for line in text.splitlines():
        if not line.strip():
            if info:
                break  # the first processor's block is enough
            continue
        key, sep, value = line.partition(":")
        if sep:
            info.setdefault(key.strip(), value.strip())
    return info


def cpu_model() -> str:
    info = _cpuinfo()
    for key in ("model name", "Model", "Hardware", "cpu model", "Processor"):
        if info.get(key):
            return " ".join(info[key].split())
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_vendor() -> str:
    vendor_id = _cpuinfo().get("vendor_id", "")
    known = {"GenuineIntel": "Intel", "AuthenticAMD": "AMD", "HygonGenuine": "Hygon"}
    if vendor_id in known:
        return known[vendor_id]
    model = cpu_model()
    return model.split()[0] if model and model != "unknown CPU" else platform.machine() or "unknown"


def host_memory() -> tuple[float, str]:
    """(bytes of memory this process can use, where the figure comes from)."""
    total = 0.0
    source = ""
    try:
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemTotal:"):
                total = float(line.split()[1]) * 1024.0
                source = "reported by the OS (/proc/meminfo MemTotal)"
                break
    except (OSError, ValueError, IndexError):
        pass
    if total <= 0:
        try:
            total = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
            source = "reported by the OS (sysconf physical pages)"
        except (ValueError, OSError, AttributeError):
            total, source = 0.0, ""
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = Path(limit_file).read_text(encoding="utf-8").strip()
        except OSError:
            continue
        if raw.isdigit() and 0 < int(raw) < (total or float("inf")):
            total = float(raw)
            source = f"container memory limit ({limit_file})"
        break
    if total <= 0:
        raise CatalogError("cannot read the host's memory size from the OS",
                           "run on Linux or add a host-cpu.yaml to KCLOUD_CATALOG_PATH")
    return total, source


def _last_level_cache() -> float | None:
    try:
        size = os.sysconf("SC_LEVEL3_CACHE_SIZE")
        if size > 0:
            return float(size)
    except (ValueError, OSError, AttributeError):
        pass
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    best = 0.0
    for index in base.glob("index*"):
        try:
            text = (index / "size").read_text(encoding="utf-8").strip().upper()
        except OSError:
            continue
        mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            best = max(best, float(digits) * mult)
    return best or None


# -- cache -------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """Where kcloud keeps measurements: $KCLOUD_CACHE_DIR, else $XDG_CACHE_HOME/kcloud."""
    explicit = os.environ.get(ENV_CACHE_DIR)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "kcloud"


def _cache_key(model: str, cores: int, torch_version: str) -> str:
    return f"{model}|{cores}|{torch_version}"


def cache_file() -> Path:
    """The cache file for this host (CPU model, core count, torch version)."""
    import torch

    key = _cache_key(cpu_model(), host_cores(), torch.__version__)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / f"host-{digest}.json"


def _read_cache(path: Path, key: str, version: int, cls: type[T]) -> T | None:
    """A dataclass cached as JSON at `path` for this `key` and format `version`, or None."""
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if data.get("version") != version or data.get("key") != key:
        return None
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    try:
        return cls(**{k: v for k, v in data.items() if k in fields})
    except TypeError:
        return None


def _write_cache(path: Path, key: str, version: int, value: Any) -> None:
    data = {"version": version, "key": key, **dataclasses.asdict(value)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs a re-measurement next time


def _cached(path: Path, version: int, cls: type[T], memo: dict[str, T], force: bool,
            run: Callable[[], T], valid: Callable[[T], bool] = lambda _: True) -> T:
    """Memory memo, then the file cache (same CPU model, cores, torch), else `run()` and store."""
    import torch

    key = _cache_key(cpu_model(), host_cores(), torch.__version__)
    memo_key = f"{path}|{key}"
    if not force:
        if memo_key in memo:
            return memo[memo_key]
        cached = _read_cache(path, key, version, cls)
        if cached is not None and valid(cached):
            memo[memo_key] = cached
            return cached
    value = run()
    _write_cache(path, key, version, value)
    memo[memo_key] = value
    return value


# -- micro-benchmark ---------------------------------------------------------------------------
def _matmul_rate(dtype: Any, budget_s: float) -> float | None:
    """Best matmul FLOP/s at growing sizes (256 .. 2048) that fit in the time budget."""
    import torch

    deadline = time.perf_counter() + budget_s
    best = 0.0
    for n in (256, 512, 1024, 2048):
        flop = 2.0 * n**3
        # one warm-up and three timed runs at the best rate seen so far must fit
        if best and time.perf_counter() + 4.0 * flop / best > deadline:
            break
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        c = torch.empty(n, n, dtype=dtype)
        torch.mm(a, b, out=c)
        for _ in range(3):
            t0 = time.perf_counter()
            torch.mm(a, b, out=c)
            dt = time.perf_counter() - t0
            if dt > 0:
                best = max(best, flop / dt)
            if time.perf_counter() > deadline:
                break
        if time.perf_counter() > deadline:
            break
    return best or None


def _copy_rate(budget_s: float) -> float:
    """Best bytes/s of large tensor copies, counting bytes read plus bytes written."""
    import torch

    total, _ = host_memory()
    nbytes = int(min(_COPY_BYTES_MAX, max(16 * 2**20, total / 32)))
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    deadline = time.perf_counter() + budget_s
    dst.copy_(src)  # touches every page of dst
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        dt = time.perf_counter() - t0
        if dt > 0:
            best = max(best, 2.0 * n * 4 / dt)
        if time.perf_counter() > deadline:
            break
    return best


def _run_benchmark() -> HostMeasurement:
    import torch

    cores = host_cores()
    threads = torch.get_num_threads()
    start = time.perf_counter()
    try:
        torch.set_num_threads(cores)
        with torch.no_grad():
            fp32 = _matmul_rate(torch.float32, _BUDGET_FP32)
            bf16 = _matmul_rate(torch.bfloat16, _BUDGET_BF16)
            bw = _copy_rate(_BUDGET_COPY)
    finally:
        torch.set_num_threads(threads)
    if not fp32 or bw <= 0:
        raise CatalogError("the host CPU micro-benchmark measured nothing",
                           "check that torch runs on this machine")
    return HostMeasurement(
        cpu_model=cpu_model(),
        cores=cores,
        torch_version=torch.__version__,
        date=_dt.date.today().isoformat(),
        fp32_flops=fp32,
        memory_bw=bw,
        bf16_flops=bf16,
        seconds=round(time.perf_counter() - start, 3),
    )


_MEMO: dict[str, HostMeasurement] = {}


def measure_host(force: bool = False) -> HostMeasurement:
    """This host's measured peak fp32 (and bf16) matmul rate and memory bandwidth.

    Read from the cache when a run for this CPU model, core count and torch version is there;
    `force=True` measures again and rewrites the cache.
    """
    return _cached(cache_file(), CACHE_VERSION, HostMeasurement, _MEMO, force, _run_benchmark,
                   lambda m: m.fp32_flops > 0 and m.memory_bw > 0)


def reset_host_cache() -> None:
    """Forget the measurement held in memory (the file cache stays)."""
    _MEMO.clear()
    _PARAMS_MEMO.clear()


# -- the device --------------------------------------------------------------------------------
def host_device(measurement: HostMeasurement | None = None) -> Device:
    """The host CPU as a `Device` (id `host-cpu`), from `measure_host()` unless given."""
    m = measurement or measure_host()
    memory, memory_source = host_memory()
    peak = {Precision.FP32: Figure(m.fp32_flops, m.source, False,
                                   f"best fp32 matmul (up to 2048x2048), {m.cores} threads")}
    if m.bf16_flops:
        peak[Precision.BF16] = Figure(m.bf16_flops, m.source, False,
                                      f"best bf16 matmul, {m.cores} threads")
    power_note = (f"estimated: {WATTS_PER_CORE:g} W per core x {m.cores} cores, a guess between "
                  "server parts (about 3-5 W per core at TDP) and desktop parts (about 8-10 W)")
    max_w = WATTS_PER_CORE * m.cores
    llc = _last_level_cache()
    return Device(
        id=HOST_ID,
        name=f"{m.cpu_model} ({m.cores} cores)",
        vendor=cpu_vendor(),
        kind=DeviceKind.CPU,
        year=int(m.date[:4]),
        domestic=False,
        peak_flops=peak,
        memory_bytes=Figure(memory, memory_source, False),
        memory_bw=Figure(m.memory_bw, m.source, False,
                         "best large tensor copy, bytes read + written"),
        max_power_w=Figure(max_w, "kcloud estimate (no power sensor read)", True, power_note),
        idle_power_w=Figure(max_w * IDLE_SHARE, "kcloud estimate (no power sensor read)", True,
                            f"estimated: idle taken as {IDLE_SHARE:.0%} of the estimated max"),
        sram_bytes=(Figure(llc, "reported by the OS (last-level cache size)", False,
                           "last-level cache of one core complex") if llc else None),
        partitions=(Partition("1core", m.cores, 1.0 / m.cores, memory / m.cores,
                              "one core's share of the host"),),
        notes=(f"This machine's CPU, measured in {m.seconds:g} s with torch {m.torch_version}. "
               "Year is the year of the measurement. Partitions give one core's share of "
               "compute, bandwidth and memory (a single core may reach more than its share "
               "of the memory bandwidth)."),
        sources={"measured": m.source},
    )


def host_core_device(threads: int = 1) -> Device:
    """`threads` cores' share of the host CPU, as a device with id `host-cpu:<threads>core`."""
    m = measure_host()
    host = host_device(m)
    cores = m.cores
    if not 1 <= threads <= cores:
        raise CatalogError(f"the host CPU has {cores} cores, not {threads}",
                           f"ask for 1 to {cores} cores")
    share = threads / cores
    part = Partition(f"{threads}core", cores // threads, share, host.memory_bytes.value * share,
                     "share of the host")
    return dataclasses.replace(host, partitions=(part,)).partition(part.name)



# -- micro-calibration of the cost model's CPU parameters --------------------------------------
#
# The runtime runs every stage on one thread in eager PyTorch, so what matters is one core:
# the share of the partition's peak that a single-thread matmul reaches (`matrix_eff`), the
# share of its bandwidth share that it streams (`memory_eff`), the fixed cost of one eager
# kernel call (`kernel_overhead_s`) and of one module forward (`inference_overhead_s`). They are
# fitted by least squares on the log error of a few timed Linear ops of different shapes, each
# predicted by the cost model itself. The link between two local workers (one-way latency and
# bandwidth of a gloo send/recv over loopback) is measured by a round trip.

PARAMS_CACHE_VERSION = 2
# (batch, in features, out features) of the timed Linear ops: overhead-, memory- and
# compute-dominated shapes.
_PARAM_SHAPES: tuple[tuple[int, int, int], ...] = (
    (1, 32, 32), (1, 128, 128), (1, 512, 2048), (1, 2048, 512), (8, 784, 512),
    (32, 512, 2048), (32, 2048, 512), (128, 512, 512), (64, 1024, 1024),
)
_PARAM_BOUNDS: dict[str, tuple[float, float]] = {
    "matrix_eff": (0.02, 1.0), "kernel_overhead_s": (1e-7, 1e-3),
}
_OP_BUDGET_S = 0.12  # per timed op
_LINK_SIZES = (16, 65536)  # elements (fp32) of the round-trip messages


@dataclass(frozen=True)
class HostParams:
    """Cost-model parameters of one host core and of the link between local workers."""

    matrix_eff: float
    kernel_overhead_s: float
    inference_overhead_s: float
    link_latency_s: float  # one way, one message
    link_bw: float  # bytes/s, one direction
    date: str
    fit_error_pct: float = 0.0  # worst |predicted - measured| of the timed ops, percent
    seconds: float = 0.0

    @property
    def source(self) -> str:
        return f"measured on this host by kcloud micro-calibration {self.date}"

    def overrides(self) -> dict[str, float]:
        """The `DeviceParams` fields these measurements set."""
        return {"matrix_eff": self.matrix_eff, "kernel_overhead_s": self.kernel_overhead_s,
                "inference_overhead_s": self.inference_overhead_s}


def params_cache_file() -> Path:
    """The cache file of this host's fitted parameters (beside the host measurement)."""
    path = cache_file()
    return path.with_name(path.name.replace("host-", "host-params-", 1))


def _best_time(fn: Any, budget_s: float, reps_max: int = 200) -> float:
    """The lower quartile of repeated timings of `fn()` (robust to a busy machine)."""
    fn()
    fn()
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < reps_max and (len(times) < 5 or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 4]


def _linear_graph(b: int, k: int, n: int) -> Any:
    from kcloud.graph.layergraph import Layer, LayerGraph, Op, OpClass

    op = Op(OpClass.MATMUL, 2.0 * b * k * n, k * n + n, b * k, b * n, name="linear")
    layer = Layer(0, "linear", "Linear", (op,), k * n + n, b * n)
    return LayerGraph("host-calibration", (layer,), b, input_elems=b * k, output_elems=b * n)


def _time_ops() -> tuple[list[tuple[int, int, int]], list[float], float]:
    """Single-thread times of the Linear shapes, and of one empty module forward."""
    import torch

    threads = torch.get_num_threads()
    torch.manual_seed(0)
    out: list[float] = []
    try:
        torch.set_num_threads(1)
        with torch.inference_mode():
            for b, k, n in _PARAM_SHAPES:
                lin = torch.nn.Linear(k, n)
                x = torch.randn(b, k)
                out.append(_best_time(lambda lin=lin, x=x: lin(x), _OP_BUDGET_S))
            lin = torch.nn.Linear(32, 32)
            seq = torch.nn.Sequential(lin)
            x = torch.randn(1, 32)
            # a forward through a module tree beyond its one kernel
            wrapped = _best_time(lambda: seq(x), _OP_BUDGET_S)
            bare = _best_time(lambda: lin(x), _OP_BUDGET_S)
    finally:
        torch.set_num_threads(threads)
    return list(_PARAM_SHAPES), out, max(wrapped - bare, 1e-7)


def _link_round_trip() -> tuple[float, float]:
    """(one-way latency s, bandwidth bytes/s) of gloo send/recv between two local ranks."""
    import threading
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    store = dist.HashStore()
    timeout = timedelta(seconds=30)
    times: dict[int, float] = {}
    errors: list[BaseException] = []
    pgs: list[Any] = [None, None]

    def make(rank: int) -> None:
        try:
            pgs[rank] = dist.ProcessGroupGloo(store, rank, 2, timeout)
        except BaseException as exc:  # reported below
            errors.append(exc)

    def on_both_ranks(target: Any, *args: Any) -> None:
        threads = [threading.Thread(target=target, args=(r, *args)) for r in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    on_both_ranks(make)

    def ping(rank: int, size: int, reps: int) -> None:
        pg = pgs[rank]
        buf = [torch.zeros(size)]
        best: list[float] = []
        try:
            for _ in range(reps):
                t0 = time.perf_counter()
                if rank == 0:
                    pg.send(buf, 1, 0).wait()
                    pg.recv(buf, 1, 0).wait()
                else:
                    pg.recv(buf, 0, 0).wait()
                    pg.send(buf, 0, 0).wait()
                best.append(time.perf_counter() - t0)
        except BaseException as exc:  # reported below
            errors.append(exc)
        if rank == 0:
            times[size] = min(best)  # the link's own cost, without scheduling noise

    for size in _LINK_SIZES:
        on_both_ranks(ping, size, 40)
    small, large = (times[s] / 2.0 for s in _LINK_SIZES)  # one way
    extra = (_LINK_SIZES[1] - _LINK_SIZES[0]) * 4.0
    copy_bw = measure_host().memory_bw / 2.0  # no link is faster than a memory copy
    bw = extra / (large - small) if large > small else copy_bw
    return max(small, 1e-7), min(bw, copy_bw)


def _fit(shapes: list[tuple[int, int, int]], measured: list[float],
         inference_s: float) -> tuple[dict[str, float], float]:
    import math

    import numpy as np
    from scipy.optimize import least_squares

    from kcloud.hardware.cost import CLASS_PRIORS, forward_cost

    device = host_core_device(1)
    base = dataclasses.replace(CLASS_PRIORS[DeviceKind.CPU], inference_overhead_s=0.0)
    graphs = [_linear_graph(*sh) for sh in shapes]
    names = list(_PARAM_BOUNDS)
    lo = np.log([_PARAM_BOUNDS[n][0] for n in names])
    hi = np.log([_PARAM_BOUNDS[n][1] for n in names])

    def predict(x: np.ndarray) -> list[float]:
        p = dataclasses.replace(base, **{n: float(math.exp(v)) for n, v in zip(names, x,
                                                                              strict=True)})
        return [forward_cost(g, device, Precision.FP32, g.batch, p).time_s for g in graphs]

    def residuals(x: np.ndarray) -> np.ndarray:
        return np.log(np.array(predict(x)) / np.array(measured))

    x0 = np.log([getattr(base, n) for n in names])
    sol = least_squares(residuals, np.clip(x0, lo + 1e-9, hi - 1e-9), bounds=(lo, hi),
                        diff_step=1e-3, xtol=1e-10, ftol=1e-10, max_nfev=300)
    fitted = {n: float(math.exp(v)) for n, v in zip(names, sol.x, strict=True)}
    fitted["inference_overhead_s"] = inference_s
    worst = max(abs(p / m - 1.0) for p, m in zip(predict(sol.x), measured, strict=True))
    return fitted, 100.0 * worst


def _run_param_calibration() -> HostParams:
    start = time.perf_counter()
    shapes, measured, inference_s = _time_ops()
    fitted, worst = _fit(shapes, measured, inference_s)
    latency, bw = _link_round_trip()
    return HostParams(**fitted, link_latency_s=latency, link_bw=bw,
                      date=_dt.date.today().isoformat(), fit_error_pct=round(worst, 2),
                      seconds=round(time.perf_counter() - start, 3))


_PARAMS_MEMO: dict[str, HostParams] = {}


def measure_host_params(force: bool = False) -> HostParams:
    """This host's fitted single-core cost parameters and local link figures.

    Cached beside the host measurement (same key: CPU model, core count, torch version);
    `force=True` measures again and rewrites the cache.
    """
    return _cached(params_cache_file(), PARAMS_CACHE_VERSION, HostParams, _PARAMS_MEMO, force,
                   _run_param_calibration)


def host_link() -> tuple[float, float]:
    """(bandwidth bytes/s, one-way latency s) of the link between two local workers."""
    hp = measure_host_params()
    return hp.link_bw, hp.link_latency_s


def _host_overrides() -> tuple[dict[str, float], str]:
    hp = measure_host_params()
    return hp.overrides(), hp.source


def _register() -> None:
    from kcloud.hardware.cost import register_measured_params

    register_measured_params(HOST_ID, _host_overrides)


_register()

__all__ = [
    "HOST_ID",
    "HostMeasurement",
    "HostParams",
    "cache_dir",
    "cache_file",
    "cpu_model",
    "host_core_device",
    "host_cores",
    "host_device",
    "host_link",
    "host_memory",
    "measure_host",
    "measure_host_params",
    "params_cache_file",
    "reset_host_cache",
]
