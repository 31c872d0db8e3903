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
import queue as queue_mod
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from kcloud.errors import CatalogError
from kcloud.hardware.device import Device, DeviceKind, Figure, Partition
from kcloud.paths import cache_dir
from kcloud.precision import Precision

T = TypeVar("T")

HOST_ID = "host-cpu"
CACHE_VERSION = 2  # 2: one-thread matmul rates times the cores

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


def cache_share_bytes() -> float:
    """One core's share of the last-level cache (0 when the OS does not say)."""
    return (_last_level_cache() or 0.0) / host_cores()


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
def _cache_key(model: str, cores: int, torch_version: str) -> str:
    return f"{model}|{cores}|{torch_version}"


def cache_file() -> Path:
    """The cache file for this host (CPU model, core count, torch version)."""
    import torch

    key = _cache_key(cpu_model(), host_cores(), torch.__version__)
    # the formats' versions in the name: a checkout of another version keeps its own file
    digest = hashlib.sha256(f"{key}|{CACHE_VERSION}|{PARAMS_CACHE_VERSION}".encode()).hexdigest()
    return cache_dir() / f"host-{digest[:16]}.json"


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
        # One thread, as the runtime runs every worker (one per core), times the cores. A
        # matmul over all cores' threads is no figure of this host where other tenants load
        # it: one starved thread stalls the others at every barrier (measured here on a
        # loaded 2-core machine: 0.84 GFLOP/s on 2 threads against 96 GFLOP/s on one).
        torch.set_num_threads(1)
        with torch.no_grad():
            fp32 = _matmul_rate(torch.float32, _BUDGET_FP32)
            bf16 = _matmul_rate(torch.bfloat16, _BUDGET_BF16)
            torch.set_num_threads(cores)
            bw = _copy_rate(_BUDGET_COPY)
    finally:
        torch.set_num_threads(threads)
    fp32 = fp32 * cores if fp32 else fp32
    bf16 = bf16 * cores if bf16 else bf16
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


def keep_heap() -> bool:
    """Keep freed memory in this process's heap (glibc): large blocks are not handed back to
    the OS after every free, so a forward pass does not page-fault fresh zeroed pages for each
    of its activations again (worth a quarter of a small CNN's time on one core). Called by
    every worker process; a no-op where glibc is absent. True when applied."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if platform.system() != "Linux" or not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 32 * 2**20)
                    and libc.mallopt(m_trim_threshold, 512 * 2**20))
    except (OSError, AttributeError):
        return False


# -- the device --------------------------------------------------------------------------------
def host_device(measurement: HostMeasurement | None = None) -> Device:
    """The host CPU as a `Device` (id `host-cpu`), from `measure_host()` unless given."""
    m = measurement or measure_host()
    memory, memory_source = host_memory()
    peak = {Precision.FP32: Figure(m.fp32_flops, m.source, False,
                                   f"best one-thread fp32 matmul (up to 2048x2048) x "
                                   f"{m.cores} cores")}
    if m.bf16_flops:
        peak[Precision.BF16] = Figure(m.bf16_flops, m.source, False,
                                      f"best one-thread bf16 matmul x {m.cores} cores")
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
# share of its bandwidth share that it streams from DRAM (`memory_eff`), how much of the time
# spent fetching weights the compute does not hide (`serial_share`), how much of its share of
# the last-level cache holds weights across passes (`sram_usable`), the output size a matmul
# needs to reach full speed (`sat_elems`: small-batch GEMMs underuse the kernels), the fixed cost of
# one eager kernel call (`kernel_overhead_s`) and of one module forward
# (`inference_overhead_s`), the reduction length at which a matrix op reaches half speed
# (`k_half`), matmul vs conv efficiency (`matmul_factor`) and one eager dispatch per traced
# node (`node_overhead_s`). They are fitted by least squares on the log error of timed chains
# of MLP, convolution and decoder blocks (`_CHAINS`), each captured and predicted by the cost
# model itself. The chains run the way a stage runs them: layer after layer, in the layout the
# runtime places them in, weights not warm in the cache unless they all fit, and sizes span
# overhead-, memory- and compute-bound work; every measurement goes in `_ROUNDS` slices
# spread over the calibration, so that bursts of other tenants' load fall out. The
# link between two local workers (one-way latency and bandwidth of a gloo send/recv over
# loopback, and the cost of a small all-reduce in a tensor-parallel pass) is measured between
# two worker processes with a little compute between messages, as the runtime's workers talk:
# scheduling and wake-up delays of this machine are part of it. Each chain also makes one pass
# per round after `IDLE_BEFORE_REQUEST_S` idle, as a request's first pass on a quiet server;
# what that pass loses against the chain's back-to-back time grows with the chain's weights
# up to the core's share of the cache (the caches refilled after other tenants evicted them)
# from a fixed part (the core's resume): a line over the chains gives `resume_s` and
# `resume_s_per_byte`, which the planner adds to each stage of a request alone in a pipeline.

PARAMS_CACHE_VERSION = 14  # 13: fitted over the one-thread peak (host cache 2); 14: resume per byte
# (batch, width, blocks) of the timed chains; a block holds 8 x width^2 fp32 weights.
_CHAINS: tuple[tuple[str, int, int, int], ...] = (
    ("mlp", 1, 32, 2), ("mlp", 4, 64, 4), ("mlp", 1, 256, 4), ("mlp", 8, 256, 4),
    ("mlp", 128, 256, 2), ("mlp", 64, 512, 2), ("mlp", 1, 512, 8), ("mlp", 8, 512, 4),
    ("mlp", 32, 1024, 2),
    ("conv", 8, 16, 2), ("conv", 64, 16, 1), ("conv", 32, 32, 2), ("conv", 16, 64, 2),
    ("attn", 1, 128, 2), ("attn", 8, 128, 2), ("attn", 4, 256, 2),
    ("step", 1, 128, 4), ("step", 16, 256, 2),
)
_PARAM_BOUNDS: dict[str, tuple[float, float]] = {
    "matrix_eff": (0.02, 1.5), "kernel_overhead_s": (1e-7, 1e-3), "memory_eff": (0.05, 1.0),
    "serial_share": (0.01, 1.0), "sram_usable": (0.05, 2.0), "sat_elems": (1e2, 1e6),
    "k_half": (1.0, 1e3), "matmul_factor": (0.3, 2.0), "node_overhead_s": (1e-8, 1e-4),
}
_OP_BUDGET_S = 0.25  # per timed chain, over all rounds
_ROUNDS = 5  # slices of every measurement, spread over the calibration
_ATTN_SEQ = 64  # tokens per sample of the decoder-block chains
_LINK_SIZES = (16, 65536)  # elements (fp64) of the timed messages
_LINK_REPS = 128  # timed messages per size
_LINK_IDLE_MATMULS = 8  # about 3 ms of compute on the sender before each message
_COLLECTIVE_SIZE = 512  # elements (fp32) of the timed all-reduce
_COLLECTIVE_PASS = 10  # all-reduces per timed tensor-parallel pass, a little compute before each
_COLLECTIVE_PASSES = 6  # timed passes per round
_PASS_GAP_S = 5e-4  # between two passes (a decode step's sampling and bookkeeping)
# How long a device sits idle before a request reaches it, when a request's latency is
# measured (the runtime's latency probes) or its resume cost calibrated: a request to a quiet
# server finds its cores idle. On a shared host the first work after such a pause runs slower
# than the same work back to back (the core resumes from an idle state; other tenants evicted
# its caches), and more so the longer the pause, up to some tens of ms.
IDLE_BEFORE_REQUEST_S = 0.02


@dataclass(frozen=True)
class HostParams:
    """Cost-model parameters of one host core and of the link between local workers."""

    matrix_eff: float
    kernel_overhead_s: float
    inference_overhead_s: float
    memory_eff: float
    serial_share: float
    sram_usable: float
    sat_elems: float
    k_half: float
    matmul_factor: float
    node_overhead_s: float
    link_latency_s: float  # one way, one message
    link_bw: float  # bytes/s, one direction
    collective_latency_s: float  # one small all-reduce between two workers
    date: str
    resume_s: float = 0.0  # a pass after `IDLE_BEFORE_REQUEST_S` idle less one back to back
    resume_s_per_byte: float = 0.0  # ... per byte of weights the core's cache share held
    fit_error_pct: float = 0.0  # worst |predicted - measured| of the timed ops, percent
    seconds: float = 0.0

    @property
    def source(self) -> str:
        return f"measured on this host by kcloud micro-calibration {self.date}"

    def overrides(self) -> dict[str, float]:
        """The `DeviceParams` fields these measurements set."""
        return {"matrix_eff": self.matrix_eff, "kernel_overhead_s": self.kernel_overhead_s,
                "inference_overhead_s": self.inference_overhead_s,
                "memory_eff": self.memory_eff, "serial_share": self.serial_share,
                "sram_usable": self.sram_usable, "sat_elems": self.sat_elems,
                "k_half": self.k_half, "matmul_factor": self.matmul_factor,
                "node_overhead_s": self.node_overhead_s, "resume_s": self.resume_s,
                "resume_s_per_byte": self.resume_s_per_byte}


def params_cache_file() -> Path:
    """The cache file of this host's fitted parameters (beside the host measurement)."""
    path = cache_file()
    return path.with_name(path.name.replace("host-", "host-params-", 1))


def _timings(fn: Any, budget_s: float, reps_max: int = 200) -> list[float]:
    """Repeated timings of `fn()` after one untimed call (at least 3, within `budget_s`)."""
    fn()
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < reps_max and (len(times) < 3 or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _chain(kind: str, width: int, blocks: int) -> Any:
    """`blocks` blocks in a row: MLP blocks (norm -> Linear(w, 4w) -> GELU -> Linear(4w, w)),
    conv blocks (3x3 conv over `width` channels -> batch norm -> ReLU) or decoder blocks
    (causal attention with 32-wide heads, SwiGLU MLP) over `_ATTN_SEQ` tokens ("attn") or
    one token ("step")."""
    from torch import nn

    if kind in ("attn", "step"):
        from kcloud.graph.models.transformer import Block, TransformerConfig

        cfg = TransformerConfig(n_layers=blocks, hidden=width, heads=width // 32,
                                ffn=width * 8 // 3, vocab=2, max_seq_len=_ATTN_SEQ)
        return nn.Sequential(*(Block(cfg) for _ in range(blocks))).eval()
    if kind == "conv":
        return nn.Sequential(*(nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False),
                                             nn.BatchNorm2d(width), nn.ReLU())
                               for _ in range(blocks))).eval()
    return nn.Sequential(*(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 4 * width),
                                         nn.GELU(), nn.Linear(4 * width, width))
                           for _ in range(blocks)))


def _chain_input(kind: str, batch: int, width: int) -> tuple[int, ...]:
    """Input shape of a chain: features, or a feature map whose size shrinks as channels
    grow (as in a CNN: 16 channels at 32 x 32 .. 64 at 8 x 8)."""
    if kind == "conv":
        side = max(4, 512 // width)
        return (batch, width, side, side)
    if kind == "attn":
        return (batch, _ATTN_SEQ, width)
    if kind == "step":  # one token per sample: dispatch-bound, like a decode step
        return (batch, 1, width)
    return (batch, width)


def _inference_overhead() -> float:
    """The time of one module forward beyond its kernels: a module tree around one Linear."""
    import torch

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.inference_mode():
            lin = torch.nn.Linear(32, 32)
            seq = torch.nn.Sequential(lin)
            x = torch.randn(1, 32)
            wrapped = statistics.median(_timings(lambda: seq(x), _OP_BUDGET_S))
            bare = statistics.median(_timings(lambda: lin(x), _OP_BUDGET_S))
    finally:
        torch.set_num_threads(threads)
    return max(wrapped - bare, 1e-7)


def _typical(times: list[float], block: int = 8) -> float:
    """The median of means over blocks of calls: the usual cost, its tails included."""
    blocks = [sum(times[i:i + block]) / block for i in range(0, len(times) - block + 1, block)]
    return statistics.median(blocks or times)


def _calibration_worker(rank: int, world: int, port: int, out: Any) -> None:
    """One of `world` one-thread worker processes, all busy at once as a run's workers are.

    Ranks 0 and 1 time the link between them (send/recv hops and small all-reduces, a little
    compute between calls). Every rank times the chains at the same moment, so that each sees
    its share of the cache and the memory bandwidth, then one pass of each after an idle
    pause (the resume of a request's first pass). A shared host slows down in bursts (other
    tenants), so the work goes in `_ROUNDS` rounds, each a slice of every measurement: a burst
    then hits some rounds of every figure instead of all of a few, and each figure's median
    over its rounds leaves it out. Results go to `out`."""
    import torch
    import torch.distributed as dist

    from kcloud.runtime.backends import place

    torch.set_num_threads(1)
    keep_heap()
    # a core each, as the runtime pins its local workers: two workers that the OS let share
    # one core would time a hop as a context switch instead of a wake-up on the other core
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cores) >= world:
        os.sched_setaffinity(0, {cores[rank]})
    torch.manual_seed(rank)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=_dt.timedelta(seconds=60))
    try:
        pair = dist.new_group([0, 1])
        link = _LinkTimer(rank, pair) if rank < 2 else None
        with torch.inference_mode():  # in the layout the runtime runs them in
            chains = [(place(_chain(kind, width, n), torch.device("cpu")),
                       torch.randn(_chain_input(kind, b, width)))
                      for kind, b, width, n in _CHAINS]
            times: list[list[float]] = [[] for _ in chains]
            after_idle: list[list[float]] = [[] for _ in chains]
            for _ in range(_ROUNDS):
                if link is not None:
                    link.round()
                for (chain, x), acc, cold in zip(chains, times, after_idle, strict=True):
                    dist.barrier()
                    acc += _timings(lambda chain=chain, x=x: chain(x), _OP_BUDGET_S / _ROUNDS)
                    time.sleep(IDLE_BEFORE_REQUEST_S)  # then a pass as a request's first
                    t0 = time.perf_counter()
                    chain(x)
                    cold.append(time.perf_counter() - t0)
        # the median, as the runtime reports stage times (a lower quartile would make the
        # model optimistic on a noisy host)
        hot = [statistics.median(t) for t in times]
        result: dict[str, Any] = {
            "rank": rank, "chains": hot,
            # what a pass after the pause loses, per chain (the median over rounds), beside
            # the chain's weight bytes: a resume, then a refill of what the cache held
            "resume": [(float(sum(p.numel() * p.element_size() for p in chain.parameters())),
                        statistics.median(cs) - h)
                       for (chain, _), h, cs in zip(chains, hot, after_idle, strict=True)]}
        if link is not None:
            result.update(link.figures())
        out.put(result)
    finally:
        dist.destroy_process_group()


class _LinkTimer:
    """Times the link between ranks 0 and 1 as the runtime uses it, a slice per round.

    Messages go as the runtime sends a stage's outputs (one frame per hop, the receive posted
    ahead), and between them the sender computes for a while, as a stage does, so that the
    receiver waits idle: its wake-up is part of the cost. The receiver's first work after the
    wait runs slower than the same work back to back (a core resuming from idle), so a hop is
    counted up to the end of that work, less its back-to-back time."""

    def __init__(self, rank: int, pair: Any) -> None:
        import torch

        from kcloud.runtime.comm import TupleReceiver, TupleSender

        self.rank, self.pair = rank, pair
        self.a, self.w = torch.randn(32, 512), torch.randn(512, 1024)
        self.shard_a, self.shard_w = torch.randn(8, 512), torch.randn(512, 256)
        self.sender, self.receiver = TupleSender(1 - rank), TupleReceiver(1 - rank)
        self.work: list[float] = []  # the receiver's work back to back, timed in every round
        self.hops: dict[int, list[float]] = {n: [] for n in _LINK_SIZES}  # by message size
        self.allreduce: list[float] = []  # in passes of `_COLLECTIVE_PASS`

    def round(self) -> None:
        import torch
        import torch.distributed as dist

        reps = _LINK_REPS // _ROUNDS + 2  # the first two of each slice are not timed
        self.work += _timings(lambda: self.a @ self.w, 0.01, reps_max=8)
        for size in _LINK_SIZES:
            buf = torch.zeros(size, dtype=torch.float64)
            for i in range(reps):
                if self.rank == i % 2:  # sender: compute, stamp, send
                    for _ in range(_LINK_IDLE_MATMULS):
                        self.a @ self.w
                    buf[0] = time.perf_counter()
                    self.sender.send((buf,))
                    self.sender.wait()
                else:
                    (got,) = self.receiver.recv(ahead=i + 1 < reps)
                    self.a @ self.w
                    if i >= 2:  # one host, one monotonic clock; the work is taken off below
                        self.hops[size].append(time.perf_counter() - float(got[0]))
        # All-reduces as a tensor-parallel stage pays them: a pass makes one after each
        # layer's shard of work, then the next pass starts after a pause. The first of a pass
        # (the ranks arrive apart) and the tails are part of what a request pays.
        x = torch.zeros(_COLLECTIVE_SIZE)
        for _ in range(_COLLECTIVE_PASSES):
            for _ in range(_COLLECTIVE_PASS):
                self.shard_a @ self.shard_w
                t0 = time.perf_counter()
                dist.all_reduce(x, group=self.pair)
                self.allreduce.append(time.perf_counter() - t0)
            time.sleep(_PASS_GAP_S)

    def figures(self) -> dict[str, float]:
        # A small gloo all-reduce on a shared host can take either a few tenths of a ms or
        # about 4 ms, a third of the calls or more the latter (a plain socket ping-pong between
        # the same processes does not); a tensor-parallel stage pays dozens in a row, so their
        # cost is the mean over a pass (the median over passes: a burst of other tenants does
        # not set it).
        work = statistics.median(self.work)
        out = {f"p2p{n}": _typical(v) - work for n, v in self.hops.items()}
        out["allreduce"] = _typical(self.allreduce, _COLLECTIVE_PASS)
        return out


def _measure_workers() -> tuple[list[float], dict[str, float]]:
    """Chain times (the median over workers) and the `HostParams` figures measured rather
    than fitted (the link's one-way latency and bandwidth, a small all-reduce, the resume
    after idle), from one worker process per core (2 to 8)."""
    import socket

    import torch.multiprocessing as mp

    world = max(2, min(host_cores(), 8))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_calibration_worker, args=(r, world, port, out), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    results: list[dict[str, Any]] = []
    deadline = time.monotonic() + 180.0
    try:
        while len(results) < world and time.monotonic() < deadline:
            try:
                results.append(out.get(timeout=0.5))
            except queue_mod.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    break
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if len(results) < world:
        raise CatalogError("the host micro-calibration's worker processes did not finish",
                           "check that processes may start and open loopback TCP ports")
    chains = [statistics.median(r["chains"][i] for r in results) for i in range(len(_CHAINS))]
    pair = [r for r in results if r["rank"] < 2]
    small, large = (statistics.mean(r[f"p2p{size}"] for r in pair) for size in _LINK_SIZES)
    extra = (_LINK_SIZES[1] - _LINK_SIZES[0]) * 8.0
    copy_bw = measure_host().memory_bw / 2.0  # no link is faster than a memory copy
    bw = extra / (large - small) if large > small else copy_bw
    return chains, {
        "link_latency_s": max(small, 1e-7), "link_bw": min(bw, copy_bw),
        "collective_latency_s": max(pair[0]["allreduce"], small),  # timed on both ranks at once
        **_resume_line([point for r in results for point in r["resume"]])}


def _resume_line(points: list[tuple[float, float]]) -> dict[str, float]:
    """`resume_s` and `resume_s_per_byte` from (weight bytes, seconds lost after an idle
    pause) of the timed chains on every worker: the least-squares line, both non-negative, over
    the weights a core's share of the cache holds (beyond it a chain streams them on every
    pass, after a pause or not). The chains span a few KB to about a quarter of that share."""
    import numpy as np
    from scipy.optimize import nnls

    share = cache_share_bytes()
    x = np.array([min(b, share) for b, _ in points])
    y = np.array([e for _, e in points])
    scale = max(float(x.max()), 1.0)
    (fixed, slope), _ = nnls(np.column_stack([np.ones_like(x), x / scale]), y)
    return {"resume_s": float(fixed), "resume_s_per_byte": float(slope) / scale}


def _fit(shapes: list[tuple[str, int, int, int]], measured: list[float],
         inference_s: float) -> tuple[dict[str, float], float]:
    import math

    import numpy as np
    import torch
    from scipy.optimize import least_squares

    from kcloud.graph.capture import capture
    from kcloud.hardware.cost import CLASS_PRIORS, forward_cost

    device = host_core_device(1)
    base = dataclasses.replace(CLASS_PRIORS[DeviceKind.CPU], inference_overhead_s=0.0)
    graphs = []
    for kind, b, w, n in shapes:
        with torch.device("meta"):
            chain, x = _chain(kind, w, n), torch.empty(_chain_input(kind, b, w))
        graphs.append(capture(chain, (x,), name="host-calibration", batch=b))
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
    measured, figures = _measure_workers()
    fitted, worst = _fit(list(_CHAINS), measured, _inference_overhead())
    return HostParams(**fitted, **figures, date=_dt.date.today().isoformat(),
                      fit_error_pct=round(worst, 2),
                      seconds=round(time.perf_counter() - start, 3))


_PARAMS_MEMO: dict[str, HostParams] = {}


def measure_host_params(force: bool = False) -> HostParams:
    """This host's fitted single-core cost parameters and local link figures.

    Cached beside the host measurement (same key: CPU model, core count, torch version);
    `force=True` measures again and rewrites the cache.
    """
    return _cached(params_cache_file(), PARAMS_CACHE_VERSION, HostParams, _PARAMS_MEMO, force,
                   _run_param_calibration)


def cached_host() -> tuple[HostMeasurement | None, HostParams | None]:
    """What this host's cache holds now (None where it holds nothing valid); measures nothing."""
    import torch

    key = _cache_key(cpu_model(), host_cores(), torch.__version__)
    return (_read_cache(cache_file(), key, CACHE_VERSION, HostMeasurement),
            _read_cache(params_cache_file(), key, PARAMS_CACHE_VERSION, HostParams))


def remeasure_host() -> tuple[HostMeasurement, HostParams]:
    """Measure this host again and rewrite its cache: the micro-benchmark first, then the
    micro-calibration, which fits the core's parameters against the new peak. A host's speed
    can drift (other tenants of a VM's host, its clock), so a cached figure ages."""
    bench = measure_host(force=True)
    return bench, measure_host_params(force=True)


def host_link() -> tuple[float, float, float]:
    """(bandwidth bytes/s, one-way latency s, small all-reduce latency s) of the link between
    two local workers."""
    hp = measure_host_params()
    return hp.link_bw, hp.link_latency_s, hp.collective_latency_s


def _host_overrides() -> tuple[dict[str, float], str]:
    hp = measure_host_params()
    return hp.overrides(), hp.source


def _register() -> None:
    from kcloud.hardware.cost import register_measured_params

    register_measured_params(HOST_ID, _host_overrides)


# -- the engine's own step costs on this host -------------------------------------------------
#
# A step of the engine's CPU workers (`kcloud.runtime.engine`) costs more than the cost model's
# kernels of that step: the engine schedules it and sends it to the workers (a pickled command
# over a process queue, the result back), a worker lays out its rows (positions and KV slots of
# every row, the packed decode batch), gathers each row's keys and values from the paged cache,
# and samples. Those are measured by the runtime (`kcloud.runtime.step_costs`) on this host as
# a few constants per step, per row and per byte of KV cache a step reads or
# writes, and kept here beside the host's other measurements.

ENGINE_COSTS_VERSION = 4  # 2: KV reads padded per attention group; 3: past the cache;
# 4: the prompt chunks' constants signed


@dataclass(frozen=True)
class EngineStepCosts:
    """Seconds a step of the engine's CPU workers takes beyond its kernels' modeled time."""

    step_s: float  # per step: scheduling, the command and its result between processes
    row_s: float  # per row (sequence) of the step: its layout, its sampled token
    kv_byte_s: float  # per byte of KV cache the decode rows read, padded in their groups
    # per byte of KV cache the prompt chunks write, and per (query, key) pair of a chunk per
    # KV byte of a token: signed, since they also correct the modeled kernels of a chunk
    prefill_byte_s: float
    pair_byte_s: float
    date: str
    steps: int  # timed steps the constants were fitted on
    load_avg: float  # the host's 1-minute load average while they were timed
    fit_error_pct: float = 0.0  # median |fitted - measured| of a step, percent
    group_s: float = 0.0  # per attention group of decode rows (`scheduling.decode_groups`)
    # per byte of those KV reads past a core's share of the last-level cache (`cache_bytes`):
    # a worker whose sequences' KV outgrows it streams the rest from DRAM every step
    spill_byte_s: float = 0.0
    cache_bytes: float = 0.0

    @property
    def source(self) -> str:
        return (f"measured on this host by kcloud's engine step calibration {self.date} "
                f"({self.steps} steps, load average {self.load_avg:.1f})")

    def extra_s(self, rows: int, kv_tokens: float, prefill_tokens: int, pairs: float,
                kv_bytes_per_token: float, groups: int = 0) -> float:
        """A step's extra seconds: `kv_tokens` are its decode rows' KV tokens as their groups
        read them, padded (`kcloud.planner.scheduling.StepPlan.decode_padding`)."""
        read = kv_bytes_per_token * kv_tokens
        return (self.step_s + self.row_s * rows + self.group_s * groups
                + self.spill_byte_s * max(0.0, read - self.cache_bytes)
                + kv_bytes_per_token * (self.kv_byte_s * kv_tokens
                                        + self.prefill_byte_s * prefill_tokens
                                        + self.pair_byte_s * pairs))


def _measured_file(kind: str, version: int) -> Path:
    """The cache file of a measurement of this host (`kind`, format `version`)."""
    path = cache_file()
    return path.with_name(path.name.replace("host-", f"host-{kind}{version}-", 1))


def _load_measured(kind: str, version: int, cls: type[T]) -> T | None:
    """A measurement of this host (its CPU, cores and torch), None until one was saved."""
    import torch

    key = _cache_key(cpu_model(), host_cores(), torch.__version__)
    return _read_cache(_measured_file(kind, version), key, version, cls)


def _save_measured(kind: str, version: int, value: Any) -> Path:
    import torch

    path = _measured_file(kind, version)
    _write_cache(path, _cache_key(cpu_model(), host_cores(), torch.__version__), version, value)
    return path


def engine_costs_file() -> Path:
    return _measured_file("engine", ENGINE_COSTS_VERSION)


def engine_step_costs() -> EngineStepCosts | None:
    """This host's measured engine step costs, None until the runtime has measured them."""
    return _load_measured("engine", ENGINE_COSTS_VERSION, EngineStepCosts)


def save_engine_step_costs(costs: EngineStepCosts) -> Path:
    return _save_measured("engine", ENGINE_COSTS_VERSION, costs)


FRONT_END_VERSION = 2  # 2: per delivery


@dataclass(frozen=True)
class FrontEndCosts:
    """What `kcloud serve`'s HTTP front end costs on this host beside its engine, as
    `kcloud.sim.front_end` measured it (probes of a running server): a request's admission by
    its event loop, the CPU of the server's event loop and of a streaming client on the same
    host per token streamed and per step's delivery, and a lone request's way in and out. The
    simulator's `Service` takes it (`front_end`)."""

    request_s: float  # the event loop's time to admit a request (HTTP, validation, hand-off)
    prompt_token_s: float  # and per token of its prompt (sent, parsed, validated)
    token_s: float  # CPU per token streamed (its server-sent event, sent and read)
    delivery_s: float  # CPU per delivery of a step's events (a wake-up of the event loop)
    latency_s: float  # a lone request's way in and its first token's way out, unqueued
    cores: int  # the host's cores the front end, the client and the engine's workers share
    date: str
    probes: int  # probe runs measured
    load_avg: float  # the host's 1-minute load average while they ran
    fit_error_pct: float = 0.0  # the CPU fit's median error over the probe runs, percent

    def admit_s(self, prompt_tokens: int) -> float:
        """A request's admission: the front end's CPU for it and its prompt (one at a time)."""
        return self.request_s + self.prompt_token_s * prompt_tokens

    @property
    def source(self) -> str:
        return (f"measured on this host by kcloud's front-end probes {self.date} "
                f"({self.probes} probe runs, load average {self.load_avg:.1f})")


def front_end_file() -> Path:
    return _measured_file("frontend", FRONT_END_VERSION)


def front_end_costs() -> FrontEndCosts | None:
    """This host's measured front-end costs, None until `kcloud sim front-end` measured them."""
    return _load_measured("frontend", FRONT_END_VERSION, FrontEndCosts)


def save_front_end_costs(costs: FrontEndCosts) -> Path:
    return _save_measured("frontend", FRONT_END_VERSION, costs)


_register()

__all__ = [
    "HOST_ID",
    "EngineStepCosts",
    "FrontEndCosts",
    "HostMeasurement",
    "HostParams",
    "cache_dir",
    "cache_file",
    "cached_host",
    "cpu_model",
    "engine_costs_file",
    "engine_step_costs",
    "front_end_costs",
    "front_end_file",
    "host_core_device",
    "host_cores",
    "host_device",
    "host_link",
    "host_memory",
    "measure_host",
    "measure_host_params",
    "params_cache_file",
    "remeasure_host",
    "reset_host_cache",
    "save_engine_step_costs",
    "save_front_end_costs",
]
