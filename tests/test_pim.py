"""Decode attention offloaded to PIM: the cost composition by hand, the planner's matrices
against it, the search against brute force, the plan file, the CLI."""

from __future__ import annotations

import itertools
import json
import math
import re

import numpy as np
import pytest

from kcloud.errors import KCloudError
from kcloud.graph.layergraph import OpClass
from kcloud.hardware.catalog import get_device
from kcloud.hardware.cluster import cluster_from_dict, load_cluster
from kcloud.hardware.cost import MEMORY_HEADROOM, Precisions, default_calibration
from kcloud.hardware.steps import (
    Offload,
    OffloadGroup,
    StageTables,
    StepTables,
    attention_only,
    dense_only,
    generation_cost,
    offload_tables,
    plan_cost,
    stage_tables_for,
)
from kcloud.planner.api import make_plan
from kcloud.planner.evaluate import evaluate
from kcloud.planner.goal import Goal, GoalError
from kcloud.planner.model import ModelGraphs
from kcloud.planner.plan import Plan
from kcloud.planner.search import make_context, min_latency, min_period, per_item_family
from kcloud.planner.space import NET, StageSpace, build_types, offload_counts
from kcloud.precision import Precision
from tests.test_planner import decoder

# ---------------------------------------------------------------------------------------------
# The composition, by hand


def test_sequenced_decode_step_adds_both_sides_and_the_transfers():
    g = OffloadGroup(tp=2, count=4, n_layers=2, npu_idle_w=10.0, pim_idle_w=1.0)
    # dense 3 ms / 0.6 J per NPU, attention 2 ms / 0.02 J per PIM, transfers 1 ms
    t, e, piped = g.decode(1, 3e-3, 0.6, 0.0, 0.0, 2e-3, 0.02, 0.0, 0.0, 1e-3, 0.0)
    assert t == pytest.approx(6e-3)
    # NPU: 0.6 J + 10 W x 3 ms waiting; PIM: 0.02 J + 1 W x 4 ms; 4 PIM over 2 NPU devices
    assert e == pytest.approx(0.6 + 0.03 + 2.0 * (0.02 + 0.004))
    assert not piped
    assert g.idle_w == pytest.approx(10.0 + 2.0 * 1.0)


def test_pipelined_decode_step_overlaps_two_sub_batches():
    g = OffloadGroup(tp=1, count=2, n_layers=4, npu_idle_w=10.0, pim_idle_w=1.0)
    # full batch: dense 4 ms, attention 4 ms, transfers 1 ms: sequenced 9 ms
    # half batch: dense 2.5 ms (its weights read again), attention 2 ms, transfers 0.6 ms
    t, e, piped = g.decode(8, 4e-3, 0.8, 2.5e-3, 0.5, 4e-3, 0.04, 2e-3, 0.02, 1e-3, 0.6e-3)
    d2, p2 = 5e-3, 2 * (2e-3 + 0.6e-3)  # the two sides over both sub-batches
    assert piped
    assert t == pytest.approx(max(d2, p2) + min(d2, p2) / 8)  # + fill of half a layer
    assert e == pytest.approx(1.0 + 10.0 * (t - d2) + 2 * (0.04 + 1.0 * (t - 4e-3)))
    # a batch of one cannot be split: sequenced
    t1, _, p1 = g.decode(1, 4e-3, 0.8, 2.5e-3, 0.5, 4e-3, 0.04, 2e-3, 0.02, 1e-3, 0.6e-3)
    assert not p1 and t1 == pytest.approx(9e-3)


def test_prefill_moves_its_kv_layer_by_layer_behind_the_compute():
    g = OffloadGroup(tp=1, count=1, n_layers=10, npu_idle_w=10.0, pim_idle_w=2.0)
    t, e = g.prefill(0.1, 5.0, 0.02)
    assert t == pytest.approx(0.1 + 0.02 / 10)
    assert e == pytest.approx(5.0 + 10.0 * 0.002 + 2.0 * t)
    t, _ = g.prefill(0.01, 1.0, 0.05)  # the move is the longer: the compute hides behind
    assert t == pytest.approx(0.05 + 0.01 / 10)


def test_offload_counts_stay_within_the_nodes_pim_per_device():
    assert offload_counts(4.0, 2) == (8, 4, 2)
    assert offload_counts(1.0, 1) == (1,)
    assert offload_counts(0.5, 1) == ()
    assert offload_counts(2.0, 3) == (4, 2, 1)


# ---------------------------------------------------------------------------------------------
# A stage's step on real tables

HID, KVH, HEADS, PROMPT, OUT = 4096, 32, 32, 512, 64  # MHA: each KV element used once


def mha_llm(n_layers: int = 3, prompt: int = PROMPT, out: int = OUT) -> ModelGraphs:
    args = dict(n_layers=n_layers, hidden=HID, ffn=11008, kv_heads=KVH, heads=HEADS)
    pre = decoder(**args, seq=prompt, phase="prefill", kv_len=None)  # type: ignore[arg-type]
    dec = decoder(**args, seq=prompt, phase="decode",  # type: ignore[arg-type]
                  kv_len=prompt + out // 2)
    return ModelGraphs("synthetic-llm", pre, dec, out)


NPU, PIM = get_device("rebellions-atom"), get_device("samsung-hbm-pim")
LINK = (40e9, 3e-6)


def offloaded(m: ModelGraphs, count: int) -> tuple[StageTables, StageTables]:
    prec = Precision.INT8
    base = StageTables(StepTables(m.forward, m.decode, NPU, prec))
    off = StageTables(StepTables(m.forward, dense_only(m.decode), NPU, prec),
                      offload=Offload(offload_tables(m.decode, PIM, count, prec), LINK))
    return base, off


def test_attention_runs_at_the_pim_roofline_and_scales_with_the_group():
    m = mha_llm()
    prec = Precision.FP16  # HBM-PIM computes in fp16: the KV cache it holds is fp16
    cal = default_calibration().params(PIM)
    b, ctx = 4, 2000
    for count in (1, 4):
        tab = offload_tables(m.decode, PIM, count, Precision.INT8)
        assert tab.precision is prec
        st = StageTables(tab)
        per_tok = (st.step(b, b * ctx).time_s - st.step(b, 0).time_s) / (b * ctx)
        # by hand, per KV token over the 3 blocks: K and V (2 x HID fp16 values) read once,
        # 4 x HID FLOPs (QK and PV) on the PIM units at their attention efficiency
        # (the slope comes from the decode graph as captured, at kv_len tokens, over
        # kv_len + 1 tokens per row: the captured step's own token included)
        layers, cap = 3, m.decode.kv_len
        bw = PIM.memory_bw.value * cal.memory_eff * count
        mem = layers * 2 * HID * 2 * cap * b / bw
        k = 2 * cap  # reduction length of the attention op: its FLOPs / 2 / outputs
        fill = min(1.0, HID * b / count / cal.sat_elems) * k / (k + cal.k_half)
        rate = max(PIM.peak(prec) * cal.matrix_eff * cal.matmul_factor
                   * cal.attention_factor * fill, PIM.peak(prec) * cal.vector_ratio) * count
        comp = layers * 4 * HID * cap * b / rate
        # less what the step costs without KV: the rows' q, k, v and output, fp16
        act = layers * (4 * HID) * b * 2 / bw
        want = (max(comp, mem + act) - act) / (b * (cap + 1))
        assert per_tok == pytest.approx(want, rel=1e-9)


def test_a_sequenced_step_is_the_dense_side_plus_pim_plus_transfers():
    m = mha_llm()
    _, off = offloaded(m, 2)
    kv = 700
    c = off.step(1, kv)
    dense = StageTables(StepTables(m.forward, dense_only(m.decode), NPU, Precision.INT8))
    d = dense.step(1, 0)
    a = StageTables(offload_tables(m.decode, PIM, 2, Precision.INT8)).step(1, kv)
    # per layer: the query, new K and new V out (3 x HID), the output back (HID), int8
    n_attn = 3
    xfer = 2 * 5 * LINK[1] + n_attn * 4 * HID * 1 / LINK[0]
    assert c.time_s == pytest.approx(d.time_s + a.time_s + xfer, rel=1e-9)
    assert not off.offload_pipelined(1, kv)
    # the NPU side holds no KV: its decode graph has no attention left
    assert all(o.op_class is not OpClass.ATTENTION
               for layer in dense_only(m.decode).layers for o in layer.ops)
    assert all(o.op_class is OpClass.ATTENTION
               for layer in attention_only(m.decode).layers for o in layer.ops)


def test_kv_capacity_of_an_offloaded_stage_is_the_pim_groups_memory():
    m = mha_llm()
    base, off = offloaded(m, 4)
    # K and V of 3 blocks in fp16, over 4 devices (heads split); as every KV figure, per
    # token of the captured step's kv_len + 1
    cap = m.decode.kv_len
    per_tok = 3 * 2 * HID * 2 / 4 * cap / (cap + 1)
    want = int(PIM.memory_bytes.value * MEMORY_HEADROOM // per_tok)
    assert off.kv_token_capacity() == want
    assert base.kv_token_capacity() != want


def test_offload_pays_off_at_long_contexts_and_large_batches_only():
    """The trend AttAcc and NeuPIMs report: attention's share of a decode step (and so what
    PIM saves) grows with the context and the batch; at batch 1 with a short context the
    transfers and the PIM's fixed costs eat the gain."""
    m = mha_llm()
    base, off = offloaded(m, 8)

    def gain(b: int, ctx: int) -> float:
        return base.step(b, b * ctx).time_s / off.step(b, b * ctx).time_s

    assert gain(32, 4000) > gain(4, 4000) > gain(4, 256)
    assert gain(32, 4000) > 1.5
    assert gain(1, 64) < 1.0


def test_plan_cost_prices_an_offloaded_stage_as_the_planner_does():
    m = mha_llm()
    cl = cluster_from_dict({"name": "one", "nodes": [
        {"name": "n", "devices": {"rebellions-atom": 1, "samsung-hbm-pim": 2},
         "link": {"bandwidth_gbps": 40, "latency_us": 3}}]}, "one")
    goal = Goal(objective="energy", attention_offload="on")
    out = make_plan(m, cl, goal, micro_batches=[2])
    st = out.plan.replicas[0].stages
    assert any(s.attention_offload is not None for s in st)
    pc = plan_cost(out.plan, cl, None, m.forward, m.decode, m.output_tokens)
    for s, c in zip(st, pc.stages[0], strict=True):
        assert c.time_s == pytest.approx(s.time_s, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# The planner's matrices are StageTables' figures


def pim_cluster(nodes: int = 2, npu: int = 1, pim: int = 1):
    return cluster_from_dict({
        "name": "npu-pim",
        "network": {"bandwidth_gbps": 10, "latency_us": 20},
        "nodes": [{"name": "n", "count": nodes,
                   "devices": {"rebellions-atom": npu, "samsung-hbm-pim": pim},
                   "link": {"bandwidth_gbps": 40, "latency_us": 3}}],
    }, "npu-pim")


def scalar_stage(sp: StageSpace, o: int, i: int, j: int) -> tuple[float, float]:
    """(time, energy per NPU device) of option o over [i, j) per micro-batch, from
    StageTables: the prompt's pass, then the decode steps at the captured KV length."""
    opt = sp.options[o]
    t = sp.types[opt.type]
    m = sp.model

    class S:
        start, end, device_type, precision = i, j, t.id, t.precision.value
        devices = tuple(range(opt.tp))

    off = None
    if opt.offload:
        off = (sp.types[opt.pim].device, opt.pim_count, (t.link.bandwidth, t.link.latency))
    st = stage_tables_for(S, m.forward, m.decode, t.device,
                          (t.link.bandwidth, t.link.collective_s), sp.calibration,
                          offload=off)
    b = sp.b
    pre = st.forward(b)
    dec = st.step(b, b * st.tables.captured_kv_tokens)
    g = generation_cost(pre.time_s, pre.energy_j, dec.time_s, dec.energy_j, m.output_tokens)
    return float(g.time_s), float(g.energy_j)


@pytest.mark.parametrize("b", [1, 4])
def test_offload_matrices_equal_stage_tables(b):
    m, cl = mha_llm(), pim_cluster(npu=1, pim=4)
    types, _ = build_types(cl, m, Goal())
    sp = StageSpace(m, types, cl.network, b)
    offs = [o for o in sp.options if o.offload]
    assert {o.pim_count for o in offs} == {4, 2, 1}
    for o in offs:
        for i in range(m.n_layers):
            for j in range(i + 1, m.n_layers + 1):
                if not np.isfinite(sp.time[o.index, i, j]):
                    continue
                t, e = scalar_stage(sp, o.index, i, j)
                assert sp.time[o.index, i, j] == pytest.approx(t, rel=1e-9)
                assert sp.busy_j[o.index, i, j] == pytest.approx(e, rel=1e-9)


def test_modes_on_and_off_shape_the_options():
    m, cl = mha_llm(), pim_cluster()
    types, _ = build_types(cl, m, Goal())
    npu = next(t.index for t in types if t.id == "rebellions-atom")
    for mode, plain, off in (("auto", True, True), ("on", False, True), ("off", True, False)):
        sp = StageSpace(m, types, cl.network, 1, offload=mode)
        mine = [o for o in sp.options if o.type == npu]
        assert any(not o.offload for o in mine) is plain
        assert any(o.offload for o in mine) is off
    with pytest.raises(GoalError, match="attention offload"):
        Goal(attention_offload="sometimes")


# ---------------------------------------------------------------------------------------------
# The search against brute force: every partition x option per stage (with and without
# offload, PIM stages too), costed from StageTables


def brute_chains(ctx, b: int):
    sp = ctx.space(b)
    m = sp.model
    L = m.n_layers
    opts = ctx.options(b, ctx.restrictions[0][1])
    cache: dict[tuple[int, int, int], tuple[float, float] | None] = {}

    def stage(o: int, i: int, j: int):
        if (o, i, j) not in cache:
            fits = np.isfinite(sp.time[o, i, j])  # memory: the space's own check
            if fits and sp.options[o].offload:  # and the PIM group's KV capacity, by hand
                opt = sp.options[o]
                tab = offload_tables(m.decode, sp.types[opt.pim].device, opt.pim_count,
                                     sp.types[opt.type].precision)
                cap = StageTables(tab, i, j).kv_token_capacity()
                assert cap >= sp.in_flight * b * m.context_tokens
            cache[(o, i, j)] = scalar_stage(sp, o, i, j) if fits else None
        return cache[(o, i, j)]

    limits = dict(ctx.limits.per_type)
    out = []
    for n_cuts in range(L):
        for cuts in itertools.combinations(range(1, L), n_cuts):
            ranges = list(itertools.pairwise([0, *cuts, L]))
            for chosen in itertools.product(opts, repeat=len(ranges)):
                costs = [stage(o, i, j) for o, (i, j) in zip(chosen, ranges, strict=True)]
                if any(c is None for c in costs):
                    continue
                use: dict[int, int] = {}
                for o in chosen:
                    opt = sp.options[o]
                    use[opt.type] = use.get(opt.type, 0) + opt.tp
                    if opt.offload:
                        use[opt.pim] = use.get(opt.pim, 0) + opt.pim_count
                if any(n > limits[t] for t, n in use.items()):
                    continue
                # one device of each type per node: every cut crosses the network
                trans = [float(sp.trans[sp.options[o].type, NET, j])
                         for o, (_, j) in zip(chosen[:-1], ranges[:-1], strict=True)]
                if trans:
                    trans.append(float(sp.feedback[sp.options[chosen[0]].type, NET]))
                times = [c[0] for c in costs]  # type: ignore[index]
                period = max(times + trans)
                energy = sum(sp.options[o].tp * c[1] + sp.opt_idle_w[o] * (period - c[0])
                             for o, c in zip(chosen, costs, strict=True))  # type: ignore[index]
                latency = float(sp.arrival[sp.options[chosen[0]].type]) + sum(times) + sum(trans)
                total = ctx.goal.max_devices
                if total is not None and sum(use.values()) > total:
                    continue
                out.append((chosen, latency, energy / sp.items, sp.items / period))
    return out


@pytest.mark.parametrize("b", [1, 4])
def test_latency_with_offload_matches_brute_force(b):
    m, cl = mha_llm(), pim_cluster()
    ctx = make_context(m, cl, Goal(objective="latency", batch=b))
    chains = brute_chains(ctx, b)
    assert any(any(ctx.space(b).options[o].offload for o in c[0]) for c in chains)
    best = min(c[1] for c in chains)
    p = min_latency(ctx, b, ctx.options(b, ctx.restrictions[0][1]), np.array([np.inf]))[0]
    assert p is not None
    assert evaluate(ctx.space(b), p, b).latency_s == pytest.approx(best, rel=1e-9)


@pytest.mark.parametrize("b", [1, 4])
def test_throughput_with_offload_matches_brute_force(b):
    m, cl = mha_llm(), pim_cluster()
    ctx = make_context(m, cl, Goal(batch=2, attention_offload="auto"), micro_batches=[b])
    chains = brute_chains(ctx, b)
    t = min_period(ctx, b, ctx.options(b, ctx.restrictions[0][1]))
    assert t is not None
    assert t.throughput == pytest.approx(max(c[3] for c in chains), rel=1e-9)


@pytest.mark.parametrize("b", [1, 4])
@pytest.mark.parametrize("mode", ["auto", "on"])
@pytest.mark.parametrize("max_devices", [None, 2])
def test_energy_with_offload_matches_brute_force(b, mode, max_devices):
    """The PIM group's devices count against a device budget (and their type's count)."""
    m, cl = mha_llm(), pim_cluster()
    ctx = make_context(m, cl, Goal(objective="energy", attention_offload=mode,
                                   max_devices=max_devices), micro_batches=[b])
    chains = brute_chains(ctx, b)
    found = per_item_family(ctx, b, ctx.options(b, ctx.restrictions[0][1]), "energy")
    assert min(t.objective("energy") for t in found) == pytest.approx(
        min(c[2] for c in chains), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# The plan says it


def test_offloaded_plan_round_trips_and_names_its_pim_devices():
    m, cl = mha_llm(), pim_cluster(nodes=1, npu=1, pim=4)
    out = make_plan(m, cl, Goal(objective="energy", attention_offload="on"),
                    micro_batches=[4])
    p = out.plan
    off = [s for r in p.replicas for s in r.stages if s.attention_offload]
    assert off
    for s in off:
        a = s.attention_offload
        assert a.count == len(a.devices)
        assert {d.split("/")[0] for d in a.devices} == {s.devices[0].split("/")[0]}
        assert all(f"/{a.device_type}/" in d for d in a.devices)
    doc = json.loads(p.to_json())
    stages = [st for r in doc["replicas"] for st in r["stages"]]
    assert all(("attention_offload" in st) == (st["device_type"] == "rebellions-atom")
               for st in stages)
    assert Plan.from_dict(doc) == p
    assert len(set(p.devices)) == len(p.devices)
    plain = make_plan(m, cl, Goal(objective="energy", attention_offload="off"),
                      micro_batches=[4]).plan
    assert not any("attention_offload" in st for r in plain.to_dict()["replicas"]
                   for st in r["stages"])
    bad = json.loads(p.to_json())
    bad["replicas"][0]["stages"][0]["attention_offload"] = {"device_type": "x", "count": 0}
    with pytest.raises(KCloudError, match="attention_offload"):
        Plan.from_dict(bad)


def test_the_why_section_says_chosen_or_rejected_and_by_how_much():
    from kcloud.planner.explain import reasons

    m, cl = mha_llm(), pim_cluster(nodes=1, npu=1, pim=4)
    for mode, word in (("on", "decode attention on samsung-hbm-pim"),
                       ("off", "not searched (--attention-offload off)")):
        out = make_plan(m, cl, Goal(objective="energy", attention_offload=mode),
                        micro_batches=[4])
        text = "\n".join(reasons(out.result.ctx, out.plan))
        assert word in text
    auto = make_plan(m, cl, Goal(objective="energy"), micro_batches=[4])
    text = "\n".join(reasons(auto.result.ctx, auto.plan))
    assert ("chosen: the stage takes" in text) or ("attention offload rejected" in text)
    assert re.search(r"\d+% (less|more)", text)


def test_rack_2028_puts_pim_beside_every_npu():
    cl = load_cluster("k-cloud-rack-2028")
    for n in cl.nodes:
        kinds = {get_device(d).kind.value for d, _ in n.devices}
        assert kinds == {"npu", "pim"}
    m = mha_llm()
    types, _ = build_types(cl, m, Goal())
    hosts = [t for t in types if t.pim_ratio]
    assert {t.id for t in hosts} == {"rebellions-atom-max", "furiosa-rngd"}
    assert math.isclose(dict(next(t for t in hosts if t.id == "rebellions-atom-max")
                             .pim_ratio)[next(t.index for t in types
                                              if t.id == "samsung-hbm-pim")], 4.0)


def test_precisions_of_the_pim_side():
    # an int8 stage's KV cache is held at the PIM's own fp16 (twice the bytes)
    assert Precisions.of(Precision.FP16).kv_bytes == 2 * Precisions.of(Precision.INT8).kv_bytes


# ---------------------------------------------------------------------------------------------
# kcloud run of an offloaded plan (emulated): the attention in the PIM group's own worker


def _offloaded_plan(tmp_path, tp: int):
    import yaml

    from kcloud.planner.plan import AttentionOffload, Predicted, Replica, Stage

    path = tmp_path / "npu-pim.yaml"
    path.write_text(yaml.safe_dump({"name": "npu-pim", "nodes": [
        {"name": "n", "devices": {"rebellions-atom": 2, "samsung-hbm-pim": 2},
         "link": {"bandwidth_gbps": 40, "latency_us": 3}}]}))
    atoms = tuple(f"n/rebellions-atom/{k}" for k in range(tp))
    stages = (
        Stage(0, 3, "rebellions-atom", atoms, "int8", time_s=1e-3,
              attention_offload=AttentionOffload("samsung-hbm-pim", 2,
                                                 ("n/samsung-hbm-pim/0", "n/samsung-hbm-pim/1"))),
        Stage(3, 7, "host-cpu:1core", ("local/host-cpu:1core/0",), "fp32", time_s=1e-3),
    )
    return Plan(model="tiny-gpt", cluster=str(path), objective="energy", batch=4,
                micro_batch=2, seq_len=8, phase="prefill", n_layers=7,
                replicas=(Replica(stages),),
                predicted=Predicted(2e-2, 500.0, "tokens/s", 10.0, 0.01, 0.0, None, 0.1),
                output_tokens=6)


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_run_of_an_offloaded_plan_attends_in_the_pim_worker(tmp_path, tp):
    from kcloud.runtime import execute

    plan = _offloaded_plan(tmp_path, tp)
    r = execute(plan, mode="emulated", n_micro=2, trace_path=None, warmup=1, probes=1)
    assert r.reference_ok and r.measured["tokens_match"]
    note = next(n for n in r.notes if "decode attention ran in the worker of its PIM group"
                in n)
    # 2 blocks in stage 0, one call per block per step and per rank, 6 steps per sequence
    # batch: warm-up, probe and 2 micro-batches of the stream
    calls = int(re.search(r"([\d,]+) attention calls", note).group(1).replace(",", ""))
    assert calls > 0 and calls % (2 * tp) == 0
    # the stage's modeled prefill and decode step are steps.py's, the PIM side included
    from kcloud.runtime.executor import _offload_costs
    from kcloud.runtime.model import layer_graph

    pre = layer_graph("tiny-gpt", batch=2, seq_len=8, phase="prefill")
    dec = layer_graph("tiny-gpt", batch=2, seq_len=1, phase="decode", kv_len=8 + 6 // 2)
    want = _offload_costs(plan, plan.replicas[0].stages[0], pre, dec)
    s0 = r.stages[0]
    assert s0.figures == "modeled"
    assert s0.predicted_prefill_s == pytest.approx(want[0])
    assert s0.predicted_decode_s == pytest.approx(want[1])
    no_pim = stage_tables_for(plan.replicas[0].stages[0], pre, dec,
                              get_device("rebellions-atom"), (40e9, 3e-6))
    assert want[1] != pytest.approx(no_pim.step(2, 2 * no_pim.tables.captured_kv_tokens).time_s)


def test_the_simulator_prices_an_offloaded_plan_with_its_pim_group():
    from kcloud.sim.replica import replica_models

    m, cl = mha_llm(), pim_cluster(nodes=1, npu=1, pim=4)
    plan = make_plan(m, cl, Goal(objective="energy", attention_offload="on"),
                     micro_batches=[4]).plan
    [rep] = replica_models(plan, cl, m.forward, m.decode)[:1]
    for st, s in zip(rep.stages, plan.replicas[0].stages, strict=True):
        if s.attention_offload is None:
            assert st.offload is None
            continue
        assert st.offload is not None and st.offload.count == s.attention_offload.count
        assert st.kv_token_capacity() == st.attention.kv_token_capacity()
        # and its step is the one plan_cost and the planner priced
        assert st.step(4, 4 * st.tables.captured_kv_tokens).time_s > 0


def test_manifests_of_an_offloaded_plan_ask_for_its_pim_devices():
    from kcloud.k8s.manifests import plan_groups

    m, cl = mha_llm(), pim_cluster(nodes=1, npu=1, pim=4)
    plan = make_plan(m, cl, Goal(objective="energy", attention_offload="on"),
                     micro_batches=[4]).plan
    groups = {g.device_type: g for g in plan_groups(plan)}
    used = sum(s.attention_offload.count for r in plan.replicas for s in r.stages
               if s.attention_offload)
    assert used and "samsung-hbm-pim" in groups
    assert sum(1 for d in plan.devices if "/samsung-hbm-pim/" in d) >= used
    assert groups["samsung-hbm-pim"].resource == get_device("samsung-hbm-pim").k8s_resource
