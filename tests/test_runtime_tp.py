"""Tensor-parallel stages (sharded over their device group) and workers as Ray actors."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from kcloud.errors import KCloudError
from kcloud.graph import zoo
from kcloud.planner.plan import Plan, Predicted, Replica, Stage
from kcloud.runtime import execute
from kcloud.runtime.split import n_layers

HOST = "host-cpu:1core"


def _plan(model: str, groups: list[tuple[int, int]], micro_batch: int = 2) -> Plan:
    """One replica; `groups`: (first layer, tensor-parallel degree) of each stage."""
    m, x = zoo.build(model, device="cpu", batch=micro_batch)
    n = n_layers(m, x)
    cuts = [g[0] for g in groups] + [n]
    stages = []
    k = 0
    for i, (_, tp) in enumerate(groups):
        devices = tuple(f"local/{HOST}/{k + j}" for j in range(tp))
        stages.append(Stage(cuts[i], cuts[i + 1], HOST, devices, "fp32", time_s=1e-3))
        k += tp
    return Plan(model=model, cluster="local-cpu", objective="throughput",
                batch=micro_batch * 3, micro_batch=micro_batch, seq_len=None, phase="forward",
                n_layers=n, replicas=(Replica(tuple(stages)),),
                predicted=Predicted(2e-3, 1000.0, "samples/s", 10.0, 0.01, 0.0, None, 0.1))


def _expected_schedule(plan: Plan, n: int) -> dict[str, list[str]]:
    """`Plan.schedule`, where only the first device of a group sends (its peers receive the
    input by broadcast from it)."""
    leaders = {s.devices[0] for r in plan.replicas for s in r.stages}
    return {d: [a for a in acts if d in leaders or not a.startswith("S")]
            for d, acts in plan.schedule(n).items()}


def test_tensor_parallel_stage_matches_reference(tmp_path: Path) -> None:
    plan = _plan("tiny-gpt", [(0, 2)])
    trace = tmp_path / "trace.json"
    r = execute(plan, n_micro=2, trace_path=trace)
    assert r.reference_ok and r.max_abs_error < 1e-4
    (st,) = r.stages
    assert st.tp == 2 and st.sharded and st.measured_allreduce_s > 0
    assert r.schedule == _expected_schedule(plan, 2)
    events = json.loads(trace.read_text())["traceEvents"]
    ar = [e for e in events if e["ph"] == "X" and e["cat"] == "allreduce"]
    assert {e["pid"] for e in ar} == {0, 1} and {e["name"] for e in ar} == {"AR0", "AR1"}


@pytest.mark.parametrize(("model", "groups"), [("tiny-gpt", [(0, 2), (3, 2)]),
                                                ("mlp", [(0, 2), (3, 1)])])
def test_pipeline_of_tensor_parallel_stages(model: str, groups: list[tuple[int, int]],
                                            tmp_path: Path) -> None:
    plan = _plan(model, groups)
    r = execute(plan, n_micro=3, trace_path=tmp_path / "t.json")
    assert r.reference_ok and r.max_abs_error < 1e-4
    assert [s.sharded for s in r.stages] == [tp > 1 for _, tp in groups]
    assert r.schedule == _expected_schedule(plan, 3)
    assert r.measured["throughput"] > 0


def test_degree_that_does_not_divide_heads_is_refused() -> None:
    plan = _plan("tiny-gpt", [(0, 3)])  # 4 heads over 2 KV heads: degrees 1 and 2 only
    t0 = time.monotonic()
    with pytest.raises(KCloudError) as info:
        execute(plan, n_micro=1, trace_path=None)
    msg = info.value.message
    assert "\n" not in msg and "degree 3" in msg and "attention heads" in msg
    assert time.monotonic() - t0 < 20


def test_ray_pipeline_matches_reference(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'kcloud[ray]')")
    assert not ray.is_initialized()
    r = execute(_plan("tiny-gpt", [(0, 1), (3, 1)]), n_micro=2, trace_path=None,
                ray_address="local")
    assert r.executor == "ray" and r.reference_ok and r.max_abs_error < 1e-4
    assert len(r.stages) == 2 and all(s.measured_compute_s > 0 for s in r.stages)
    assert not ray.is_initialized()  # the local instance it started is stopped
