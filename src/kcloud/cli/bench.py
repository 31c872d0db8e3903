"""`kcloud bench serve`: how fast does a running OpenAI-compatible server answer a load?"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from kcloud.cli import app
from kcloud.cli._common import console, emit_json
from kcloud.errors import KCloudError

bench_app = typer.Typer(
    name="bench",
    help="Measure a running service under load.",
    no_args_is_help=True,
)


def _token_range(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split(":"))
    except ValueError:
        raise KCloudError(f"--token-ids '{text}' is not LOW:HIGH",
                          "pass e.g. --token-ids 5:256 (ids drawn in [LOW, HIGH))") from None
    if not 0 <= lo < hi:
        raise KCloudError(f"--token-ids {text} is an empty range", "pass LOW:HIGH with LOW < HIGH")
    return lo, hi


@bench_app.command("serve")
def serve(
    url: Annotated[str, typer.Option(help="Server root, e.g. http://127.0.0.1:8000")],
    model: Annotated[str, typer.Option("--model", "-m", help="Served model name")],
    trace: Annotated[Path | None, typer.Option(
        help="Replay a trace CSV (arrived_at, num_prefill_tokens, num_decode_tokens)")] = None,
    rate: Annotated[float | None, typer.Option(
        help="Poisson arrivals per second (default inf: all at once)")] = None,
    requests: Annotated[int | None, typer.Option(
        help="Requests to send (default 100; with --trace: its first N rows)")] = None,
    input_tokens: Annotated[int | None, typer.Option(help="Prompt tokens (default 128)")] = None,
    output_tokens: Annotated[int | None, typer.Option(
        help="Generated tokens per request (default 64)")] = None,
    concurrency: Annotated[int | None, typer.Option(
        help="At most this many requests in flight (default: no cap)")] = None,
    speedup: Annotated[float, typer.Option(help="Replay the trace this many times faster")] =
        1.0,
    slo_ttft_ms: Annotated[float | None, typer.Option(help="Goodput SLO: TTFT at most")] = None,
    slo_tpot_ms: Annotated[float | None, typer.Option(help="Goodput SLO: TPOT at most")] = None,
    seed: Annotated[int, typer.Option(help="Seed of arrivals and prompt token ids")] = 0,
    timeout: Annotated[float, typer.Option(help="Seconds one request may take")] = 600.0,
    token_ids: Annotated[str, typer.Option(
        help="Prompt token ids are drawn from LOW:HIGH")] = "5:256",
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout")] = False,
) -> None:
    """Load an OpenAI-compatible server with streamed completions and report TTFT, TPOT,
    end-to-end latency, throughput, goodput and errors (measured)."""
    from kcloud.serve.bench import load_trace, poisson_requests, run_bench

    for name, v in (("--requests", requests), ("--input-tokens", input_tokens),
                    ("--output-tokens", output_tokens), ("--concurrency", concurrency)):
        if v is not None and v < 1:
            raise KCloudError(f"{name} must be a positive integer, got {v}",
                              f"pass {name} 1 or more")
    for name, f in (("--rate", rate), ("--speedup", speedup), ("--slo-ttft-ms", slo_ttft_ms),
                    ("--slo-tpot-ms", slo_tpot_ms), ("--timeout", timeout)):
        if f is not None and not f > 0:
            raise KCloudError(f"{name} must be positive, got {f}")
    ids = _token_range(token_ids)
    if trace is not None:
        given = [n for n, v in (("--rate", rate), ("--input-tokens", input_tokens),
                                ("--output-tokens", output_tokens)) if v is not None]
        if given:
            raise KCloudError(f"{', '.join(given)} cannot be used with --trace",
                              "a trace gives arrival times and lengths itself")
        specs = load_trace(trace, limit=requests, speedup=speedup)
        source = (f"trace {trace.name} ({len(specs)} requests"
                  + (f", {speedup:g}x faster" if speedup != 1 else "") + ")")
    else:
        if speedup != 1.0:
            raise KCloudError("--speedup applies to --trace only",
                              "use --rate to set the arrival rate")
        r = math.inf if rate is None else rate
        specs = poisson_requests(requests or 100, r, input_tokens or 128, output_tokens or 64,
                                 seed=seed)
        source = (f"{len(specs)} requests, {specs[0].input_tokens} in / "
                  f"{specs[0].output_tokens} out tokens, "
                  + ("all at once" if math.isinf(r) else f"Poisson {r:g}/s, seed {seed}"))
    result = run_bench(url, model, specs, progress=True, concurrency=concurrency, seed=seed,
                       slo_ttft_s=None if slo_ttft_ms is None else slo_ttft_ms / 1e3,
                       slo_tpot_s=None if slo_tpot_ms is None else slo_tpot_ms / 1e3,
                       timeout_s=timeout, token_ids=ids, source=source)
    s = result.summary()
    if as_json:
        emit_json(s)
        return
    print_summary(s)


def _ms(p: dict[str, float | None]) -> str:
    return " / ".join("-" if p[k] is None else f"{p[k] * 1e3:,.1f}" for k in ("p50", "p90", "p99"))


def print_summary(s: dict[str, Any]) -> None:
    cap = "no cap" if s["concurrency"] is None else str(s["concurrency"])
    t = Table(title=f"bench serve {s['model']} at {s['url']} (measured)", show_header=True,
              header_style="bold")
    t.add_column("quantity")
    t.add_column("value", justify="right")
    t.add_row("load", s["source"])
    t.add_row("concurrency", cap)
    t.add_row("requests / completed / errors",
              f"{s['requests']} / {s['completed']} / {s['errors']}")
    t.add_row("duration", f"{s['duration_s']:,.2f} s")
    t.add_row("request throughput", f"{s['requests_per_s']:,.2f} req/s")
    t.add_row("output token throughput", f"{s['throughput_tok_s']:,.1f} tok/s")
    t.add_row("TTFT p50 / p90 / p99", f"{_ms(s['ttft_s'])} ms")
    t.add_row("TPOT p50 / p90 / p99", f"{_ms(s['tpot_s'])} ms")
    t.add_row("E2E p50 / p90 / p99", f"{_ms(s['e2e_s'])} ms")
    slo = s["slo"]
    if s["goodput"] is None:
        t.add_row("goodput", "no SLO given (--slo-ttft-ms, --slo-tpot-ms)")
    else:
        parts = [f"TTFT <= {slo['ttft_ms']:g} ms" if slo["ttft_ms"] is not None else "",
                 f"TPOT <= {slo['tpot_ms']:g} ms" if slo["tpot_ms"] is not None else ""]
        t.add_row(f"goodput ({', '.join(p for p in parts if p)})",
                  f"{s['goodput']:,.2f} req/s ({s['goodput_fraction']:.0%} of requests)")
    if s["short_outputs"]:
        t.add_row("shorter outputs than asked", str(s["short_outputs"]))
    for kind, n in s["errors_by_kind"].items():
        t.add_row(f"errors: {kind}", str(n))
    console.print(t)


app.add_typer(bench_app, name="bench")
