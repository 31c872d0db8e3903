"""Tensor-parallel stages (sharded over their device group) and workers as Ray actors."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from kcloud.errors import KCloudError
from kcloud.graph import zoo
from kcloud.graph.layergraph import TPGroup, TPStyle
from kcloud.planner.plan import Plan, Predicted, Replica, Stage
from kcloud.runtime import execute
from kcloud.runtime.model import layer_graph
from kcloud.runtime.split import n_layers, split_model
from kcloud.runtime.tensor_parallel import check_degree, find_layout, stage_groups

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


def _collectives(plan: Plan) -> list[int]:
    """Collectives per micro-batch of each stage, from its groups: one all-reduce per MLP or
    heads group and per embedding, one all-gather per convolution and per vocabulary head."""
    graph = layer_graph(plan.model, batch=plan.micro_batch, seq_len=plan.seq_len,
                        phase=plan.phase)
    out = []
    for st in plan.replicas[0].stages:
        groups = stage_groups(graph, st.start, st.end) if st.tp > 1 else []
        out.append(sum(len(g.column) if g.style is TPStyle.CONV else 1 for g in groups))
    return out


def _ar_per_micro(trace: Path, plan: Plan) -> list[int]:
    """All-reduce/all-gather events per micro-batch of the first worker of each stage."""
    events = json.loads(trace.read_text())["traceEvents"]
    out = []
    rank = 0
    for st in plan.replicas[0].stages:
        names = [e["name"] for e in events
                 if e["ph"] == "X" and e["cat"] == "allreduce" and e["pid"] == rank]
        out.append(names.count("AR0"))
        rank += st.tp
    return out


def test_tensor_parallel_stage_matches_reference(tmp_path: Path) -> None:
    plan = _plan("tiny-gpt", [(0, 2)])  # embedding (vocabulary rows), blocks, head
    trace = tmp_path / "trace.json"
    r = execute(plan, n_micro=2, trace_path=trace)
    assert r.reference_ok and r.max_abs_error < 1e-4
    (st,) = r.stages
    assert st.tp == 2 and st.sharded and st.measured_allreduce_s > 0
    assert _ar_per_micro(trace, plan) == _collectives(plan)
    assert r.schedule == _expected_schedule(plan, 2)
    events = json.loads(trace.read_text())["traceEvents"]
    ar = [e for e in events if e["ph"] == "X" and e["cat"] == "allreduce"]
    assert {e["pid"] for e in ar} == {0, 1} and {e["name"] for e in ar} == {"AR0", "AR1"}


@pytest.mark.parametrize(("model", "groups"), [("tiny-gpt", [(0, 2), (3, 2)]),
                                                ("mlp", [(0, 2), (3, 1)])])
def test_pipeline_of_tensor_parallel_stages(model: str, groups: list[tuple[int, int]],
                                            tmp_path: Path) -> None:
    """tiny-gpt: embedding + blocks, then blocks + norm + vocabulary head, both split."""
    plan = _plan(model, groups)
    r = execute(plan, n_micro=3, trace_path=tmp_path / "t.json")
    assert r.reference_ok and r.max_abs_error < 1e-4
    assert [s.sharded for s in r.stages] == [tp > 1 for _, tp in groups]
    assert all(s.measured_allreduce_s > 0 for s in r.stages if s.sharded)
    assert _ar_per_micro(tmp_path / "t.json", plan) == _collectives(plan)
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


@pytest.mark.parametrize("groups", [[(0, 2)], [(0, 2), (4, 1)]])
def test_convolution_stage_sharded_over_channels(groups: list[tuple[int, int]],
                                                 tmp_path: Path) -> None:
    plan = _plan("tiny-resnet", groups)
    trace = tmp_path / "trace.json"
    r = execute(plan, n_micro=2, trace_path=trace)
    assert r.reference_ok and r.max_abs_error < 1e-4
    assert [s.sharded for s in r.stages] == [tp > 1 for _, tp in groups]
    assert r.stages[0].measured_allreduce_s > 0
    assert r.schedule == _expected_schedule(plan, 2)
    expected = _collectives(plan)
    assert expected[0] >= 5  # every convolution of the stage gathers its channels
    assert _ar_per_micro(trace, plan) == expected


def test_layout_composes_vocabulary_and_blocks() -> None:
    m, x = zoo.build("tiny-gpt", device="cpu", batch=2)
    graph = layer_graph("tiny-gpt", batch=2, seq_len=None, phase="forward")
    n = len(graph.layers)
    split = split_model(m, x, [(0, n)])
    (sub,) = split.stages
    layout = find_layout(sub.sub, sub.sub_args(*x), stage_groups(graph, 0, n), 2)
    assert layout.vocab == ("embed_tok",) and layout.gathers == ("head",)
    assert len(layout.rows) == 2 * 4 and layout.rewrites  # the blocks' heads and MLPs


def test_degree_that_does_not_divide_channels_is_refused() -> None:
    plan = _plan("tiny-resnet", [(0, 3)])  # 16 channels
    t0 = time.monotonic()
    with pytest.raises(KCloudError) as info:
        execute(plan, n_micro=1, trace_path=None)
    msg = info.value.message
    assert "\n" not in msg and "degree 3" in msg and "channels" in msg and "conv1" in msg
    assert time.monotonic() - t0 < 20


def test_degree_that_does_not_divide_the_vocabulary_is_refused() -> None:
    head = TPGroup(TPStyle.VOCAB, ("head",), (), 50257, 0, 0)
    with pytest.raises(KCloudError) as info:
        check_degree([head], 2, "stage 1 of replica 0")
    msg = info.value.message
    assert "\n" not in msg and "vocabulary of head" in msg and "degree 2" in msg


def test_stage_the_runtime_cannot_shard_runs_whole(tmp_path: Path) -> None:
    plan = _plan("tiny-unet", [(0, 1), (4, 2)])  # the up path has transposed convolutions
    r = execute(plan, n_micro=1, trace_path=None)
    assert r.reference_ok and r.max_abs_error < 1e-4
    assert [s.sharded for s in r.stages] == [False, False] and r.stages[1].tp == 2
    assert any("cannot be sharded" in n and "ConvTranspose2d" in n for n in r.notes)


def test_ray_pipeline_matches_reference(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'kcloud[ray]')")
    assert not ray.is_initialized()
    r = execute(_plan("tiny-gpt", [(0, 1), (3, 1)]), n_micro=2, trace_path=None,
                ray_address="local")
    assert r.executor == "ray" and r.reference_ok and r.max_abs_error < 1e-4
    assert len(r.stages) == 2 and all(s.measured_compute_s > 0 for s in r.stages)
    assert not ray.is_initialized()  # the local instance it started is stopped
