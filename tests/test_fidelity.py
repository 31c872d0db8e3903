"""One workload for predict, plan and calibrate; NPUs at batch 1; the honesty of the fit
(leave-one-out, never-fitted checks); what a throughput plan of an LLM holds and promises."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kcloud import calibrate
from kcloud.errors import KCloudError
from kcloud.hardware.catalog import get_device
from kcloud.hardware.cost import CLASS_PRIORS, forward_cost, layer_table
from kcloud.hardware.device import DeviceKind
from kcloud.planner.api import make_plan
from kcloud.planner.goal import Goal
from kcloud.planner.model import load_model
from kcloud.planner.search import DEFAULT_SLO_FACTOR
from kcloud.precision import Precision
from kcloud.predict import model_inputs, predict
from tests.conftest import make_device, mlp_graph


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kcloud.cli", *args], capture_output=True,
                          text=True, timeout=600)


# -- workloads ----------------------------------------------------------------------------------

def test_predict_defaults_to_the_calibrated_benchmark_workload() -> None:
    """GPT-J on H100: the default prediction is the calibrated row's, not 128/128 tokens."""
    row = next(r for r in calibrate.evaluate().rows if r["model"] == "gpt-j-6b")
    p = predict("gpt-j-6b", "nvidia-h100-sxm")
    assert p.workload is not None and p.workload["workload"] == "cnn-dailymail"
    assert (p.workload["input_tokens"], p.workload["output_tokens"], p.workload["beams"]) == \
        (900, 65, 4)
    assert p.throughput == pytest.approx(row["predicted"], rel=1e-9)
    raw = predict("gpt-j-6b", "nvidia-h100-sxm", workload="none")
    assert raw.workload == {"workload": "none", "input_tokens": 128, "output_tokens": 128,
                            "beams": 1, "source": "", "estimated": False}
    assert raw.throughput > 5 * p.throughput  # no beams, short prompts
    # explicit lengths override the workload's, which keeps its beams
    own = predict("gpt-j-6b", "nvidia-h100-sxm", input_tokens=300)
    assert own.workload["input_tokens"] == 300 and own.workload["beams"] == 4


def test_an_encoder_takes_its_workloads_length_and_a_model_without_one_its_own() -> None:
    bert = model_inputs("bert-large")
    assert bert.shape.workload == "squad-v1.1" and bert.graphs[0].seq_len == 175
    assert model_inputs("bert-large", "none").graphs[0].seq_len == 384  # the zoo's default
    assert model_inputs("resnet50").shape.workload == "none"
    with pytest.raises(KCloudError, match="unknown workload"):
        model_inputs("bert-large", "imagenet-21k")


def test_cli_predict_and_plan_print_and_return_the_workload() -> None:
    out = run_cli("predict", "-m", "llama-2-70b", "-d", "nvidia-h100-sxm", "--tp", "8",
                  "--json")
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["workload"]["workload"] == "openorca" and d["llm"]["input_tokens"] == 600
    text = run_cli("predict", "-m", "bert-large", "-d", "nvidia-a100-sxm-80gb",
                   "--workload", "none")
    assert text.returncode == 0 and "none (raw lengths" in text.stdout
    bad = run_cli("predict", "-m", "bert-large", "-d", "nvidia-t4", "--workload", "nosuch")
    assert bad.returncode == 2 and "unknown workload 'nosuch'" in bad.stderr
    plan = run_cli("plan", "-m", "bert-large", "-c", "gpu-dgx", "--json")
    assert plan.returncode == 0, plan.stderr
    doc = json.loads(plan.stdout)
    assert doc["workload"]["workload"] == "squad-v1.1" and doc["plan"]["seq_len"] == 175
    assert doc["plan"]["goal"]["workload"] is None  # the model's default was asked for


# -- NPUs at batch 1 ----------------------------------------------------------------------------

def test_an_npu_compiler_keeps_at_batch_1_the_weights_a_gpu_cache_would_spill() -> None:
    """A model that fills most of the SRAM: resident on an NPU at batch 1 (its compiler gives
    the weights what one sample's activations leave), half of it spilled on a GPU's cache."""
    g = mlp_graph(n_layers=2, hidden=512)  # 4 M parameters: 4 MB at int8
    npu = make_device("npu", DeviceKind.NPU, sram=6e6)
    gpu = make_device("gpu", DeviceKind.GPU, sram=6e6 / 0.75 * 0.5)  # the same usable SRAM
    p_npu = CLASS_PRIORS[DeviceKind.NPU]
    p_gpu = CLASS_PRIORS[DeviceKind.GPU]
    one = forward_cost(g, npu, Precision.INT8, 1, p_npu)
    assert one.dram_bytes < 0.01 * one.weight_bytes  # resident
    assert forward_cost(g, gpu, Precision.INT8, 1, p_gpu).dram_bytes > 0.2 * one.weight_bytes
    # at a large batch the activation tiles take their half back: the weights stream again
    big = layer_table(g, npu, Precision.INT8, 4096, p_npu)
    assert big.sram_half == pytest.approx(6e6 * p_npu.sram_usable / 2)


def test_warboy_single_stream_moves_toward_its_published_latency() -> None:
    """Checked (never fitted) against MLPerf v2.0 closed edge: 0.712 ms."""
    checks = calibrate.evaluate().checks
    warboy = [r for r in checks if r["device"] == "furiosa-warboy"]
    assert warboy and all(r["unit"] == "ms" and r["scenario"] == "single-stream"
                          for r in warboy)
    assert all(abs(r["error_pct"]) < 35 for r in warboy), warboy  # was +61 %
    assert not {(r["device"], r["model"], r["scenario"]) for r in checks} & {
        (r.device, r.model, r.scenario) for r in calibrate.load_rows()}  # kept out of the fit


# -- the fit's honesty --------------------------------------------------------------------------

def test_leave_one_out_predicts_each_row_without_it() -> None:
    rows = [r for r in calibrate.load_rows() if r.model == "resnet50"
            and r.device in ("nvidia-t4", "nvidia-l4", "nvidia-a100-sxm-80gb")]
    res = calibrate.fit(rows, cv=True)
    assert all("loo_error_pct" in r for r in res.rows)
    assert res.loo_max_abs_error_pct is not None
    # A held-out GPU falls back to its class prior efficiency: worse than in sample.
    assert res.loo_mean_abs_error_pct > sum(abs(r["error_pct"]) for r in res.rows) / len(rows)
    d = res.to_dict()
    assert {"loo_max_abs_error_pct", "loo_mean_abs_error_pct", "checks"} <= set(d)


def test_cli_calibrate_prints_latency_rows_in_ms(tmp_path) -> None:
    csv = tmp_path / "rows.csv"
    csv.write_text(
        "device,model,scenario,precision,input_tokens,output_tokens,metric,value,unit,source\n"
        "nvidia-t4,resnet50,single-stream,int8,,,latency,0.96,ms,test row\n")
    out = run_cli("calibrate", "--csv", str(csv))
    assert out.returncode == 0, out.stderr
    assert "0.96 ms" in out.stdout and " 0 s" not in out.stdout
    assert "Checks: published results never fitted" in out.stdout


# -- LLM throughput plans -----------------------------------------------------------------------

def test_a_throughput_plan_states_its_default_latency_bound_and_meets_it() -> None:
    goal = Goal(objective="throughput")
    m = load_model("llama-2-7b", goal)
    out = make_plan(m, "k-cloud-rack", goal)
    note = next(n for n in out.plan.notes if n.startswith("latency bound"))
    slo = out.plan.goal["slo_s"]
    assert slo is not None and f"{DEFAULT_SLO_FACTOR:g}x the fastest request" in note
    assert out.plan.predicted.latency_s <= slo * (1 + 1e-9)
    free = make_plan(m, "k-cloud-rack", Goal(objective="throughput", slo_s=1e6))
    assert free.plan.predicted.throughput >= out.plan.predicted.throughput
    assert not any(n.startswith("latency bound") for n in free.plan.notes)


def test_each_pipeline_counts_its_own_micro_batches_in_flight() -> None:
    """On 1,024 devices the best mix joins shallow and deep pipelines: each is counted for as
    many micro-batches in flight as it has stages (at least), not all for the deepest's."""
    from kcloud.hardware.cluster import cluster_from_dict

    node = {"nvidia-h100-sxm": 8, "nvidia-a100-sxm-80gb": 8, "furiosa-rngd": 8,
            "rebellions-atom": 8}
    cl = cluster_from_dict({"name": "hetero-1024", "nodes": [
        {"name": "n", "count": 32, "devices": node}],
        "network": {"bandwidth_gbps": 50, "latency_us": 5}}, "test")
    goal = Goal(objective="throughput")
    out = make_plan(load_model("llama-2-70b", goal), cl, goal)
    parts = [t for t, _ in out.result.mix.parts]
    deepest = max(len(t.path.stages) for t in parts)
    assert deepest > 2
    for t in parts:
        assert len(t.path.stages) <= t.space.in_flight
    shallow = [t for t in parts if len(t.path.stages) <= 2]
    assert shallow and all(t.space.in_flight == 2 for t in shallow)
    # their stages' memory is their own two micro-batches' KV, less than the deepest's count
    ctx = out.result.ctx
    for t in shallow:
        deep = ctx.space_at(t.b, deepest)
        for (o, i, j), mem in zip(t.path.stages, t.stage_mem, strict=True):
            assert mem < float(deep.mem[o, i, j])
    two = {s.memory_bytes for r in out.plan.replicas if len(r.stages) <= 2 for s in r.stages}
    assert two <= {m for t in shallow for m in t.stage_mem}  # what the plan reports


def test_every_stage_holds_the_kv_cache_of_each_micro_batch_in_flight() -> None:
    goal = Goal(objective="throughput", slo_s=1e6)
    m = load_model("llama-2-70b", goal)
    out = make_plan(m, "k-cloud-rack", goal)
    for t, _ in out.result.mix.parts:  # each pipeline's space counted its stages at least
        assert t.space.in_flight >= len(t.path.stages)
    kv_token = m.kv_elems_per_token  # per layer
    dev_mem = {d: get_device(d).memory_bytes.value for d in {
        s.device_type for r in out.plan.replicas for s in r.stages}}
    for r in out.plan.replicas:
        for s in r.stages:
            prec = Precision.parse(s.precision)
            kv = (len(r.stages) * out.plan.micro_batch * m.context_tokens
                  * float(kv_token[s.start:s.end].sum()) * max(prec.bytes, 1.0)
                  / len(s.devices))
            assert s.memory_bytes >= kv * 0.99
            assert s.memory_bytes <= dev_mem[s.device_type]
