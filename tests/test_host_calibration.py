"""Host micro-calibration: fitted single-core parameters, their cache, and prediction vs run."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import pytest

from kcloud.hardware import host
from kcloud.hardware.catalog import get_device
from kcloud.hardware.cost import default_calibration


def test_fitted_parameters_are_physical_and_cached() -> None:
    hp = host.measure_host_params()
    # one busy core may beat its share of the all-core peak (turbo), never by much
    assert 0.0 < hp.matrix_eff <= 1.5
    assert hp.kernel_overhead_s > 0 and hp.inference_overhead_s > 0
    assert hp.link_latency_s > 0 and hp.link_bw > 0
    assert hp.collective_latency_s >= hp.link_latency_s
    # a pass after an idle pause is never faster than back to back; tens of ms would be a
    # stalled host, not a resume
    assert 0.0 <= hp.resume_s < 0.02
    # a refill of the whole cache share after a pause: under tens of ms, never negative
    assert 0.0 <= hp.resume_s_per_byte * host.cache_share_bytes() < 0.05
    assert "measured on this host" in hp.source
    path = host.params_cache_file()
    assert path.is_file() and path.parent == host.cache_file().parent
    assert json.loads(path.read_text())["matrix_eff"] == pytest.approx(hp.matrix_eff)
    host.reset_host_cache()
    again = host.measure_host_params()  # read back from the file, not measured again
    assert again == hp


def test_a_pass_of_all_reduces_is_costed_at_its_mean_tails_included() -> None:
    # On a shared host a small all-reduce takes 0.25 ms or about 4 ms; a tensor-parallel stage
    # pays dozens in a row, so the figure is what a pass of them pays, not the usual call.
    timer = object.__new__(host._LinkTimer)
    timer.work = [1e-4] * 5
    timer.hops = {n: [2e-4] * 8 for n in host._LINK_SIZES}
    one_pass = [4e-3] * 4 + [2.5e-4] * (host._COLLECTIVE_PASS - 4)
    burst = [100e-3] * host._COLLECTIVE_PASS  # other tenants took the host for one pass
    timer.allreduce = one_pass * 9 + burst
    fig = timer.figures()
    assert fig["allreduce"] == pytest.approx(sum(one_pass) / len(one_pass))
    assert fig["p2p16"] == pytest.approx(1e-4)  # a hop less the receiver's work


def test_default_calibration_uses_host_parameters() -> None:
    hp = host.measure_host_params()
    params = default_calibration().params(get_device("host-cpu:1core"))
    assert params.matrix_eff == pytest.approx(hp.matrix_eff)
    assert params.kernel_overhead_s == pytest.approx(hp.kernel_overhead_s)
    assert "matrix_eff" in params.fitted
    assert params.resume_s == hp.resume_s  # a request's latency on local-cpu pays it
    assert params.resume_s_per_byte == hp.resume_s_per_byte
    assert host.host_link() == (hp.link_bw, hp.link_latency_s, hp.collective_latency_s)


@pytest.mark.slow  # measures the host, then three multi-process runs
@pytest.mark.skipif(host.host_cores() < 2, reason="a 2-stage run needs a core per stage")
@pytest.mark.parametrize(("tp", "pp"), [(1, 2), (2, 1)])
def test_predicted_latency_near_measured_on_local_cpu(tp: int, pp: int) -> None:
    from kcloud.planner.api import resolve
    from kcloud.planner.assign import build_plan
    from kcloud.planner.baselines import _uniform
    from kcloud.planner.evaluate import Mix
    from kcloud.planner.goal import Goal
    from kcloud.planner.search import make_context
    from kcloud.precision import Precision
    from kcloud.runtime.executor import execute

    # The host's speed drifts: a calibration made minutes before, on this VM, has put the
    # model 1.7x under the same probes (3.1 ms against 8.1-8.6; measured again at once, 5.5 ms
    # against 6.9-8.4). The model is checked against the host as it is now, measured first.
    host.remeasure_host()
    goal = Goal(objective="latency", batch=8, precision=Precision.FP32)
    m, c = resolve("mlp", "local-cpu", goal)
    ctx = make_context(m, c, goal, micro_batches=[8])
    path = _uniform(ctx, 8, 0, tp, pp)
    assert path is not None
    plan = build_plan(ctx, Mix(((ctx.evaluate(8, path), 1),)))
    # Latency probes of three runs (three each): a request alone in the idle pipeline. On a
    # shared VM the wake-up of an idle core (a hop's receiver, an all-reduce's peer) takes a
    # few tenths of a ms or a host scheduler tick (about 4 ms), by turns for minutes at a time,
    # so the probes fall in two modes, and for minutes all of them in the slow one (a whole
    # suite's run here: nine probes of 7.4-8.0 ms where the fast mode is 5-6 ms). The model
    # must not be twice as fast as the fastest probe nor slower than half again the typical.
    probes = [p for _ in range(3) for p in execute(plan, mode="real", n_micro=20,
                                                   trace_path=None).measured["probe_latencies_s"]]
    pred, fastest, typical = plan.predicted.latency_s, min(probes), statistics.median(probes)
    assert 0.5 * fastest <= pred <= 1.5 * typical, (
        f"predicted {pred * 1e3:.2f} ms; probes {sorted(round(p * 1e3, 2) for p in probes)} ms; "
        f"load {os.getloadavg()[0]:.2f}, cores {sorted(os.sched_getaffinity(0))}")


def test_fitted_cpu_model_reproduces_the_timed_chains() -> None:
    hp = host.measure_host_params()
    # sixteen chains from overhead- to memory- to compute-bound, nine parameters: a physical
    # model fits them all (about 10-20 % on a quiet machine); a wrong one (compute and weight
    # streaming overlapped, activations tiled on chip) misses some by 2x and more. The bound
    # leaves room for a host whose last-level cache other tenants share: for stretches of
    # minutes a batch-1 chain whose weights fit a core's share stops keeping them between
    # passes and runs at DRAM speed, about 1.5-1.8x its modeled time (seen here at 53-82 %).
    assert hp.fit_error_pct < 90.0
    assert 0.0 <= hp.serial_share <= 1.0 and 0.0 < hp.memory_eff <= 1.0


@pytest.mark.slow  # the host measured again in a child process and its workers
def test_calibrate_host_measures_again_beside_what_the_cache_held(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses
    import datetime

    import torch

    from tests import clitools

    bench = host.measure_host()
    cache = tmp_path / "cache"
    cache.mkdir()
    # an old micro-benchmark at half today's rate, and no micro-calibration at all
    stale = dataclasses.replace(bench, fp32_flops=bench.fp32_flops / 2, date="2026-01-01")
    key = host._cache_key(host.cpu_model(), host.host_cores(), torch.__version__)
    host._write_cache(cache / host.cache_file().name, key, host.CACHE_VERSION, stale)
    monkeypatch.setenv("KCLOUD_CACHE_DIR", str(cache))
    ran = clitools.run(["calibrate", "--host", "--json"], tmp_path / "run")
    assert ran.code == 0, ran.err
    out = json.loads(ran.out)
    assert out["figures_are"] == "measured"
    assert out["before"][0]["fp32_flops"] == stale.fp32_flops and out["before"][1] is None
    today = datetime.date.today().isoformat()
    assert out["now"][0]["date"] == today and out["now"][1]["date"] == today
    rows = {r["figure"]: r for r in out["figures"]}
    peak = rows["peak fp32 matmul, all cores"]
    assert peak["before"] == pytest.approx(stale.fp32_flops * 1e-9)
    assert peak["now"] == pytest.approx(out["now"][0]["fp32_flops"] * 1e-9)
    assert peak["change_pct"] == pytest.approx(100 * (peak["now"] / peak["before"] - 1))
    assert rows["share of peak one core reaches"]["before"] is None  # nothing was cached
    assert rows["share of peak one core reaches"]["change_pct"] is None
    # both caches hold what was measured now: every later command plans with it
    for path, now in zip(out["cache_files"], out["now"], strict=True):
        held = json.loads(Path(path).read_text())
        assert held["date"] == today and held["seconds"] == now["seconds"]

    bad = clitools.run(["calibrate", "--host", "--fit"], tmp_path / "run")
    assert bad.code == 2 and len(bad.err_lines) == 1 and "--fit" in bad.err
    assert "Traceback" not in bad.err
