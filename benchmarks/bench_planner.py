"""Planner benchmark: search time on large heterogeneous clusters, and plan quality vs baselines.

    python benchmarks/bench_planner.py

- llama-2-70b on 1,024 devices (32 nodes x 8 each of H100, A100, RNGD, ATOM); target < 5 s.
- a 175B-parameter GPT (GPT-3 shape: 96 x 12288, 96 heads, FFN 49152) on 4,096 devices (the
  same node, 128 of them); target < 30 s. The zoo has no such entry, so its graphs are built
  here from the zoo's transformer and captured on the meta device.
- the k-cloud-rack plans of llama-2-70b and bert-large for every objective.

Search times are measured (wall clock of search and placement, model capture excluded); every
plan figure is modeled.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from kcloud.errors import KCloudError
from kcloud.graph.capture import capture
from kcloud.graph.layergraph import LayerGraph
from kcloud.graph.models.transformer import Transformer, TransformerConfig
from kcloud.hardware.cluster import Cluster, cluster_from_dict, load_cluster
from kcloud.planner.api import make_plan, resolve
from kcloud.planner.baselines import BASELINES, run_baseline
from kcloud.planner.goal import Goal
from kcloud.planner.model import ModelGraphs

NODE = {"nvidia-h100-sxm": 8, "nvidia-a100-sxm-80gb": 8, "furiosa-rngd": 8,
        "rebellions-atom": 8}

GPT3 = TransformerConfig(
    n_layers=96, hidden=12288, heads=96, ffn=49152, vocab=50257, max_seq_len=2048,
    norm="layer", mlp="gelu", rotary_dim=None, qkv_bias=True, out_bias=True, mlp_bias=True,
)


def big_cluster(nodes: int) -> Cluster:
    return cluster_from_dict({
        "name": f"hetero-{nodes * sum(NODE.values())}",
        "network": {"bandwidth_gbps": 50, "latency_us": 5, "name": "infiniband-400g"},
        "nodes": [{"name": "n", "count": nodes, "devices": dict(NODE)}],
    }, f"benchmark: {nodes} nodes x {NODE}")


def _gpt_graph(phase: str, seq: int, kv_len: int | None) -> LayerGraph:
    with torch.device("meta"):
        module = Transformer(GPT3, phase=phase, batch=1, kv_len=kv_len or 0).to(torch.float16)
        ids = torch.zeros((1, seq), dtype=torch.long)
    meta: dict[str, Any] = {
        "is_llm": True, "family": "gpt", "n_layers": GPT3.n_layers, "hidden": GPT3.hidden,
        "heads": GPT3.heads, "kv_heads": GPT3.n_kv_heads, "head_dim": GPT3.head_dim,
        "ffn": GPT3.ffn, "vocab": GPT3.vocab, "kv_elems_per_token": GPT3.kv_elems_per_token,
        "params": sum(p.numel() for p in module.parameters()),
    }
    return capture(module.eval(), (ids,), name="gpt3-175b", batch=1, seq_len=seq, phase=phase,
                   kv_len=kv_len, meta=meta)


def gpt3_175b(goal: Goal) -> ModelGraphs:
    prompt, out = goal.prompt_tokens, goal.generated_tokens
    return ModelGraphs("gpt3-175b", _gpt_graph("prefill", prompt, None),
                       _gpt_graph("decode", 1, prompt + out // 2), out)


def _value(objective: str, pred: dict[str, Any]) -> str:
    if objective == "latency":
        return f"{pred['latency_s'] * 1e3:,.1f} ms"
    if objective == "throughput":
        return f"{pred['throughput']:,.0f} {pred['unit']}"
    if objective == "energy":
        return f"{pred['energy_per_item_j'] * 1e3:,.2f} mJ/item"
    c = pred.get("cost_per_item_usd")
    return "n/a" if c is None else f"${c * 1e6:,.3f} per 1M items"


def run(label: str, model: ModelGraphs, cluster: Cluster, goal: Goal, target_s: float | None,
        compare: bool = True) -> float:
    out = make_plan(model, cluster, goal)
    p = out.plan
    devices = len(p.devices)
    verdict = "" if target_s is None else (
        f"  (target < {target_s:g} s: {'met' if out.search_time_s < target_s else 'MISSED'})")
    print(f"\n{label}: {model.spec} on {cluster.name} ({cluster.size} devices), objective "
          f"{goal.objective}" + (f", SLO {goal.slo_s * 1e3:g} ms" if goal.slo_s else ""))
    print(f"  search time (measured): {out.search_time_s:.2f} s{verdict}")
    pred = p.predicted.to_dict()
    print(f"  plan (modeled): {_value(goal.objective, pred)}; {len(p.replicas)} replicas, "
          f"{devices} devices, micro-batch {p.micro_batch}, latency "
          f"{pred['latency_s'] * 1e3:,.1f} ms, {pred['power_w'] / 1e3:,.1f} kW, "
          f"{pred['energy_per_item_j'] * 1e3:,.2f} mJ/item")
    if compare:
        for name in BASELINES:
            t0 = time.perf_counter()
            try:
                b = run_baseline(name, model, cluster, goal)
                text = _value(goal.objective, b.plan.predicted.to_dict())
            except KCloudError as exc:
                text = f"infeasible: {exc.problem}"
            print(f"  baseline {name:<17} (modeled): {text}  "
                  f"[{time.perf_counter() - t0:.2f} s measured]")
    return out.search_time_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-175b", action="store_true", help="leave out the 4,096-device run")
    args = ap.parse_args()

    goal = Goal(objective="throughput")
    t0 = time.perf_counter()
    llama, _ = resolve("llama-2-70b", "gpu-dgx", goal)
    print(f"captured llama-2-70b in {time.perf_counter() - t0:.1f} s (measured, not counted)")
    run("1,024 devices", llama, big_cluster(32), goal, 5.0)
    run("1,024 devices", llama, big_cluster(32), Goal(objective="energy"), None, compare=False)
    if not args.skip_175b:
        t0 = time.perf_counter()
        gpt = gpt3_175b(goal)
        print(f"\ncaptured gpt3-175b in {time.perf_counter() - t0:.1f} s (measured, not counted)")
        run("4,096 devices", gpt, big_cluster(128), goal, 30.0)

    rack = load_cluster("k-cloud-rack")
    for spec in ("llama-2-70b", "bert-large"):
        for objective in ("latency", "throughput", "energy", "cost"):
            g = Goal(objective=objective)
            m, _ = resolve(spec, rack, g)
            run("k-cloud-rack", m, rack, g, None, compare=objective == "throughput")


if __name__ == "__main__":
    main()
