"""The fleet simulator and the one step-cost composition it shares with predict and the planner."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from kcloud.errors import KCloudError
from kcloud.hardware.catalog import get_device
from kcloud.hardware.cluster import cluster_from_dict
from kcloud.hardware.cost import default_calibration, layer_table
from kcloud.hardware.steps import (
    StageTables,
    StepTables,
    generation_cost,
    plan_cost,
    step_cost,
)
from kcloud.planner.scheduling import SchedulerConfig
from kcloud.precision import Precision
from kcloud.sim.fleet import Service, Simulator, Slo
from kcloud.sim.services import ServiceSpec, build_service, plan_service
from kcloud.sim.streams import read_trace, synthetic_stream, trace_stream

TRACES = Path(__file__).resolve().parents[1].parent / "shared" / "traces"
if not TRACES.is_dir():
    TRACES = Path("/work/shared/traces")
CONV = TRACES / "azure-llm-2023-conversation.csv"


def one_node(dev: str = "nvidia-a100-sxm-80gb", n: int = 1):
    return cluster_from_dict({"name": f"{dev}x{n}", "nodes": [{"name": "n",
                                                                "devices": {dev: n}}]}, "test")


@pytest.fixture(scope="module")
def llm():
    spec = ServiceSpec(name="chat", model="tiny-gpt", rate=1.0, prompt_tokens=48,
                       output_tokens=16)
    return spec, plan_service(spec, prompt=48, output=16, cluster=one_node())


@pytest.fixture(scope="module")
def cnn():
    spec = ServiceSpec(name="vision", model="tiny-resnet", rate=1.0)
    return spec, plan_service(spec, cluster=one_node())


def _run(svc: Service, **kw):
    return Simulator([svc], bin_s=1.0, **kw).run()


def _llm_service(planned, stream, *, replicas: int = 1, sched: SchedulerConfig | None = None,
                 router: str = "least-outstanding") -> Service:
    m = planned.models[0]
    cap = m.kv_token_capacity(512)
    return Service("chat", [m] * replicas, stream, Slo(0.05, 0.01), replicas, router,
                   sched or SchedulerConfig(num_blocks=cap // 16))


# -- one cost composition --------------------------------------------------------------------


def test_predict_planner_plan_cost_and_steps_agree():
    """One request of an LLM on one device: `kcloud predict` (single stream), the planner's
    plan, `plan_cost` and the sum of its engine steps give the same latency."""
    from kcloud.predict import predict

    spec = ServiceSpec(name="chat", model="tiny-gpt", rate=1.0, objective="latency")
    planned = plan_service(spec, prompt=48, output=16, cluster=one_node())
    plan, graphs = planned.plan, planned.graphs
    assert plan.micro_batch == 1
    stage = plan.replicas[0].stages[0]
    assert len(plan.replicas[0].stages) == 1
    p = predict("tiny-gpt", stage.device_type, "single-stream", input_tokens=48,
                output_tokens=16, precision=stage.precision)
    pc = plan_cost(plan, planned.cluster, None, graphs.forward, graphs.decode)
    st = planned.models[0].stages[0]
    pre = st.forward(1)
    steps = sum(step_cost(st, 1, 48 + k + 1).time_s for k in range(15))  # 15 decode steps
    assert math.isclose(p.latency_s, pc.replica_latency_s(0), rel_tol=1e-9)
    # the request's steps attend 49..63 tokens; the decode graph the planner costs them at
    # attends prompt + output // 2 + 1 = 57 (one over their mean): linear in KV, so ...
    mean_step = step_cost(st, 1, 57).time_s
    assert math.isclose(pc.replica_latency_s(0), pre.time_s + 15 * mean_step, rel_tol=1e-9)
    assert math.isclose(steps, 15 * step_cost(st, 1, 56).time_s, rel_tol=1e-9)
    assert pc.replica_latency_s(0) == pytest.approx(pre.time_s + steps, rel=1e-3)
    resume = default_calibration().params(get_device(stage.device_type)).resume_s
    assert math.isclose(plan.predicted.latency_s, pc.replica_latency_s(0) + resume,
                        rel_tol=1e-6)
    assert math.isclose(plan.predicted.energy_per_item_j, pc.energy_per_item_j, rel_tol=1e-6)


def test_decode_step_is_linear_in_kv_tokens_and_matches_a_capture():
    from kcloud.graph.loaders import load_model_spec

    pre = load_model_spec("llama-2-7b", batch=1, seq_len=128, phase="prefill", kv_len=None)
    dec = load_model_spec("llama-2-7b", batch=1, seq_len=1, phase="decode", kv_len=1023)
    other = load_model_spec("llama-2-7b", batch=1, seq_len=1, phase="decode", kv_len=3071)
    dev = get_device("nvidia-a100-sxm-80gb")
    params = default_calibration().params(dev)
    st = StageTables(StepTables(pre, dec, dev, Precision.FP16, params))
    # at the captured length: the captured graph's own figures
    captured = layer_table(dec, dev, Precision.FP16, 8, params).stage(0, len(dec.layers))
    assert math.isclose(step_cost(st, 8, 8 * 1024).time_s, captured.time_s, rel_tol=1e-12)
    # at another length: within 2 % of a graph captured there
    at = layer_table(other, dev, Precision.FP16, 8, params).stage(0, len(dec.layers))
    assert step_cost(st, 8, 8 * 3072).time_s == pytest.approx(at.time_s, rel=0.02)
    # linear: equal steps in KV add equal time
    t = [step_cost(st, 8, k).time_s for k in (1000, 5000, 9000)]
    assert t[2] - t[1] == pytest.approx(t[1] - t[0], rel=1e-9)
    assert t[1] > t[0]
    # a prefill chunk of the whole prompt costs about the prompt's forward pass
    chunk = step_cost(st, 0, 0, prefill_tokens=128, prefill_pairs=128.0 * 128)
    assert chunk.time_s == pytest.approx(st.forward(1).time_s, rel=0.25)


def test_generation_cost_counts_output_minus_one_decode_steps():
    g = generation_cost(1.0, 10.0, 0.1, 1.0, 5)
    assert g.decode_steps == 4 and g.time_s == pytest.approx(1.4) and g.energy_j == 14.0


# -- streams ------------------------------------------------------------------------------------


def test_trace_is_read_and_scaled():
    tr = read_trace(CONV)
    assert len(tr) == 19366 and tr.arrived_at[0] == 0.0
    fast = list(trace_stream(tr, rate_scale=2.0, limit=100))
    slow = list(trace_stream(tr, limit=100))
    assert fast[50][0] == pytest.approx(slow[50][0] / 2)
    assert fast[50][1:] == slow[50][1:]


def test_bad_trace_is_one_line_error(tmp_path):
    bad = tmp_path / "t.csv"
    bad.write_text("time,prompt\n1,2\n")
    with pytest.raises(KCloudError, match="header"):
        read_trace(bad)


def test_synthetic_stream_rate_and_seed():
    a = list(synthetic_stream(50.0, duration_s=200, seed=1))
    b = list(synthetic_stream(50.0, duration_s=200, seed=1))
    c = list(synthetic_stream(50.0, duration_s=200, seed=2, arrivals="gamma", burstiness=3))
    assert a == b and a != c
    assert len(a) == pytest.approx(10000, rel=0.05)
    gaps = np.diff([x[0] for x in c])
    assert gaps.std() / gaps.mean() == pytest.approx(3.0, rel=0.15)


# -- the simulator -------------------------------------------------------------------------------


def test_every_request_completes_or_is_dropped_under_preemption(llm):
    _spec, planned = llm
    stream = synthetic_stream(400.0, limit=3000, seed=4,
                              lengths=__import__("kcloud.sim.streams", fromlist=["Lengths"])
                              .Lengths(60, 80, 0.8))
    sched = SchedulerConfig(token_budget=256, max_batch=64, num_blocks=16)
    res = _run(_llm_service(planned, stream, sched=sched))
    st = res.services["chat"]
    assert st.requests == 3000
    assert st.completed + st.dropped == st.requests
    assert st.dropped > 0  # requests longer than the whole KV cache
    assert st.preemptions > 0
    assert st.e2e.count == st.completed


def test_fast_path_equals_stepping_every_iteration(llm):
    _spec, planned = llm

    def run(fast: bool):
        stream = synthetic_stream(30.0, limit=600, seed=5,
                                  lengths=__import__("kcloud.sim.streams", fromlist=["x"])
                                  .Lengths(40, 50, 0.5))
        r = _run(_llm_service(planned, stream, replicas=2), fast=fast).to_dict()
        return r

    a, b = run(True), run(False)
    assert a["events"] < b["events"] / 3
    for k in ("ttft_s", "tpot_s", "e2e_s"):
        for q in ("p50", "p99"):
            assert a["services"]["chat"][k][q] == pytest.approx(b["services"]["chat"][k][q],
                                                                rel=1e-6)
    assert a["energy_j"] == pytest.approx(b["energy_j"], rel=1e-9)


class _Recording(Simulator):
    """Keeps each request's first-token and completion times."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.times: dict[int, tuple[float, float, int]] = {}

    def _finish(self, r, done, t):
        for s in done:
            self.times[s.rid] = (s.first_token, t, s.preemptions)
        super()._finish(r, done, t)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_runs_give_each_request_the_times_of_single_steps(llm, seed):
    """Chunked prefill (prompts of many chunks), arrivals mid-run, KV blocks tight enough to
    preempt: every request's first-token and end times equal stepping every iteration's within
    1e-9 relative, with the same token counts and preemptions, at far fewer events."""
    _spec, planned = llm
    from kcloud.sim.streams import Lengths

    def run(fast: bool):
        stream = synthetic_stream((1000.0, 200.0, 40.0)[seed - 1], limit=400, seed=seed,
                                  lengths=Lengths(150, 20, 0.9))
        sched = SchedulerConfig(token_budget=48, max_batch=16,
                                num_blocks=(30, 30, 4000)[seed - 1])
        sim = _Recording([_llm_service(planned, stream, replicas=2, sched=sched)], bin_s=1.0,
                         fast=fast)
        return sim.run(), sim.times

    (ra, ta), (rb, tb) = run(True), run(False)
    sa, sb = ra.services["chat"], rb.services["chat"]
    assert (sa.completed, sa.dropped, sa.tokens, sa.prompt_tokens, sa.preemptions) == \
        (sb.completed, sb.dropped, sb.tokens, sb.prompt_tokens, sb.preemptions)
    assert sa.completed > 350 and ta.keys() == tb.keys()
    for rid, (first, end, pre) in tb.items():
        assert first > 0 and ta[rid][0] == pytest.approx(first, rel=1e-9)
        assert ta[rid][1] == pytest.approx(end, rel=1e-9)
        assert ta[rid][2] == pre
    assert ra.energy_j == pytest.approx(rb.energy_j, rel=1e-9)
    assert ra.events < 0.75 * rb.events
    assert (sb.preemptions > 0) == (seed < 3)


def test_single_request_matches_its_steps(llm):
    _spec, planned = llm
    m = planned.models[0]
    st = m.stages[0]
    res = _run(_llm_service(planned, iter([(1.0, 40, 10)])))
    s = res.services["chat"]
    pre = step_cost(st, 0, 0, prefill_tokens=40, prefill_pairs=40.0 * 40)
    ttft = pre.time_s
    e2e = ttft + sum(step_cost(st, 1, 40 + k + 1).time_s for k in range(9))
    assert s.ttft.quantiles()["p50"] == pytest.approx(ttft, rel=1e-9)
    assert s.e2e.quantiles()["p50"] == pytest.approx(e2e, rel=1e-9)


def test_single_replica_matches_an_independent_queue(cnn):
    """Batch-1 FIFO service of a non-LLM model: the Lindley recursion c_i = max(a_i, c_i-1)
    + S over the same arrivals gives the same latencies."""
    _spec, planned = cnn
    m = planned.models[0]
    arrivals = list(synthetic_stream(0.8 / m.forward(1)[0], limit=4000, seed=7))
    svc = Service("vision", [m], iter(arrivals), Slo(latency_s=1.0), 1, "round-robin",
                  None, max_batch=1)
    res = _run(svc)
    service = m.forward(1)[0]
    done, lat = 0.0, []
    for a, _, _ in arrivals:
        done = max(a, done) + service
        lat.append(done - a)
    got = res.services["vision"].e2e
    assert got.mean == pytest.approx(float(np.mean(lat)), rel=1e-9)
    for q, v in got.quantiles().items():
        assert v == pytest.approx(float(np.quantile(lat, int(q[1:]) / 100)), rel=0.03)


@pytest.mark.parametrize("router", ["round-robin", "least-outstanding", "speed-aware"])
def test_more_replicas_never_worsen_p99(llm, router):
    _spec, planned = llm
    p99 = []
    for n in (1, 2, 4):
        stream = trace_stream(read_trace(CONV), rate_scale=8.0, limit=1500, max_tokens=200)
        r = _run(_llm_service(planned, stream, replicas=n, router=router)).to_dict()
        s = r["services"]["chat"]
        p99.append((s["ttft_s"]["p99"], s["e2e_s"]["p99"]))
    for worse, better in itertools.pairwise(p99):
        assert better[0] <= worse[0] * 1.01 and better[1] <= worse[1] * 1.01


def test_idle_fleet_energy_is_idle_power_times_time(llm):
    _spec, planned = llm
    m = planned.models[0]
    res = Simulator([_llm_service(planned, iter([]), replicas=3)]).run(horizon_s=3600.0)
    assert res.energy_j == pytest.approx(3 * m.idle_power_w * 3600.0, rel=1e-12)
    assert res.completed == 0


def test_idle_power_down_saves_idle_energy(cnn):
    _spec, planned = cnn
    m = planned.models[0]
    arrivals = [(1.0, 0, 1), (500.0, 0, 1)]
    on = _run(Service("v", [m], iter(arrivals), replicas=1, max_batch=1))
    off = _run(Service("v", [m], iter(arrivals), replicas=1, max_batch=1,
                       power_down_idle_s=10.0, wake_s=2.0))
    assert off.energy_j < on.energy_j / 10
    lat = sorted(off.services["v"].e2e.cdf(2)[0])
    assert lat[-1] == pytest.approx(2.0 + m.forward(1)[0], rel=1e-6)  # woken for the second


def test_autoscaling_adds_replicas_under_load(cnn):
    from kcloud.sim.fleet import Autoscale

    _spec, planned = cnn
    m = planned.models[0]
    svc_s = m.forward(1)[0]
    rate = 3.0 / svc_s  # three replicas' worth
    def mk(a):
        return (Service("v", [m] * 6, synthetic_stream(rate, limit=20000, seed=1),
                                Slo(latency_s=0.5), 1, max_batch=1, autoscale=a))
    fixed = _run(mk(None)).to_dict()
    scaled = _run(mk(Autoscale(1, 6, up=4, down=0.5, interval_s=50 * svc_s,
                               startup_s=200 * svc_s))).to_dict()
    assert (scaled["services"]["v"]["e2e_s"]["p99"]
            < fixed["services"]["v"]["e2e_s"]["p99"] / 5)


def test_deterministic_for_a_seed(llm):
    _spec, planned = llm

    def run(seed: int):
        s = ServiceSpec(name="chat", model="tiny-gpt", rate=20.0, prompt_tokens=48,
                        output_tokens=16, length_cv=0.5)
        d = Simulator([build_service(s, planned, duration_s=60, seed=seed)]).run().to_dict()
        d.pop("sim_wall_s")
        return json.dumps(d, sort_keys=True)

    assert run(3) == run(3)
    assert run(3) != run(4)


# -- the command line ---------------------------------------------------------------------------


def test_cli_sim_run_json(tmp_path, capsys):
    from kcloud.cli import main

    (tmp_path / "c.yaml").write_text(
        "name: t\nnodes:\n  - name: n\n    devices: {nvidia-l4: 2}\n")
    rows = [f"{i * 0.05:.3f},{20 + i % 50},{5 + i % 30}" for i in range(2000)]
    (tmp_path / "t.csv").write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n"
                                    + "\n".join(rows) + "\n")
    main(["sim", "run", "--model", "tiny-gpt", "--cluster", str(tmp_path / "c.yaml"),
          "--trace", str(tmp_path / "t.csv"), "--rate-scale", "4", "--ttft-ms", "100",
          "--json", "--plot", str(tmp_path / "plots")])
    d = json.loads(capsys.readouterr().out)
    for k in ("requests", "completed", "dropped", "services", "energy_j",
              "energy_per_request_j", "avg_power_w", "cost_usd", "domestic_share",
              "sim_wall_s"):
        assert k in d
    assert d["figures"] == "modeled" and d["requests"] == d["completed"] == 2000
    s = d["services"]["tiny-gpt"]
    for k in ("ttft_s", "tpot_s", "e2e_s"):
        assert set(s[k]) == {"p50", "p90", "p99"}
    assert 0 <= s["slo_attainment"] <= 1 and s["throughput_tok_s"] > 0
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {
        "latency_cdf.png", "power.png", "utilization.png"}


def test_cli_sim_run_bad_input_is_one_line(capsys):
    from kcloud.cli import main

    with pytest.raises(SystemExit) as e:
        main(["sim", "run", "--model", "tiny-gpt", "--rate", "-1", "--duration", "5"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("kcloud: error:") and err.count("\n") == 1


def test_size_meets_slo_and_domestic_floor():
    from kcloud.sim.services import parse_spec
    from kcloud.sim.size import SizingError, size_fleet

    spec = parse_spec({"services": [
        {"name": "vision", "model": "tiny-resnet", "rate": 2000.0, "slo": {"latency_ms": 20},
         "devices": ["furiosa-warboy", "nvidia-l4"]}]}, "test")
    free = size_fleet(spec, 2025, objective="cost")
    assert free["meets_slo"] and free["services"]["vision"]["slo_attainment"] >= 0.95
    dom = size_fleet(spec, 2025, objective="cost", min_domestic_share=1.0)
    assert set(dom["fleet"]) == {"furiosa-warboy"} and dom["domestic_share"] == 1.0
    assert len(dom["pareto"]) >= 1
    tight = parse_spec({"services": [
        {"name": "vision", "model": "tiny-resnet", "rate": 10.0, "slo": {"latency_ms": 1e-4},
         "devices": ["furiosa-warboy"]}]}, "test")
    with pytest.raises(SizingError, match=r"service vision: .*nearest"):
        size_fleet(tight, 2025)


def test_size_tries_a_unit_planned_for_its_own_objective():
    """A service's candidate replica units come from its own plan and from the plan for the
    sizing's objective: the fleet takes whichever serves the stream on less power."""
    from kcloud.sim.services import parse_spec
    from kcloud.sim.size import size_fleet, size_service, unit_objectives

    spec = parse_spec({"seed": 1, "services": [  # the roadmap's document service
        {"name": "doc", "model": "llama-2-70b", "trace": str(TRACES / "azure-llm-2023-code.csv"),
         "rate_scale": 0.25, "max_tokens": 4096, "slo": {"ttft_ms": 5000, "tpot_ms": 200},
         "devices": ["rebellions-rebel-quad"]}]}, "test")
    svc = spec.services[0]
    assert unit_objectives(svc, "energy") == ("throughput", "energy")
    assert unit_objectives(svc, "throughput") == ("throughput",)
    units = [size_service(svc, ("rebellions-rebel-quad",), seed=1, objective=o)
             for o in ("throughput", "energy")]
    assert all(u is not None and u.meets for u in units)
    assert units[0].unit != units[1].unit  # type: ignore[union-attr]
    got = size_fleet(spec, 2028, objective="energy")
    best = min(units, key=lambda u: u.power_w)  # type: ignore[union-attr]
    assert best is units[1]  # here the node's throughput plan is one pipeline of 8
    assert got["services"]["doc"]["unit"] == best.unit  # type: ignore[union-attr]
    assert got["avg_power_w"] == pytest.approx(best.power_w)  # type: ignore[union-attr]


# -- a serving front end -----------------------------------------------------------------------


def _front(**kw):
    from kcloud.hardware.host import FrontEndCosts

    base = dict(request_s=0.0, prompt_token_s=0.0, token_s=0.0, delivery_s=0.0, latency_s=0.0,
                cores=64,
                date="", probes=0, load_avg=0.0)
    return FrontEndCosts(**(base | kw))


def _one(planned, reqs, front=None, model=None):
    m = model or planned.models[0]
    svc = Service("chat", [m], iter(reqs), Slo(), 1, "least-outstanding",
                  SchedulerConfig(num_blocks=m.kv_token_capacity(512) // 16), front_end=front)
    return _run(svc).services["chat"]


def test_front_end_admits_one_request_at_a_time_and_adds_its_way(llm):
    """Three requests sent together to a replica far faster than their admission: the k-th is
    admitted after k admissions (each its fixed time and its prompt's), then prefilled alone;
    every request's TTFT and end to end also carry the front end's way."""
    _spec, planned = llm
    st = planned.models[0].stages[0]
    a, per_tok, way = 0.5, 1e-3, 0.02
    front = _front(request_s=a, prompt_token_s=per_tok, latency_s=way)
    admit = a + per_tok * 40
    s = _one(planned, [(1.0, 40, 10)] * 3, front)
    pre = step_cost(st, 0, 0, prefill_tokens=40, prefill_pairs=40.0 * 40).time_s
    assert s.completed == 3
    assert s.ttft.mean == pytest.approx(2 * admit + pre + way, rel=1e-9)  # (1 + 2 + 3) / 3
    alone = _one(planned, [(1.0, 40, 10)])
    assert s.e2e.mean == pytest.approx(2 * admit + alone.e2e.mean + way, rel=1e-9)
    assert s.queue.mean == pytest.approx(2 * admit, rel=1e-9)  # waiting to be admitted


def test_streamed_tokens_take_cpu_from_host_workers_only_without_a_free_core(llm):
    """On this host's cores (a replica running the engine's workers), the front end's CPU for
    the tokens a step streams is taken from the next step when it leaves no core free (the first
    token's step follows none); with a core free, or on a device elsewhere, it is not."""
    from kcloud.hardware.host import EngineStepCosts
    from kcloud.sim.replica import ReplicaModel

    _spec, planned = llm
    m = planned.models[0]
    none = EngineStepCosts(step_s=0.0, row_s=0.0, kv_byte_s=0.0, prefill_byte_s=0.0,
                           pair_byte_s=0.0, date="", steps=0, load_avg=0.0)
    host = ReplicaModel(m.stages, m.hops, True, engine=[(none, 0.0)] * len(m.stages))
    req = [(1.0, 40, 10)]
    tok, wake = 2e-3, 0.5e-3
    base = _one(planned, req, model=host)
    full = _one(planned, req, _front(token_s=tok, delivery_s=wake, cores=m.n_devices),
                model=host)
    assert full.tpot.mean == pytest.approx(base.tpot.mean + tok + wake, rel=1e-9)  # a row
    assert full.ttft.mean == pytest.approx(base.ttft.mean, rel=1e-12)
    spare = _one(planned, req, _front(token_s=tok, cores=m.n_devices + 1), model=host)
    assert spare.tpot.mean == pytest.approx(base.tpot.mean, rel=1e-12)
    away = _one(planned, req, _front(token_s=tok, cores=m.n_devices))  # an A100: not host
    assert away.tpot.mean == pytest.approx(_one(planned, req).tpot.mean, rel=1e-12)


def test_front_end_fit_recovers_the_costs_that_made_the_probes():
    from kcloud.sim.front_end import PROBES, ProbeRun, fit

    run_s, req_s, tok_s, wake_s = 0.03, 0.4e-3, 110e-6, 60e-6
    way, adm, ptok = 1.5e-3, 1.6e-3, 0.5e-6
    runs = []
    for k, (n, prompt, out) in enumerate(PROBES * 3):
        steps = out * min(n, 2) + prompt // 256  # two replicas step in turn
        cpu = run_s + req_s * n + tok_s * n * out + wake_s * steps
        gap = way + adm * (n - 1) / 2 + ptok * prompt * (n + 1) / 2
        noise = 2.0 if k == 5 else 1.0  # one run slowed by another process
        runs.append(ProbeRun(n, n * prompt, n * out, steps, cpu * noise, 0.5 + gap * noise,
                             0.5))
    request_s, prompt_token_s, token_s, delivery_s, latency_s, err = fit(runs)
    assert token_s == pytest.approx(tok_s, rel=0.02)
    assert delivery_s == pytest.approx(wake_s, rel=0.15)  # it moves with the tokens
    assert request_s == pytest.approx(adm, rel=0.02)
    assert prompt_token_s == pytest.approx(ptok, rel=0.05)
    assert latency_s == pytest.approx(way, rel=0.05)
    assert err < 0.01
    with pytest.raises(KCloudError, match="four probes"):
        fit(runs[:3])


def test_services_file_front_end_needs_a_measurement(llm, tmp_path, monkeypatch):
    monkeypatch.setenv("KCLOUD_CACHE_DIR", str(tmp_path))  # nothing measured there
    spec = ServiceSpec(name="chat", model="tiny-gpt", rate=1.0, prompt_tokens=48,
                       output_tokens=16, front_end=True)
    with pytest.raises(KCloudError, match="kcloud sim front-end"):
        build_service(spec, llm[1], duration_s=1.0, seed=0)
