"""`kcloud bench serve` against real OpenAI-compatible HTTP servers on 127.0.0.1.

A paced server streams a known number of tokens with known delays (so that the measured TTFT,
TPOT and end-to-end times have known lower bounds), records when each request arrived and what
it asked for, and fails chosen requests with 429, 500 or an error event in the stream. A second
server is the benchmark's naive `transformers` baseline over a tiny Llama directory.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from kcloud.cli import main
from kcloud.errors import KCloudError
from kcloud.serve.bench import load_trace, poisson_requests, run_bench

REPO = Path(__file__).resolve().parents[1]


def _shared_traces() -> Path | None:
    for root in (os.environ.get("KCLOUD_SHARED_DIR"), REPO.parent / "shared"):
        if root and (Path(root) / "traces").is_dir():
            return Path(root) / "traces"
    return None


@dataclass
class Paced:
    """What the paced server does and what it saw."""

    ttft_s: float = 0.05
    token_s: float = 0.01
    slow_ttft_s: float | None = None  # odd-numbered requests wait this long instead
    fail: dict[int, str] = field(default_factory=dict)  # request number -> 429|500|stream
    seen: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0


def _paced_app(p: Paced) -> FastAPI:
    app = FastAPI()
    lock = threading.Lock()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "paced", "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await request.json()
        with lock:
            n = len(p.seen)
            p.seen.append((time.perf_counter(), body))
        kind = p.fail.get(n)
        if kind in ("429", "500"):
            return JSONResponse(status_code=int(kind), content={"error": {
                "message": f"refused request {n}", "type": "test", "param": None,
                "code": None}})
        wait = p.slow_ttft_s if p.slow_ttft_s is not None and n % 2 else p.ttft_s

        async def events():
            p.in_flight += 1
            p.max_in_flight = max(p.max_in_flight, p.in_flight)
            try:
                # The headers are out before the first token: TTFT counts the wait below.
                yield ": started\n\n"
                await asyncio.sleep(wait)
                for i in range(body["max_tokens"]):
                    if i:
                        await asyncio.sleep(p.token_s)
                    if kind == "stream" and i == 2:
                        yield 'data: {"error": {"message": "worker died"}}\n\n'
                        return
                    yield "data: " + json.dumps({"choices": [{"index": 0, "text": f"t{i}",
                                                              "finish_reason": None}]}) + "\n\n"
                yield "data: " + json.dumps({"choices": [], "usage": {
                    "prompt_tokens": len(body["prompt"]),
                    "completion_tokens": body["max_tokens"]}}) + "\n\n"
                yield "data: [DONE]\n\n"
            finally:
                p.in_flight -= 1

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def _serve(app: FastAPI) -> Iterator[str]:
    """Run `app` with uvicorn in a thread on a free 127.0.0.1 port; yield its URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture
def paced() -> Iterator[tuple[str, Paced]]:
    p = Paced()
    for url in _serve(_paced_app(p)):
        yield url, p


def test_counts_percentiles_and_the_requests_sent(paced: tuple[str, Paced]) -> None:
    url, p = paced
    p.ttft_s, p.token_s = 0.08, 0.02
    specs = poisson_requests(12, float("inf"), 16, 6, seed=3)
    s = run_bench(url, "paced", specs, concurrency=4, seed=3).summary()
    assert (s["requests"], s["completed"], s["errors"]) == (12, 12, 0)
    assert s["output_tokens"] == 12 * 6 and s["short_outputs"] == 0
    for key in ("ttft_s", "tpot_s", "e2e_s"):
        q = s[key]
        assert q["p50"] <= q["p90"] <= q["p99"], key
    # Lower bounds are the server's own sleeps; upper bounds leave room for a loaded machine.
    assert 0.08 <= s["ttft_s"]["p50"] < 0.08 + 1.0
    assert 0.02 <= s["tpot_s"]["p50"] < 0.02 + 0.5
    assert s["e2e_s"]["p50"] >= 0.08 + 5 * 0.02
    assert s["e2e_s"]["p50"] >= s["ttft_s"]["p50"]
    # Three waves of four: the run cannot be shorter than three requests back to back.
    assert s["duration_s"] >= 3 * (0.08 + 5 * 0.02)
    assert s["throughput_tok_s"] == pytest.approx(72 / s["duration_s"])
    assert s["requests_per_s"] == pytest.approx(12 / s["duration_s"])
    assert s["goodput"] is None and s["figures"] == "measured"
    assert p.max_in_flight == 4
    bodies = [b for _, b in p.seen]
    assert len(bodies) == 12
    for b in bodies:
        assert b["model"] == "paced" and b["stream"] is True
        assert b["stream_options"] == {"include_usage": True}
        assert b["max_tokens"] == b["min_tokens"] == 6 and b["ignore_eos"] is True
        assert len(b["prompt"]) == 16 and all(5 <= t < 256 for t in b["prompt"])
    assert len({tuple(b["prompt"]) for b in bodies}) == 12  # no two prompts alike


def test_trace_is_replayed_at_its_arrival_times(paced: tuple[str, Paced],
                                                tmp_path: Path) -> None:
    url, p = paced
    p.ttft_s, p.token_s = 0.0, 0.0
    trace = tmp_path / "t.csv"
    rows = [(10.0, 40, 3), (10.4, 12, 5), (11.0, 7, 2), (11.2, 30, 4), (12.0, 9, 1)]
    trace.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n"
                     + "".join(f"{a},{i},{o}\n" for a, i, o in rows))
    specs = load_trace(trace, speedup=2.0)
    assert [s.at_s for s in specs] == pytest.approx([0.0, 0.2, 0.5, 0.6, 1.0])
    result = run_bench(url, "paced", specs)
    s = result.summary()
    assert s["completed"] == 5 and s["output_tokens"] == 3 + 5 + 2 + 4 + 1
    t0 = result.clock_origin  # the server runs in this process: one perf_counter clock
    got = sorted((t - t0, len(b["prompt"]), b["max_tokens"]) for t, b in p.seen)
    for (at, n_in, n_out), (arrived, prompt, max_tokens) in zip(
            [((a - 10.0) / 2, i, o) for a, i, o in rows], got, strict=True):
        assert (prompt, max_tokens) == (n_in, n_out)
        assert at <= arrived <= at + 0.5
    assert s["duration_s"] >= 1.0


def test_trace_excerpt_of_the_azure_trace() -> None:
    traces = _shared_traces()
    if traces is None:
        pytest.skip("the shared traces folder (../shared/traces) is not beside this checkout")
    path = traces / "azure-llm-2023-conversation.csv"
    lines = path.read_text().splitlines()[1:6]
    specs = load_trace(path, limit=5, speedup=4.0)
    first = float(lines[0].split(",")[0])
    for spec, line in zip(specs, lines, strict=True):
        at, n_in, n_out = line.split(",")
        assert spec.at_s == pytest.approx((float(at) - first) / 4.0)
        assert (spec.input_tokens, spec.output_tokens) == (int(n_in), int(n_out))


def test_errors_are_counted_by_kind(paced: tuple[str, Paced]) -> None:
    url, p = paced
    p.ttft_s, p.token_s = 0.0, 0.0
    p.fail = {0: "429", 5: "429", 10: "429", 7: "500", 14: "500", 3: "stream"}
    s = run_bench(url, "paced", poisson_requests(20, float("inf"), 4, 4), concurrency=1,
                  ).summary()
    assert s["requests"] == 20 and s["errors"] == 6 and s["completed"] == 14
    assert s["errors_by_kind"] == {"http_429": 3, "http_500": 2, "stream_error": 1}
    assert s["output_tokens"] == 14 * 4  # failed requests add no tokens


def test_goodput_counts_the_requests_within_the_slo(paced: tuple[str, Paced]) -> None:
    url, p = paced
    p.ttft_s, p.slow_ttft_s, p.token_s = 0.0, 0.6, 0.0
    s = run_bench(url, "paced", poisson_requests(8, float("inf"), 4, 2), concurrency=8,
                  slo_ttft_s=0.45).summary()
    # The odd-numbered half waits 0.6 s for its first token, past the 0.45 s SLO.
    assert s["goodput_fraction"] == pytest.approx(0.5)
    assert s["goodput"] == pytest.approx(4 / s["duration_s"])
    assert s["slo"] == {"ttft_ms": 450.0, "tpot_ms": None}


def test_poisson_arrivals_follow_the_seeded_schedule(paced: tuple[str, Paced]) -> None:
    url, p = paced
    p.ttft_s, p.token_s = 0.0, 0.0
    specs = poisson_requests(30, 40.0, 8, 2, seed=11)
    assert specs == poisson_requests(30, 40.0, 8, 2, seed=11)
    gaps = [b.at_s - a.at_s for a, b in itertools.pairwise(specs)]
    assert all(g >= 0 for g in gaps) and 1 / 80 < sum(gaps) / len(gaps) < 1 / 20
    result = run_bench(url, "paced", specs, seed=11)
    for r in result.records:
        assert r.ok and r.scheduled_s - 0.001 <= r.sent_s <= r.scheduled_s + 0.5


def test_cli_json_is_one_object(paced: tuple[str, Paced], capsys: pytest.CaptureFixture) -> None:
    url, p = paced
    p.ttft_s, p.token_s = 0.01, 0.0
    main(["bench", "serve", "--url", url + "/v1", "--model", "paced", "--requests", "6",
          "--input-tokens", "8", "--output-tokens", "3", "--concurrency", "2",
          "--slo-ttft-ms", "5000", "--slo-tpot-ms", "5000", "--json"])
    out = json.loads(capsys.readouterr().out)  # the whole of stdout is one JSON object
    assert {"requests", "completed", "errors", "throughput_tok_s", "ttft_s", "tpot_s", "e2e_s",
            "goodput", "requests_per_s", "errors_by_kind", "figures"} <= set(out)
    assert (out["requests"], out["completed"], out["errors"]) == (6, 6, 0)
    assert set(out["ttft_s"]) == {"p50", "p90", "p99"} and out["figures"] == "measured"
    assert out["goodput"] == pytest.approx(out["requests_per_s"])


def test_cli_table(paced: tuple[str, Paced], capsys: pytest.CaptureFixture) -> None:
    url, _ = paced
    main(["bench", "serve", "--url", url, "--model", "paced", "--requests", "3",
          "--input-tokens", "4", "--output-tokens", "2"])
    out = capsys.readouterr().out
    assert "(measured)" in out and "3 / 3 / 0" in out and "TTFT p50 / p90 / p99" in out


@pytest.mark.parametrize(("args", "message"), [
    (["--trace", "missing.csv"], "trace file missing.csv not found"),
    (["--trace", "TRACE", "--rate", "2"], "--rate cannot be used with --trace"),
    (["--speedup", "2"], "--speedup applies to --trace only"),
    (["--requests", "0"], "--requests must be a positive integer"),
    (["--rate", "-1"], "--rate must be positive"),
    (["--token-ids", "9"], "--token-ids '9' is not LOW:HIGH"),
    (["--model", "nope"], "model 'nope' is not served"),
])
def test_cli_bad_input_is_one_line(paced: tuple[str, Paced], tmp_path: Path,
                                   capsys: pytest.CaptureFixture, args: list[str],
                                   message: str) -> None:
    url, _ = paced
    trace = tmp_path / "t.csv"
    trace.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0,4,2\n")
    argv = ["bench", "serve", "--url", url, "--model", "paced",
            *[str(trace) if a == "TRACE" else a for a in args]]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_unreachable_server_and_bad_trace(tmp_path: Path) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    with pytest.raises(KCloudError, match="cannot reach"):
        run_bench(f"http://127.0.0.1:{port}", "m", poisson_requests(1, 1.0, 1, 1))
    bad = tmp_path / "bad.csv"
    bad.write_text("arrived_at,num_prefill_tokens\n0,3\n")
    with pytest.raises(KCloudError, match="lacks the column"):
        load_trace(bad)
    bad.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0,3,x\n")
    with pytest.raises(KCloudError, match="line 2"):
        load_trace(bad)


def _naive_serve_module() -> Any:
    spec = importlib.util.spec_from_file_location("naive_serve",
                                                  REPO / "benchmarks" / "naive_serve.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["naive_serve"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("mode", ["sequential", "static"])
def test_against_the_naive_transformers_server(tmp_path: Path, mode: str) -> None:
    from kcloud.graph.hf import write_tiny_llama

    model_dir = write_tiny_llama(tmp_path / "tiny-llama")
    app = _naive_serve_module().make_app(str(model_dir), mode=mode, batch=4, wait_s=0.2,
                                         served_name="tiny")
    for url in _serve(app):
        s = run_bench(url, "tiny", poisson_requests(8, float("inf"), 20, 12, seed=1),
                      concurrency=4, token_ids=(5, 300)).summary()
    # ignore_eos / min_tokens hold every output at the asked length.
    assert (s["completed"], s["errors"], s["output_tokens"]) == (8, 0, 8 * 12)
    assert s["short_outputs"] == 0
    assert 0 < s["ttft_s"]["p50"] <= s["e2e_s"]["p50"] and s["tpot_s"]["p50"] > 0
