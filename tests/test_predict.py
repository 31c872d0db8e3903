"""Single-device prediction and calibration on the zoo and the catalog."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kcloud import calibrate
from kcloud.hardware.catalog import get_device
from kcloud.predict import predict


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kcloud.cli", *args], capture_output=True,
                          text=True, timeout=300)


def test_shipped_calibration_meets_every_published_row_within_15_percent():
    result = calibrate.evaluate()
    assert len(result.rows) == 15
    bad = [r for r in result.rows if abs(r["error_pct"]) > 15.0]
    assert not bad, bad


def test_refit_reproduces_the_shipped_calibration():
    shipped = calibrate.evaluate()
    refit = calibrate.fit()
    for a, b in zip(shipped.rows, refit.rows, strict=True):
        assert a["predicted"] == pytest.approx(b["predicted"], rel=0.02)


def test_llm_decode_is_memory_bound_and_batch_is_bounded_by_kv_cache():
    short = predict("llama-3.1-8b", "furiosa-rngd", "offline", input_tokens=128,
                    output_tokens=128)
    long = predict("llama-3.1-8b", "furiosa-rngd", "offline", input_tokens=4096,
                   output_tokens=4096)
    assert short.unit == "tokens/s"
    assert long.llm["max_batch"] < short.llm["max_batch"]
    ss = predict("llama-3.1-8b", "furiosa-rngd", "single-stream", input_tokens=128,
                 output_tokens=128)
    assert ss.batch == 1 and ss.throughput < short.throughput
    assert ss.llm["decode_bound"] == "memory" and ss.llm["prefill_bound"] == "compute"
    # batch-1 decode streams all weights per token: time per token >= weights / bandwidth
    dev = get_device("furiosa-rngd")
    assert ss.llm["tpot_s"] >= 8.0e9 / dev.memory_bw.value


def test_faster_memory_gives_faster_decode():
    a100 = predict("llama-2-7b", "nvidia-a100-sxm-80gb", "single-stream", precision="fp16")
    h100 = predict("llama-2-7b", "nvidia-h100-sxm", "single-stream", precision="fp16")
    assert h100.llm["tpot_s"] < a100.llm["tpot_s"]


def test_resnet_batch1_latency_is_sub_millisecond_on_datacenter_gpus():
    p = predict("resnet50", "nvidia-a100-sxm-80gb", "single-stream")
    assert 0.1e-3 < p.latency_s < 1.5e-3


def test_predict_cli_json_contract():
    out = run_cli("predict", "--model", "resnet50", "--device", "rebellions-atom",
                  "--scenario", "offline", "--json")
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    for key in ("throughput", "unit", "latency_s", "batch", "power_w", "energy_per_item_j",
                "bound", "figures", "estimated"):
        assert key in d
    assert d["figures"] == "modeled" and d["bound"] in ("compute", "memory", "overhead")
    assert d["estimated"] is True  # ATOM's bandwidth and power are estimated


@pytest.mark.parametrize("args,needle", [
    (("--model", "resnet50", "--device", "nosuch"), "unknown device"),
    (("--model", "nosuch-model", "--device", "nvidia-t4"), "nosuch-model"),
    (("--model", "llama-2-70b", "--device", "nvidia-t4"), "does not fit"),
    (("--model", "resnet50", "--device", "furiosa-warboy", "--precision", "fp32"),
     "cannot run fp32"),
    (("--model", "resnet50", "--device", "nvidia-t4", "--scenario", "server"), "scenario"),
])
def test_predict_cli_errors_are_one_line(args, needle):
    out = run_cli("predict", *args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0]
    assert "Traceback" not in out.stderr


def test_calibrate_cli_json_rows():
    out = run_cli("calibrate", "--json")
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    row = d["rows"][0]
    for key in ("device", "model", "scenario", "published", "predicted", "error_pct"):
        assert key in row
