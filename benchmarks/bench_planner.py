"""Planner benchmark: search time on large heterogeneous clusters, and plan quality vs baselines.

    python benchmarks/bench_planner.py [--commands-only]

- whole commands (measured wall time, a fresh graph cache): `kcloud plan --model llama-2-70b
  --cluster k-cloud-rack` twice (the first captures the model, the second reads the graph
  cache; target < 2 s), and `kcloud plan` of llama-2-70b on the 1,024-device cluster below,
  each with the search time it reports (target < 1 s).

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
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

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

# The figures before the planner's speed work (issue 15; measured on this shared 2-core
# machine, before the DP and evaluation speed-ups: one run of this benchmark at load 1.2-1.6,
# and the second command's median of 5 at load 2.3-4).
BEFORE = {"first": "14.6 s wall, capture twice; search 4.0 s",
          "second": "4.4 s wall (median of 5: 4.1 s), search 3.4 s",
          "1024": "search 13.1 s"}

GPT3 = TransformerConfig(
    n_layers=96, hidden=12288, heads=96, ffn=49152, vocab=50257, max_seq_len=2048,
    norm="layer", mlp="gelu", rotary_dim=None, qkv_bias=True, out_bias=True, mlp_bias=True,
)


def big_cluster_doc(nodes: int) -> dict[str, Any]:
    return {
        "name": f"hetero-{nodes * sum(NODE.values())}",
        "network": {"bandwidth_gbps": 50, "latency_us": 5, "name": "infiniband-400g"},
        "nodes": [{"name": "n", "count": nodes, "devices": dict(NODE)}],
    }


def big_cluster(nodes: int) -> Cluster:
    return cluster_from_dict(big_cluster_doc(nodes), f"benchmark: {nodes} nodes x {NODE}")


def _search(doc: dict[str, Any]) -> str:
    """A command's search time against the 1 s target, and the DP kernel's load before it (in
    the wall time, not in the search)."""
    s = doc["search_time_s"]
    return (f"search {s:.2f} s (target < 1 s: {'met' if s < 1.0 else 'MISSED'}; the DP kernel "
            f"loaded before it in {doc['kernel_s']:.2f} s)")


def _cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _command(args: list[str], env: dict[str, str]) -> tuple[float, float, dict[str, Any]]:
    """Wall and CPU time (measured) of one whole `kcloud` command, and its JSON. On a shared
    host the CPU time is the figure other tenants disturb least."""
    t0, c0 = time.perf_counter(), _cpu_children()
    out = subprocess.run([sys.executable, "-m", "kcloud.cli", *args, "--json"], env=env,
                         capture_output=True, text=True, check=False)
    wall, cpu = time.perf_counter() - t0, _cpu_children() - c0
    if out.returncode != 0:
        raise SystemExit(f"kcloud {' '.join(args)} failed: {out.stderr.strip()}")
    return wall, cpu, json.loads(out.stdout)


def commands() -> None:
    """`kcloud plan` as a user runs it, cold and warm, on the rack and on 1,024 devices."""
    with tempfile.TemporaryDirectory(prefix="kcloud-bench-") as tmp:
        env = {**os.environ, "KCLOUD_CACHE_DIR": tmp}
        rack = ["plan", "--model", "llama-2-70b", "--cluster", "k-cloud-rack"]
        print("whole commands (wall time measured; graph cache fresh at the start)")
        for label, target, before in (("first (captures)", None, BEFORE["first"]),
                                      ("second (graph cache)", 2.0, BEFORE["second"])):
            wall, cpu, doc = _command(rack, env)
            verdict = f"  [before: {before}]" if target is None else \
                f"  (target < {target:g} s: {'met' if wall < target else 'MISSED'}) " \
                f"[before: {before}]"
            print(f"  kcloud plan llama-2-70b on k-cloud-rack, {label}: {wall:.2f} s wall "
                  f"({cpu:.2f} s CPU), {_search(doc)}{verdict}")
        pred = doc["predicted"]
        print(f"    plan (modeled): {pred['throughput']:,.0f} {pred['unit']}, request latency "
              f"{pred['latency_s'] * 1e3:,.0f} ms (bound {doc['plan']['goal']['slo_s'] * 1e3:,.0f}"
              f" ms), workload {doc['workload']['workload']}")
        big = Path(tmp) / "hetero-1024.yaml"
        big.write_text(yaml.safe_dump(big_cluster_doc(32)))
        wall, cpu, doc = _command(["plan", "--model", "llama-2-70b", "--cluster", str(big)],
                                  env)
        print(f"  kcloud plan llama-2-70b on 1,024 devices (4 types): {wall:.2f} s wall "
              f"({cpu:.2f} s CPU), {_search(doc)} [before: {BEFORE['1024']}]")


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
    bound = p.goal.get("slo_s")  # the default latency bound of throughput plans included
    if compare:
        for name in BASELINES:
            t0 = time.perf_counter()
            try:
                b = run_baseline(name, model, cluster, goal)
                bp = b.plan.predicted.to_dict()
                text = f"{_value(goal.objective, bp)}, latency {bp['latency_s'] * 1e3:,.1f} ms"
                if bound is not None and bp["latency_s"] > bound * (1 + 1e-9):
                    # the baselines take no latency bound; the planner's throughput plans do
                    text += " (over the plan's latency bound)"
            except KCloudError as exc:
                text = f"infeasible: {exc.problem}"
            print(f"  baseline {name:<17} (modeled): {text}  "
                  f"[{time.perf_counter() - t0:.2f} s measured]")
    return out.search_time_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-175b", action="store_true", help="leave out the 4,096-device run")
    ap.add_argument("--commands-only", action="store_true",
                    help="only the whole `kcloud plan` commands")
    args = ap.parse_args()
    commands()
    if args.commands_only:
        return

    goal = Goal(objective="throughput")
    t0 = time.perf_counter()
    llama, _ = resolve("llama-2-70b", "gpu-dgx", goal)
    print(f"captured llama-2-70b in {time.perf_counter() - t0:.1f} s (measured, not counted)")
    run("1,024 devices", llama, big_cluster(32), goal, 1.0)
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
