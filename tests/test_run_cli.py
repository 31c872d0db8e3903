"""`kcloud run --model M --cluster C`: plan and run in one step; bad input is one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def _kcloud(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from kcloud.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=120, cwd=cwd)


def test_plan_and_run_in_one_step(tmp_path: Path) -> None:
    trace = tmp_path / "t.json"
    proc = _kcloud(["run", "--model", "mlp", "--cluster", "local-cpu", "--objective",
                    "latency", "--precision", "fp32", "--batch", "2", "--batches", "2",
                    "--mode", "real", "--trace", str(trace), "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    d = json.loads(lines[0])
    assert d["reference_ok"] is True and d["max_abs_error"] < 1e-4
    assert set(d["measured"]) >= {"latency_s", "throughput"}
    assert set(d["predicted"]) >= {"latency_s", "throughput"}
    assert d["trace_file"] == str(trace) and trace.is_file()
    assert d["plan"]["model"] == "mlp" and d["plan"]["goal"]["objective"] == "latency"
    assert d["search_time_s"] >= 0 and d["kernel_s"] >= 0  # the kernel's load, apart


@pytest.mark.parametrize(("args", "says"), [
    (["run"], "nothing to run"),
    (["run", "--model", "mlp"], "--model needs --cluster"),
    (["run", "plan.json", "--model", "mlp", "--cluster", "local-cpu"], "not both"),
    (["run", "--model", "mlp", "--cluster", "local-cpu", "--objective", "fast"],
     "unknown objective"),
    (["run", "--model", "mlp", "--cluster", "local-cpu", "--slo-ms", "-1"], "SLO"),
    (["run", "--model", "mlp", "--cluster", "nowhere"], "unknown cluster"),
    (["run", "--model", "mlp", "--cluster", "local-cpu", "--mode", "fake"], "unknown mode"),
    (["run", "--model", "tiny-gpt", "--cluster", "local-cpu", "--input-tokens", "200",
      "--output-tokens", "100"], "exceed the context of tiny-gpt"),
    (["run", "--model", "mlp", "--cluster", "local-cpu", "--probes", "-1", "--mode", "real"],
     "--probes must be 0 or more"),
])
def test_bad_input_is_one_line(args: list[str], says: str, tmp_path: Path) -> None:
    proc = _kcloud(args, tmp_path)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert err.count("\n") == 0 and says in err
