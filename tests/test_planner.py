"""The planner: exact against brute force on small instances, valid plans, errors, CLI."""

from __future__ import annotations

import itertools
import json
import math
import random
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

from kcloud.errors import KCloudError
from kcloud.graph.layergraph import Layer, LayerGraph, Op, OpClass, TPGroup, TPStyle
from kcloud.hardware.catalog import get_device
from kcloud.hardware.cluster import Cluster, Link, cluster_from_dict, load_cluster
from kcloud.hardware.cost import (
    Calibration,
    Precisions,
    default_calibration,
    layer_table,
    refill_time_s,
    usable_memory,
)
from kcloud.planner.api import make_plan
from kcloud.planner.baselines import compare
from kcloud.planner.dp import Limits, make_batch, solve
from kcloud.planner.evaluate import evaluate
from kcloud.planner.goal import Goal, GoalError, InfeasibleGoal
from kcloud.planner.ilp import best_counts
from kcloud.planner.model import ModelGraphs
from kcloud.planner.plan import Plan
from kcloud.planner.search import make_context, min_period, per_item_family
from kcloud.planner.space import StageSpace, build_types, stage_matrices
from kcloud.predict import PREFILL_CHUNK_TOKENS
from tests.conftest import mlp_graph

# ---------------------------------------------------------------------------------------------
# Small instances


def small_cluster(atom_nodes: int = 2, per_node: int = 2, rngd: int = 2) -> Cluster:
    """Two device types, few devices: ATOM (16 GiB) x per_node on each of atom_nodes nodes,
    and one node of RNGD (48 GiB)."""
    return cluster_from_dict({
        "name": "small",
        "network": {"bandwidth_gbps": 10, "latency_us": 20},
        "nodes": [
            {"name": "a", "count": atom_nodes, "devices": {"rebellions-atom": per_node},
             "link": {"bandwidth_gbps": 40, "latency_us": 3}},
            {"name": "r", "devices": {"furiosa-rngd": rngd},
             "link": {"bandwidth_gbps": 30, "latency_us": 4}},
        ],
    }, "small")


def big_mlp(n_layers: int = 5) -> ModelGraphs:
    """Layers of ~8.6 GB at 8 bits: one fits an ATOM alone, three a pair; memory binds."""
    return ModelGraphs("synthetic-mlp", mlp_graph(n_layers=n_layers, hidden=32768, tokens=16))


def decoder(n_layers: int, hidden: int, ffn: int, kv_heads: int, heads: int, seq: int,
            phase: str, kv_len: int | None, vocab: int = 32000) -> LayerGraph:
    """A LLaMA-like decoder graph at batch 1 (embedding, blocks, head)."""
    tok = 1 if phase == "decode" else seq
    kvd = kv_heads * hidden // heads
    layers = [Layer(0, "embed", "Embedding",
                    (Op(OpClass.EMBEDDING, 0.0, vocab * hidden, tok, tok * hidden),),
                    vocab * hidden, tok * hidden, tp=(TPGroup(TPStyle.VOCAB, ("embed",), (),
                                                              8, vocab * hidden, tok * hidden),))]
    for n in range(n_layers):
        attn = 2 * hidden * hidden + 2 * hidden * kvd
        mlp = 3 * hidden * ffn
        ctx = kv_len if phase == "decode" else seq
        kv = 2 * kvd * ctx if phase == "decode" else 0
        ops = (
            Op(OpClass.MATMUL, 2.0 * tok * attn, attn, tok * hidden, tok * (hidden + 2 * kvd)),
            Op(OpClass.ATTENTION, 4.0 * tok * ctx * hidden, 0, 3 * tok * hidden + kv,
               tok * hidden, kv),
            Op(OpClass.ELEMENTWISE, 10.0 * tok * hidden, 2 * hidden, tok * hidden, tok * hidden),
            Op(OpClass.MATMUL, 2.0 * tok * mlp, mlp, tok * hidden, 2 * tok * ffn),
        )
        tp = (TPGroup(TPStyle.HEADS, ("qkv",), ("o",), kv_heads, attn, tok * hidden),
              TPGroup(TPStyle.MLP, ("up",), ("down",), 8, mlp, tok * hidden))
        layers.append(Layer(n + 1, f"layers.{n}", "Block", ops, attn + mlp + 2 * hidden,
                            tok * hidden, tp=tp))
    layers.append(Layer(n_layers + 1, "head", "Linear",
                        (Op(OpClass.MATMUL, 2.0 * tok * vocab * hidden, vocab * hidden,
                            tok * hidden, tok * vocab),), vocab * hidden, tok * vocab,
                        tp=(TPGroup(TPStyle.VOCAB, ("head",), (), 8, vocab * hidden,
                                    tok * vocab),)))
    meta = {"is_llm": True, "kv_elems_per_token": 2 * kvd * n_layers}
    return LayerGraph("synthetic-llm", tuple(layers), 1, tok, phase, kv_len, 0, 0, 2, meta)


def llm(prompt: int, out: int, **shape: int) -> ModelGraphs:
    """A decoder of `shape` (layers, widths, heads) with its prefill and decode graphs."""
    pre = decoder(**shape, seq=prompt, phase="prefill", kv_len=None)  # type: ignore[arg-type]
    dec = decoder(**shape, seq=prompt, phase="decode",  # type: ignore[arg-type]
                  kv_len=prompt + out // 2)
    return ModelGraphs("synthetic-llm", pre, dec, out)


def small_llm(prompt: int = 64, out: int = 32) -> ModelGraphs:
    return llm(prompt, out, n_layers=3, hidden=12288, ffn=32768, kv_heads=8, heads=96)


def deep_llm(prompt: int = 256, out: int = 256) -> ModelGraphs:
    """A 70B-wide decoder of 8 layers: its pipelines grow deep where memory binds."""
    return llm(prompt, out, n_layers=8, hidden=8192, ffn=28672, kv_heads=8, heads=64)


# ---------------------------------------------------------------------------------------------
# Brute force: every contiguous partition x option per stage x link choice, costed directly
# from LayerTable.stage and Link.transfer_s (independent of the planner's matrices).


@dataclass
class Chain:
    stages: list[tuple[str, int, int, int]]  # (type id, tp, start, end)
    latency: float
    period: float
    items: int
    energy: float  # per period, all devices
    price_s: float  # USD per second of all devices
    usage: dict[str, int]

    def request_latency(self, batch: int, b: int) -> float:
        return self.latency + max(0, math.ceil(batch / b) - 1) * self.period


def _peak_act(g: LayerGraph) -> list[float]:
    return [max(max(0, o.in_elems + o.out_elems - o.kv_elems) for o in layer.ops) / g.batch
            for layer in g.layers]


_BRUTE: dict[tuple[object, ...], list[Chain]] = {}


def brute_force(model: ModelGraphs, cluster: Cluster, goal: Goal, b: int,
                cal: Calibration | None = None) -> list[Chain]:
    key = (model.spec, model.n_layers, tuple(n.devices for n in cluster.nodes), goal.precision,
           b, None if cal is None else json.dumps(cal.to_dict(), sort_keys=True))
    if key not in _BRUTE:
        _BRUTE[key] = _brute_force(model, cluster, goal, b, cal or default_calibration())
    return _BRUTE[key]


def _brute_force(model: ModelGraphs, cluster: Cluster, goal: Goal, b: int,
                 cal: Calibration) -> list[Chain]:
    types, _ = build_types(cluster, model, goal)
    L = model.n_layers
    fwd = model.forward
    peak = _peak_act(fwd)
    cost: dict[tuple[int, int], object] = {}
    options = [(t, tp) for t in types for tp in t.tps]
    for t, tp in options:
        link = (t.link.bandwidth, t.link.latency)
        params = cal.params(t.device)
        pre = layer_table(fwd, t.device, t.precision, b, params, tp, link)
        dec = (None if model.decode is None else
               layer_table(model.decode, t.device, t.precision, b, params, tp, link))
        cost[(t.index, tp)] = (pre, dec)

    def stage(t_idx: int, tp: int, i: int, j: int) -> tuple[float, float, float] | None:
        t = types[t_idx]
        pre, dec = cost[(t_idx, tp)]  # type: ignore[misc]
        p = Precisions.of(t.precision)
        a = pre.stage(i, j)
        w = float(sum(pre.weight_bytes[i:j]))
        if dec is None:
            time, energy = a.time_s, a.power_w(t.device) * a.time_s
            mem = w + 2 * b * max(peak[i:j]) * p.act_bytes / tp
        else:
            d = dec.stage(i, j)
            n = model.output_tokens - 1  # the prompt's pass gives the first token
            time = a.time_s + n * d.time_s
            energy = a.power_w(t.device) * a.time_s + n * d.power_w(t.device) * d.time_s
            kv = float(sum(model.kv_elems_per_token[i:j])) * p.kv_bytes
            work = max(peak[i:j]) / model.prompt_tokens * p.act_bytes
            mem = w + (2 * b * model.context_tokens * kv
                       + min(b * model.prompt_tokens, PREFILL_CHUNK_TOKENS) * work) / tp
        if mem > usable_memory(t.device):
            return None
        if tp > 1:  # the group's lead broadcasts each hop it receives to the other ranks
            tree = Link(t.link.bandwidth, t.link.collective_s)
            if i > 0:
                time += math.log2(tp) * transfer(t_idx, tree, i)
            elif j < L and model.decode is not None:  # the fed-back token of each step
                time += math.log2(tp) * (model.output_tokens - 1) * tree.transfer_s(8 * b)
        # a request's first pass refills what of the stage's weights the device's cache held
        return time, energy, float(refill_time_s(cal.params(t.device), t.device, w))

    def transfer(t_idx: int, link: Link, cut: int) -> float:
        act = Precisions.of(types[t_idx].precision).act_bytes
        s = link.transfer_s(fwd.layers[cut - 1].cut_elems * b / fwd.batch * act)
        if model.decode is not None:
            d = model.decode
            s += (model.output_tokens - 1) * link.transfer_s(d.layers[cut - 1].cut_elems * b
                                                             / d.batch * act)
        return s

    chains: list[Chain] = []
    for n_cuts in range(L):
        for cuts in itertools.combinations(range(1, L), n_cuts):
            bounds = [0, *cuts, L]
            ranges = list(itertools.pairwise(bounds))
            for opts in itertools.product(options, repeat=len(ranges)):
                st = [stage(t.index, tp, i, j) for (t, tp), (i, j) in zip(opts, ranges,
                                                                          strict=True)]
                if any(s is None for s in st):
                    continue
                usage: dict[str, int] = {}
                for t, tp in opts:
                    usage[t.id] = usage.get(t.id, 0) + tp
                if any(usage[t.id] > t.count for t in types if t.id in usage):
                    continue
                # link choices: same type may share the node while the run fits it
                # same type: share the node while the run fits it, or (with a second node
                # of that type) start on another node
                choices = []
                for k in range(len(ranges) - 1):
                    t = opts[k][0]
                    same = t.index == opts[k + 1][0].index
                    choices.append(((0, 1) if len(t.nodes) > 1 else (0,)) if same else (1,))
                for links in itertools.product(*choices):
                    fill, ok = opts[0][1], True
                    for k, kind in enumerate(links):
                        if kind == 0:
                            fill += opts[k + 1][1]
                            ok &= fill <= opts[k][0].node_cap
                        else:
                            fill = opts[k + 1][1]
                    if not ok:
                        continue
                    times = [s[0] for s in st]  # type: ignore[index]
                    trans = []
                    for k, kind in enumerate(links):
                        t = opts[k][0]
                        trans.append(transfer(t.index, t.link if kind == 0 else
                                              cluster.network, ranges[k][1]))
                    if trans and model.decode is not None:  # tokens back to the first stage
                        t = opts[0][0]
                        link = cluster.network if max(links) else t.link
                        trans.append((model.output_tokens - 1) * link.transfer_s(8 * b))
                    period = max(times + trans)
                    energy = sum(tp * (s[1] + t.device.idle_power_w.value  # type: ignore[index]
                                       * (period - s[0]))  # type: ignore[index]
                                 for (t, tp), s in zip(opts, st, strict=True))
                    price = sum(tp * (t.price_per_hour or math.nan) / 3600 for t, tp in opts)
                    arrival = cal.params(opts[0][0].device).resume_s  # idle first stage
                    chains.append(Chain(
                        [(t.id, tp, i, j) for (t, tp), (i, j) in zip(opts, ranges, strict=True)],
                        arrival + sum(s[2] for s in st) + sum(times) + sum(trans),  # type: ignore[index]
                        period,
                        b * model.items_per_sequence, energy, price, usage))
    return chains


CASES = [
    pytest.param(big_mlp, id="mlp"),
    pytest.param(small_llm, id="llm"),
]


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make_model", CASES)
def test_stage_matrices_equal_layer_table_stage(make_model):
    model = make_model()
    cl = small_cluster()
    types, _ = build_types(cl, model, Goal())
    cal = default_calibration()
    rng = random.Random(0)
    for t in types:
        for tp in t.tps:
            table = layer_table(model.forward, t.device, t.precision, 4, cal.params(t.device), tp,
                                (t.link.bandwidth, t.link.latency))
            mats = stage_matrices(table)
            for _ in range(12):
                i = rng.randrange(model.n_layers)
                j = rng.randrange(i + 1, model.n_layers + 1)
                ref = table.stage(i, j)
                assert mats.time[i, j] == pytest.approx(ref.time_s, rel=1e-9)
                assert mats.comm[i, j] == pytest.approx(ref.comm_s, rel=1e-9, abs=1e-15)
                assert mats.power[i, j] == pytest.approx(ref.power_w(t.device), rel=1e-9)


@pytest.mark.parametrize("make_model", CASES)
@pytest.mark.parametrize("batch", [1, 4])
def test_latency_objective_matches_brute_force(make_model, batch):
    model, cl = make_model(), small_cluster()
    goal = Goal(objective="latency", batch=batch)
    chains = brute_force(model, cl, goal, batch)
    best = min(c.latency for c in chains)
    out = make_plan(model, cl, goal)
    assert out.plan.predicted.latency_s == pytest.approx(best, rel=1e-9)
    assert len(out.plan.replicas) == 1


@pytest.mark.parametrize("make_model", CASES)
@pytest.mark.parametrize("slo_factor", [None, 1.02, 1.3])
def test_single_pipeline_throughput_matches_brute_force(make_model, slo_factor):
    model, cl = make_model(), small_cluster()
    for b in (1, 2, 4):
        g0 = Goal(batch=2)
        chains = brute_force(model, cl, g0, b)
        slo = None
        if slo_factor is not None:
            slo = min(c.request_latency(2, b) for c in chains) * slo_factor
        goal = Goal(batch=2, slo_s=slo)
        ok = [c for c in chains if slo is None or c.request_latency(2, b) <= slo]
        ctx = make_context(model, cl, goal, micro_batches=[b])
        t = min_period(ctx, b, ctx.options(b, ctx.restrictions[0][1]))
        if not ok:
            assert t is None
            continue
        assert t is not None
        assert t.throughput == pytest.approx(max(c.items / c.period for c in ok), rel=1e-9)
        assert slo is None or t.request_latency_s <= slo * (1 + 1e-9)


@pytest.mark.parametrize("make_model", CASES)
@pytest.mark.parametrize("kind", ["energy", "cost"])
def test_per_item_objectives_match_brute_force(make_model, kind):
    model, cl = make_model(), small_cluster()
    goal = Goal(objective=kind)
    best_all = math.inf
    for b in (1, 2, 4):
        chains = brute_force(model, cl, goal, b)
        value = [(c.energy if kind == "energy" else c.price_s * c.period) / c.items
                 for c in chains]
        ctx = make_context(model, cl, goal, micro_batches=[b])
        found = per_item_family(ctx, b, ctx.options(b, ctx.restrictions[0][1]), kind)
        got = min(t.objective(kind) for t in found)
        assert got == pytest.approx(min(value), rel=1e-6)
        best_all = min(best_all, min(value))
    out = make_plan(model, cl, goal, micro_batches=[1, 2, 4])
    per_item = (out.plan.predicted.energy_per_item_j if kind == "energy"
                else out.plan.predicted.cost_per_item_usd)
    assert per_item == pytest.approx(best_all, rel=1e-6)


def test_device_limits_bind_exactly():
    """With one ATOM node of two devices, the best chain must fit two ATOMs and two RNGDs."""
    model, cl = big_mlp(4), small_cluster(atom_nodes=1)
    goal = Goal(objective="latency")
    chains = brute_force(model, cl, goal, 1)
    out = make_plan(model, cl, goal)
    assert out.plan.predicted.latency_s == pytest.approx(min(c.latency for c in chains),
                                                         rel=1e-9)
    goal = Goal(objective="latency", max_devices=3)
    ok = [c for c in chains if sum(c.usage.values()) <= 3]
    out = make_plan(model, cl, goal)
    assert len(out.plan.devices) <= 3
    assert out.plan.predicted.latency_s == pytest.approx(min(c.latency for c in ok), rel=1e-9)


def atom_cluster() -> Cluster:
    """One node of six ATOMs (tp 1 or 2) and a very slow network: stages share the node."""
    return cluster_from_dict({
        "name": "atoms",
        "network": {"bandwidth_gbps": 0.005, "latency_us": 50},
        "nodes": [{"name": "a", "devices": {"rebellions-atom": 6},
                   "link": {"bandwidth_gbps": 40, "latency_us": 3}}],
    }, "atoms")


@pytest.mark.parametrize("slo_factor", [None, 1.05])
def test_stages_sharing_a_node_match_brute_force(slo_factor):
    model, cl = big_mlp(5), atom_cluster()
    chains = brute_force(model, cl, Goal(), 1)
    slo = None if slo_factor is None else min(c.latency for c in chains) * slo_factor
    ok = [c for c in chains if slo is None or c.latency <= slo]
    best = min(ok, key=lambda c: (c.period, c.latency))
    goal = Goal(slo_s=slo)
    ctx = make_context(model, cl, goal, micro_batches=[1])
    t = min_period(ctx, 1, ctx.options(1, ctx.restrictions[0][1]))
    assert t is not None
    assert t.period_s == pytest.approx(best.period, rel=1e-9)
    if slo is None:
        # the optimum has consecutive stages on one node, and the plan places them so
        assert len(best.stages) >= 2 and 0 in t.path.links
        got = make_plan(model, cl, goal, micro_batches=[1]).plan
        check_valid(got, cl)
        slots = {s.id: s.node for s in cl.slots}
        nodes = [slots[st.devices[0]] for st in got.replicas[0].stages]
        assert any(a == b for a, b in itertools.pairwise(nodes))


def _chains_over(sp: StageSpace, limits: dict[int, int]):
    """Every chain the plan space allows, from the space's own matrices."""
    L = sp.L
    for n_cuts in range(L):
        for cuts in itertools.combinations(range(1, L), n_cuts):
            ranges = list(itertools.pairwise([0, *cuts, L]))
            for opts in itertools.product(sp.options, repeat=len(ranges)):
                if any(not np.isfinite(sp.time[o.index, i, j])
                       for o, (i, j) in zip(opts, ranges, strict=True)):
                    continue
                use: dict[int, int] = {}
                for o in opts:
                    use[o.type] = use.get(o.type, 0) + o.tp
                if any(use[t] > limits.get(t, 10**9) for t in use):
                    continue
                choices = [((0, 1) if len(sp.types[a.type].nodes) > 1 else (0,))
                           if a.type == b.type else (1,) for a, b in itertools.pairwise(opts)]
                for links in itertools.product(*choices):
                    fill, ok = opts[0].tp, True
                    for k, kind in enumerate(links):
                        fill = fill + opts[k + 1].tp if kind == 0 else opts[k + 1].tp
                        ok &= fill <= sp.types[opts[k].type].node_cap
                    if ok:
                        yield opts, ranges, links


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("atom_nodes", [1, 2])
def test_dp_matches_enumeration_on_random_costs(seed, atom_nodes):
    """The DP alone, on random stage and transfer costs: node fill, links and limits."""
    rng = np.random.default_rng(seed)
    model, cl = big_mlp(5), small_cluster(atom_nodes=atom_nodes, per_node=4 // atom_nodes)
    types, _ = build_types(cl, model, Goal())
    sp = StageSpace(model, types, cl.network, 1)
    n = sp.L + 1
    per_layer = rng.uniform(0.5, 3.0, (len(sp.options), sp.L))  # a stage costs its layers
    prefix = np.concatenate([np.zeros((len(sp.options), 1)), per_layer.cumsum(axis=1)], axis=1)
    sp.time = (prefix[:, None, :] - prefix[:, :, None]) * rng.uniform(0.9, 1.1, sp.time.shape)
    sp.time = np.where(rng.random(sp.time.shape) < 0.1, np.inf, sp.time)
    sp.time[:, ~np.triu(np.ones((n, n), dtype=bool), 1)] = np.inf
    sp.trans = rng.uniform(0.0, 2.0, sp.trans.shape)
    # the node link is usually the faster one, but not always (PCIe against a fast network)
    sp.trans[:, 0] *= rng.choice([0.3, 0.3, 3.0], size=(len(types), 1))
    limits = {0: int(rng.integers(1, 3)), 1: int(rng.integers(2, 5))}  # rngd, atom
    opts = list(range(len(sp.options)))
    cap = float(rng.uniform(3.0, 6.0))
    base = np.where(np.isfinite(sp.time), 0.0, np.inf)
    per = sp.opt_tp.astype(float)[None, :] * float(rng.uniform(0.0, 2.0))
    batch = make_batch(sp, opts, base, 1.0, per, np.array([cap, np.inf]))
    got = solve(sp, batch, Limits(tuple(limits.items())))
    for k, c in enumerate((cap, np.inf)):
        best = np.inf
        for chain, ranges, links in _chains_over(sp, limits):
            times = [sp.time[o.index, i, j] for o, (i, j) in zip(chain, ranges, strict=True)]
            trans = [sp.trans[chain[m].type, kind, ranges[m][1]]
                     for m, kind in enumerate(links)]
            if max(times + trans) > c:
                continue
            best = min(best, sum(times) + sum(trans) + per[0, 0] * sum(o.tp for o in chain))
        p = got[k]
        if not np.isfinite(best):
            assert p is None
            continue
        assert p is not None
        value = sum(sp.time[o, i, j] + per[0, 0] * sp.options[o].tp for o, i, j in p.stages) \
            + sum(sp.trans[sp.options[o].type, kind, j]
                  for (o, _, j), kind in zip(p.stages, p.links, strict=False))
        assert value == pytest.approx(best, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# The ILP against brute force over multisets


@dataclass
class _T:
    throughput: float
    power_w: float
    devices: tuple[tuple[int, int], ...]

    @property
    def n_devices(self) -> int:
        return sum(n for _, n in self.devices)

    @property
    def domestic_devices(self) -> int:
        return sum(n for t, n in self.devices if t == 0)


@pytest.mark.parametrize("seed", range(6))
def test_ilp_matches_brute_force_over_multisets(seed):
    rng = random.Random(seed)
    avail = {0: rng.randint(3, 8), 1: rng.randint(2, 6)}
    temps = []
    for _ in range(4):
        devs = tuple((t, rng.choice([1, 2, 4])) for t in (0, 1) if rng.random() < 0.7) or ((0, 1),)
        temps.append(_T(rng.uniform(1, 10), rng.uniform(50, 400), devs))
    cap = rng.choice([None, 900.0, 1500.0])
    max_dev = rng.choice([None, 7])
    share = rng.choice([0.0, 0.5])
    counts = best_counts(temps, avail, power_cap_w=cap, max_devices=max_dev,  # type: ignore[arg-type]
                         min_domestic_share=share)
    best = 0.0
    ranges = [range(0, 9) for _ in temps]
    for ns in itertools.product(*ranges):
        if sum(ns) == 0:
            continue
        use = {t: sum(n * dict(tp.devices).get(t, 0) for n, tp in zip(ns, temps, strict=True))
               for t in avail}
        if any(use[t] > avail[t] for t in avail):
            continue
        devs = sum(n * tp.n_devices for n, tp in zip(ns, temps, strict=True))
        if cap is not None and sum(n * tp.power_w for n, tp in zip(ns, temps, strict=True)) > cap:
            continue
        if max_dev is not None and devs > max_dev:
            continue
        dom = sum(n * tp.domestic_devices for n, tp in zip(ns, temps, strict=True))
        if dom < share * devs - 1e-9:
            continue
        best = max(best, sum(n * tp.throughput for n, tp in zip(ns, temps, strict=True)))
    if best == 0.0:
        assert counts is None
    else:
        assert counts is not None
        got = sum(n * tp.throughput for n, tp in zip(counts, temps, strict=True))
        assert got == pytest.approx(best, rel=1e-9)


# ---------------------------------------------------------------------------------------------
# Plans: validity, JSON, constraints


def check_valid(plan: Plan, cluster: Cluster) -> None:
    slots = {s.id: s for s in cluster.slots}
    seen: set[str] = set()
    for r in plan.replicas:
        assert r.stages[0].start == 0 and r.stages[-1].end == plan.n_layers
        for st in r.stages:
            nodes = {slots[d].node for d in st.devices}
            assert len(nodes) == 1, "a TP group spans nodes"
            assert {slots[d].device.id for d in st.devices} == {st.device_type}
            dev = slots[st.devices[0]].device
            assert st.memory_bytes <= usable_memory(dev)
            for d in st.devices:
                assert d not in seen
                seen.add(d)


def test_throughput_plan_is_valid_and_round_trips_json():
    model, cl = big_mlp(), small_cluster()
    out = make_plan(model, cl, Goal(objective="throughput"), micro_batches=[1, 2, 4])
    plan = out.plan
    check_valid(plan, cl)
    again = Plan.from_json(plan.to_json())
    assert again == plan
    assert plan.predicted.figures == "modeled"
    # the plan's throughput is the sum over replicas of items per period
    periods = [max(max(s.time_s, s.comm_s) for s in r.stages) for r in plan.replicas]
    assert plan.predicted.throughput == pytest.approx(
        sum(plan.micro_batch / p for p in periods), rel=1e-9)
    assert out.search_time_s > 0


def test_throughput_plan_beats_its_best_single_pipeline_when_devices_remain():
    model, cl = big_mlp(), small_cluster(atom_nodes=4)
    goal = Goal(objective="throughput")
    out = make_plan(model, cl, goal, micro_batches=[2])
    ctx = make_context(model, cl, goal, micro_batches=[2])
    single = min_period(ctx, 2, ctx.options(2, ctx.restrictions[0][1]))
    assert single is not None
    assert out.plan.predicted.throughput >= single.throughput * (1 - 1e-9)
    check_valid(out.plan, cl)


@pytest.mark.parametrize("objective", ["throughput", "energy", "latency"])
def test_plan_is_never_worse_than_the_baselines_on_small_instances(objective):
    model, cl = big_mlp(), small_cluster(atom_nodes=2, per_node=2)
    goal = Goal(objective=objective)
    mine = make_plan(model, cl, goal).plan.predicted
    rows = compare(model, cl, goal, names=("data-parallel", "megatron-uniform"))
    assert any("infeasible" not in r for r in rows)
    for r in rows:
        if "infeasible" in r:
            continue
        if objective == "throughput":
            assert mine.throughput >= r["throughput"] * (1 - 1e-9)
        elif objective == "energy":
            assert mine.energy_per_item_j <= r["energy_per_item_j"] * (1 + 1e-9)
        else:
            assert mine.latency_s <= r["latency_s"] * (1 + 1e-9)


def test_constraints_are_respected():
    model, cl = big_mlp(), small_cluster(atom_nodes=4)
    base = make_plan(model, cl, Goal(), micro_batches=[1, 2])
    cap = base.plan.predicted.power_w * 0.6
    out = make_plan(model, cl, Goal(power_cap_w=cap), micro_batches=[1, 2])
    assert out.plan.predicted.power_w <= cap * (1 + 1e-9)
    out = make_plan(model, cl, Goal(max_devices=4), micro_batches=[1, 2])
    assert len(out.plan.devices) <= 4
    # RNGD and ATOM are both domestic: a GPU-free cluster always meets a 100 % floor
    out = make_plan(model, cl, Goal(min_domestic_share=1.0), micro_batches=[1])
    check_valid(out.plan, cl)


def test_infeasible_goals_name_the_nearest_feasible_point():
    model, cl = big_mlp(), small_cluster()
    fastest = make_plan(model, cl, Goal(objective="latency")).plan.predicted.latency_s
    with pytest.raises(InfeasibleGoal, match=r"SLO .* unreachable: best latency .* ms"):
        make_plan(model, cl, Goal(slo_s=fastest * 0.5), micro_batches=[1])
    with pytest.raises(InfeasibleGoal, match=r"power cap 1 W too low: the smallest plan draws"):
        make_plan(model, cl, Goal(power_cap_w=1.0), micro_batches=[1])
    with pytest.raises(InfeasibleGoal, match=r"max devices 1 too low: the smallest plan needs"):
        make_plan(big_mlp(6), cl, Goal(max_devices=1), micro_batches=[1])
    huge = ModelGraphs("huge", mlp_graph(n_layers=2, hidden=131072, tokens=1))
    with pytest.raises(InfeasibleGoal, match=r"does not fit in cluster small: needs"):
        make_plan(huge, cl, Goal(), micro_batches=[1])
    dgx = load_cluster("gpu-dgx")
    with pytest.raises(InfeasibleGoal, match=r"domestic share 50% unreachable"):
        make_plan(big_mlp(2), dgx, Goal(min_domestic_share=0.5), micro_batches=[1])


def test_goal_validates_itself():
    with pytest.raises(GoalError, match="unknown objective"):
        Goal(objective="speed")
    with pytest.raises(GoalError, match="domestic share floor"):
        Goal(min_domestic_share=1.5)
    with pytest.raises(GoalError, match="SLO must be positive"):
        Goal(slo_s=0)
    with pytest.raises(KCloudError, match="unknown precision"):
        Goal(precision="fp7")  # type: ignore[arg-type]


def test_dp_tracks_a_binding_limit_and_respects_it():
    model, cl = big_mlp(), small_cluster()
    types, _ = build_types(cl, model, Goal())
    sp = StageSpace(model, types, cl.network, 1)
    opts = list(range(len(sp.options)))
    base = np.where(np.isfinite(sp.time), 0.0, np.inf)
    free = solve(sp, make_batch(sp, opts, base, 1.0, None, np.inf), Limits())[0]
    assert free is not None
    used = free.usage(sp)
    tight = Limits(tuple((t, max(0, n - 1)) for t, n in used.items()))
    p = solve(sp, make_batch(sp, opts, base, 1.0, None, np.inf), tight)[0]
    if p is not None:
        assert not tight.violated(p.usage(sp))
        assert evaluate(sp, p, 1).latency_s >= evaluate(sp, free, 1).latency_s


# ---------------------------------------------------------------------------------------------
# Zoo models on k-cloud-rack


def test_energy_plan_uses_less_energy_than_throughput_plan_under_one_slo():
    rack = load_cluster("k-cloud-rack")
    mbs = [1, 4, 16]
    fast = make_plan("bert-large", rack, Goal(objective="latency"), micro_batches=[1])
    slo = fast.plan.predicted.latency_s * 4
    thr = make_plan("bert-large", rack, Goal(objective="throughput", slo_s=slo),
                    micro_batches=mbs)
    en = make_plan("bert-large", rack, Goal(objective="energy", slo_s=slo), micro_batches=mbs)
    assert en.plan.predicted.energy_per_item_j < thr.plan.predicted.energy_per_item_j
    assert en.plan.predicted.latency_s <= slo and thr.plan.predicted.latency_s <= slo
    check_valid(thr.plan, rack)
    check_valid(en.plan, rack)


# ---------------------------------------------------------------------------------------------
# CLI


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kcloud.cli", *args], capture_output=True,
                          text=True, timeout=300)


def test_cli_plan_json_is_one_object_with_the_documented_keys(tmp_path: Path):
    out = tmp_path / "plan.json"
    r = run_cli("plan", "--model", "tiny-gpt", "--cluster", "k-cloud-rack", "--objective",
                "throughput", "--compare", "--pareto", "-o", str(out), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert set(doc) >= {"plan", "predicted", "baselines", "search_time_s", "pareto"}
    assert doc["predicted"]["figures"] == "modeled"
    assert {"latency_s", "throughput", "power_w", "energy_per_item_j", "unit"} \
        <= set(doc["predicted"])
    assert {b["name"] for b in doc["baselines"]} == {"data-parallel", "megatron-uniform",
                                                      "gpu-only"}
    assert Plan.load(out) == Plan.from_dict(doc["plan"])
    assert (tmp_path / "plan.pareto.png").is_file()


def test_cli_plan_human_output_labels_every_figure():
    r = run_cli("plan", "--model", "mlp", "--cluster", "gpu-dgx", "--objective", "latency",
                "--compare")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "(modeled" in out and "search time" in out and "(measured)" in out
    assert "bottleneck" in out and "schedule" in out and "data-parallel" in out


def test_cli_bad_cluster_file_is_one_line_exit_2(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nnodes:\n  - name: n\n    devices: {no-such-chip: 2}\n")
    r = run_cli("plan", "--model", "tiny-gpt", "--cluster", str(bad), "--json")
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert str(bad) in lines[0] and "no-such-chip" in lines[0]


def test_one_token_llm_request_is_its_prefill_alone():
    """The prompt's pass gives the first token, so a 1-token request costs its prefill and
    each further token one decode step (as the runtime generates)."""
    cl = small_cluster()
    goal = Goal(objective="latency", batch=1)
    one, many = small_llm(out=1), small_llm(out=9)
    assert (one.decode_steps, many.decode_steps) == (0, 8)
    sp1 = make_context(one, cl, goal, micro_batches=[1]).space(1)
    sp9 = make_context(many, cl, goal, micro_batches=[1]).space(1)
    t = sp1.types[0]
    pre = layer_table(one.forward, t.device, t.precision, 1, default_calibration().params(
        t.device), 1, (t.link.bandwidth, t.link.latency)).stage(0, one.n_layers)
    o = next(o.index for o in sp1.options if o.type == t.index and o.tp == 1)
    assert sp1.time[o, 0, one.n_layers] == pytest.approx(pre.time_s, rel=1e-9)
    # a 2-stage pipeline sends each of the 8 decode steps' tokens back to its first stage
    assert sp9.feedback[t.index, 0] == pytest.approx(8 * t.link.transfer_s(8), rel=1e-9)
    assert sp1.feedback[t.index, 0] == 0.0


def test_a_tensor_parallel_stage_pays_the_broadcast_of_what_it_receives():
    """A group's lead receives a hop and broadcasts it over the group: a later stage pays a
    tree of log2(tp) collective calls per hop (prefill and each decode step), a pipeline's first
    stage the same for each fed-back token, a group that is the whole pipeline nothing."""
    model, cl = small_llm(out=9), small_cluster()
    sp = make_context(model, cl, Goal(objective="latency", batch=1), micro_batches=[1]).space(1)
    L = model.n_layers
    for opt in (o for o in sp.options if o.tp > 1):
        t = sp.types[opt.type]
        link = (t.link.bandwidth, t.link.collective_s)
        params = default_calibration().params(t.device)
        pre, dec = (layer_table(g, t.device, t.precision, 1, params, opt.tp, link)
                    for g in (model.forward, model.decode))

        def alone(i: int, j: int) -> float:
            return pre.stage(i, j).time_s + 8 * dec.stage(i, j).time_s  # noqa: B023

        calls = math.log2(opt.tp) * t.link.collective_s
        assert sp.time[opt.index, 0, L] == pytest.approx(alone(0, L), rel=1e-9)
        first = sp.time[opt.index, 0, L - 1] - alone(0, L - 1)
        assert first == pytest.approx(8 * (calls + math.log2(opt.tp) * 8 / t.link.bandwidth))
        later = sp.time[opt.index, 1, L] - alone(1, L)
        assert later > 9 * calls  # the prefill's hop and 8 decode steps', their bytes too
        comm = pre.stage(1, L).comm_s + 8 * dec.stage(1, L).comm_s
        assert sp.comm[opt.index, 1, L] - comm == pytest.approx(later)  # it is group traffic


@pytest.mark.parametrize("make_model", CASES)
def test_a_request_pays_the_resume_of_its_first_stage_once(make_model):
    """A request reaching an idle pipeline loses its first stage's resume once, however many
    stages follow (the later stages' wake-ups are part of their hops), and every stage's
    refill of the weights its device's cache held, and none of it in the period: the
    planner's best latency is the brute force's with those terms, and a device that resumes
    slowly stops being the first stage where another can be."""
    model, cl = make_model(), small_cluster()
    goal = Goal(objective="latency", batch=1)
    cal = default_calibration()
    plain = brute_force(model, cl, goal, 1)
    for per_byte in (0.0, 1e-10):
        rngd = {**cal.by_device.get("furiosa-rngd", {}), "resume_s": 0.5,
                "resume_s_per_byte": per_byte}
        slow = Calibration(cal.by_class, {**cal.by_device, "furiosa-rngd": rngd}, cal.meta)
        chains = brute_force(model, cl, goal, 1, slow)  # the same chains, in the same order
        for c, p in zip(chains, plain, strict=True):
            assert c.stages == p.stages
            first = 0.5 if c.stages[0][0] == "furiosa-rngd" else 0.0
            refill = c.latency - p.latency - first
            on_rngd = any(st[0] == "furiosa-rngd" for st in c.stages)
            if per_byte and on_rngd:  # RNGD's SRAM holds some of any stage's weights
                assert refill > 1e-6
            else:
                assert refill == pytest.approx(0.0, abs=1e-9)
            assert c.period == p.period
        out = make_plan(model, cl, goal, micro_batches=[1], calibration=slow)
        best = min(c.latency for c in chains)
        assert out.plan.predicted.latency_s == pytest.approx(best, rel=1e-9)
        # RNGD holds the whole model alone (the best plan otherwise); now ATOMs start it
        assert out.plan.replicas[0].stages[0].device_type == "rebellions-atom"


def test_a_refill_grows_with_the_weights_up_to_the_cache():
    dev = get_device("host-cpu:1core")
    params = replace(default_calibration().params(dev), resume_s=1e-4, resume_s_per_byte=1e-11)
    cache = dev.sram_bytes.value
    assert refill_time_s(params, dev, 0.0) == 0.0  # the fixed resume is the first stage's
    assert refill_time_s(params, dev, cache / 4) == pytest.approx(1e-11 * cache / 4)
    # beyond the cache the weights stream on every pass, after a pause or not
    assert refill_time_s(params, dev, 4 * cache) == pytest.approx(1e-11 * cache)
    assert refill_time_s(replace(params, resume_s_per_byte=0.0), dev, cache) == 0.0


def test_stages_on_cores_of_one_cpu_pool_its_cache():
    """Stages on cores of one CPU keep one core's share of its cache resident together: a
    small stage beside one that streams more than the cache holds loses its weights, and the
    split costs what the whole model does on one core. A stage alone, or across the network,
    keeps its own share."""
    from types import SimpleNamespace

    from kcloud.planner.space import INTRA, NET, shared_cache_times

    mb = 2.0**20
    n = 3
    weights = np.zeros((1, n, n))
    weights[0, 0, 1], weights[0, 1, 2] = 27 * mb, 8 * mb
    resident = np.full((1, n, n), 1.0)
    streamed = weights / mb * 0.1  # 0.1 s per MB streamed
    space = SimpleNamespace(cache=np.array([6 * mb]), weights=weights, resident=resident,
                            streamed=streamed, opt_type=np.array([0]), opt_tp=np.array([1]))
    stages = [(0, 0, 1), (0, 1, 2)]
    alone = [1.0 + (1 - 6 / 27) * 2.7, 1.0 + (1 - 6 / 8) * 0.8]
    pooled = shared_cache_times(space, stages, (INTRA,), alone)
    spill = 1 - 6 / 35
    assert pooled == pytest.approx([1.0 + spill * 2.7, 1.0 + spill * 0.8])
    assert pooled[1] > alone[1]  # the streaming neighbour evicts the small stage's weights
    whole = 1.0 + (1 - 6 / 35) * 3.5  # both ranges as one stage on one core
    assert sum(pooled) - 1.0 == pytest.approx(whole)
    assert shared_cache_times(space, stages, (NET,), alone) == alone
    assert shared_cache_times(space, stages[:1], (), alone[:1]) == alone[:1]


def test_a_search_gives_the_collector_back_as_it_found_it(monkeypatch):
    """The search holds the cyclic garbage collector off while it runs (its allocations would
    set off collections that scan every object of the process); the caller's setting is
    restored, whether it had the collector on or off, and after a search that fails."""
    import gc

    import kcloud.planner.api as api

    model, cl = big_mlp(), small_cluster()
    seen: list[bool] = []
    real = api.search

    def spy(*args, **kwargs):
        seen.append(gc.isenabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "search", spy)
    try:
        assert gc.isenabled()
        make_plan(model, cl, Goal(objective="latency"))
        assert seen == [False] and gc.isenabled()
        gc.disable()
        make_plan(model, cl, Goal(objective="latency"))
        assert not gc.isenabled()
        gc.enable()
        with pytest.raises(InfeasibleGoal):
            make_plan(model, cl, Goal(objective="latency", slo_s=1e-9))
        assert seen == [False, False, False] and gc.isenabled()
    finally:
        gc.enable()


# ---------------------------------------------------------------------------------------------
# The search's short cuts: sweeps solved at their ends, micro-batches pruned by bounds


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("swept", ["latency", "price"])
def test_a_sweep_solved_at_its_ends_equals_every_problem_solved(seed, swept, monkeypatch):
    """Problems that differ only in one rising weight (the SLO's latency multiplier, a
    device's price) are solved at the ends of the run and between only where the ends
    differ: the answers equal solving every problem, and fewer problems reach the DP."""
    import kcloud.planner.dp as dp

    rng = np.random.default_rng(seed)
    model, cl = big_mlp(5), small_cluster(atom_nodes=2, per_node=2)
    types, _ = build_types(cl, model, Goal())
    sp = StageSpace(model, types, cl.network, 1)
    n = sp.L + 1
    per_layer = rng.uniform(0.5, 3.0, (len(sp.options), sp.L))
    prefix = np.concatenate([np.zeros((len(sp.options), 1)), per_layer.cumsum(axis=1)], axis=1)
    sp.time = (prefix[:, None, :] - prefix[:, :, None]) * rng.uniform(0.9, 1.1, sp.time.shape)
    sp.time[:, ~np.triu(np.ones((n, n), dtype=bool), 1)] = np.inf
    sp.trans = rng.uniform(0.0, 2.0, sp.trans.shape)
    opts = list(range(len(sp.options)))
    base = np.where(np.isfinite(sp.time), 0.0, np.inf)
    steps, caps = 13, rng.uniform(4.0, 12.0, 5)
    weights = np.tile(np.geomspace(1e-3, 1e3, steps), len(caps))
    devices = sp.opt_tp.astype(float)[None, :]
    if swept == "latency":
        lat, per = weights, np.broadcast_to(devices, (len(weights), len(opts)))
    else:
        lat, per = np.ones(len(weights)), weights[:, None] * devices
    batch = make_batch(sp, opts, base, lat, per, np.repeat(caps, steps), sweep=steps)
    asked: list[int] = []
    real = dp._dp_batch

    def counting(space, b, tracked, limits):
        asked.append(b.K)
        return real(space, b, tracked, limits)

    monkeypatch.setattr(dp, "_dp_batch", counting)
    got = dp._dp(sp, batch, [], Limits())
    swept_count = sum(asked)
    one_by_one = [real(sp, batch.take(np.array([k])), [], Limits())[0] for k in range(batch.K)]
    assert got == one_by_one
    runs = [set(map(str, got[r:r + steps])) for r in range(0, batch.K, steps)]
    assert max(len(r) for r in runs) > 1  # the weight changes the answer along a run
    assert swept_count < batch.K


def _full_round(ctx, bounds):
    """Every micro-batch searched together, nothing pruned (the reference)."""
    from kcloud.planner.search import templates_for

    return templates_for(ctx, ctx.goal.objective), {}


@pytest.mark.parametrize("make_model", CASES)
@pytest.mark.parametrize("objective", ["throughput", "energy", "cost"])
def test_micro_batches_pruned_by_their_bounds_leave_the_plan_unchanged(make_model, objective,
                                                                         monkeypatch):
    """A micro-batch whose bound cannot beat the best plan found is not searched: the plan
    is the one a search of every micro-batch finds, and no template beats its bound."""
    import kcloud.planner.search as search

    model, cl = make_model(), small_cluster(atom_nodes=2, per_node=4, rngd=4)
    goal = Goal(objective=objective)
    pruned = search.search(model, cl, goal)
    ctx = pruned.ctx
    finite = 0
    for b in ctx.micro_batches:
        bound = search.objective_bound(ctx, b)
        ts = [t for t in search.templates_for(replace(ctx, micro_batches=[b]), objective)]
        if not ts:
            continue
        finite += math.isfinite(bound)
        mix = search.choose(ctx, ts)
        assert mix is None or mix.objective(objective) >= bound * (1 - 1e-9) - 1e-12
        if objective != "throughput":
            assert all(t.objective(objective) >= bound * (1 - 1e-9) for t in ts)
    assert finite > 0
    monkeypatch.setattr(search, "_round", _full_round)
    full = search.search(model, cl, goal)
    assert [(t.key, n) for t, n in pruned.mix.parts] == [(t.key, n) for t, n in full.mix.parts]


def test_the_frontier_holds_only_pipelines_that_hold_their_micro_batches_in_flight():
    """Frontier candidates come from every family at the plan's in-flight count: an LLM
    pipeline deeper than that count under-counts its KV cache and is left out."""
    from kcloud.planner.pareto import candidates
    from kcloud.planner.search import device_family, holds_in_flight, search

    model = deep_llm()
    cl = small_cluster(atom_nodes=2, per_node=4, rngd=4)
    ctx = search(model, cl, Goal(objective="throughput")).ctx
    raw = [t for b in ctx.micro_batches for _, tys in ctx.restrictions
           if (opts := ctx.options(b, tys)) for t in device_family(ctx, b, opts)]
    assert any(not holds_in_flight(t) for t in raw)  # the families do yield deeper ones
    got = candidates(ctx)
    assert got and all(holds_in_flight(t) for t in got)


def test_a_stage_fits_more_micro_batches_in_flight_as_a_space_that_counts_them():
    """`fits_in_flight` (a space's memory check at a higher count) agrees with a space built
    at that count, stage by stage."""
    model, cl = deep_llm(), small_cluster(atom_nodes=2, per_node=4, rngd=4)
    types, _ = build_types(cl, model, Goal())
    for b in (4, 256):
        sp = StageSpace(model, types, cl.network, b)
        changed = 0
        for k in (2, 3, 5, 16):
            at = StageSpace(model, types, cl.network, b, in_flight=k)
            for o in range(len(sp.options)):
                for i in range(sp.L):
                    for j in range(i + 1, sp.L + 1):
                        fits = bool(np.isfinite(at.time[o, i, j]))
                        assert sp.fits_in_flight(o, i, j, k) == fits
                        changed += fits != bool(np.isfinite(sp.time[o, i, j]))
        assert (changed > 0) == (b == 256)  # the count binds at the larger micro-batch only


def test_baseline_llm_stages_hold_their_pipelines_micro_batches_in_flight():
    """megatron-uniform's pipelines are costed like the search's: a pp-stage LLM pipeline's
    stages hold pp micro-batches' KV cache (at least two), and a grid whose stages would fit
    only two micro-batches' is not offered."""
    import itertools

    from kcloud.planner.baselines import _grid, _uniform
    from kcloud.planner.search import in_flight_of

    model = deep_llm(1024, 1024)  # a long context: the KV binds
    ctx = make_context(model, small_cluster(atom_nodes=2, per_node=4, rngd=4),
                       Goal(objective="throughput"))
    grids = list(_grid(ctx, data_parallel=False))
    assert any(len(t.path.stages) > 2 for t in grids)
    for t in grids:
        count = in_flight_of(len(t.path.stages))
        assert all(t.space.fits_in_flight(o, i, j, count) for o, i, j in t.path.stages)
    dropped = 0
    for b in ctx.micro_batches:
        sp = ctx.space(b)
        for o in (x for x in sp.options if not x.offload):
            for pp in range(3, min(sp.L, ctx.types[o.type].count // o.tp) + 1):
                cuts = [round(k * sp.L / pp) for k in range(pp + 1)]
                at_two = all(np.isfinite(sp.time[o.index, i, j])
                             for i, j in itertools.pairwise(cuts))
                dropped += at_two and _uniform(ctx, b, o.type, o.tp, pp) is None
    assert dropped > 0
