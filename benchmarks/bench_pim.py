"""Decode with and without attention offload to PIM, on the rack's NPU nodes (modeled).

    .venv/bin/python benchmarks/bench_pim.py [--models llama-2-7b,llama-2-70b] [--json]
        [--png docs/bench_pim.png]

For llama-2-7b (multi-head attention) and llama-2-70b (grouped-query attention, 8 query heads
per KV head), one decode step at every context length 512 ... 32 k and batch 1 ... 256, on each
NPU node of `k-cloud-rack-2028` (8 x ATOM-Max beside 32 HBM-PIM stacks; 8 x RNGD beside 8 AiMX
cards) and, projected, on the same ATOM-Max node with the 2030 analog NVM PIM (one card per
NPU) in place of HBM-PIM. Per cell, the best plan of a node without offload (a stage of tp
NPUs holding the whole model and its KV cache, copies filling the node) and the best with
offload available (the same, or any tp with any PIM group the planner would consider:
`kcloud.planner.space.offload_counts`): tokens/s per node and J/token, both from
`kcloud.hardware.steps` (the composition the planner, `kcloud plan` and the simulator use).
"-" where no plan holds the KV cache. Llama-2's window is 4 k tokens: longer contexts are a
shape study of the same layers (as AttAcc and NeuPIMs extrapolate GPT-3's). Every figure is
modeled and built on estimated catalog figures; the NVM rows are a 2030 projection.

Peers (their own hardware, simulated): AttAcc (ASPLOS 2024; DGX A100 + HBM-PIM attention,
GPT-3 175B and LLaMA 65B) reports up to 2.81x throughput and 2.67x energy efficiency, growing
with batch and context; NeuPIMs (ASPLOS 2024; NPU + PIM, GPT-3) 3x / 2.4x / 1.6x throughput
over GPU-only / NPU-only / naive NPU+PIM.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kcloud.hardware.steps import StageSpan

ROOT = Path(__file__).resolve().parents[1]
CONTEXTS = (512, 1024, 2048, 4096, 8192, 16384, 32768)
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
PEERS = {"AttAcc (ASPLOS'24)": "up to 2.81x throughput, 2.67x energy efficiency (GPT-3 175B)",
         "NeuPIMs (ASPLOS'24)": "3x / 2.4x / 1.6x throughput vs GPU / NPU / naive NPU+PIM"}


@dataclass(frozen=True)
class Best:
    tokens_s: float  # per node
    j_per_token: float
    config: str


def clusters() -> dict[str, Any]:
    from kcloud.hardware.cluster import cluster_from_dict, load_cluster

    rack = load_cluster("k-cloud-rack-2028")
    nvm = cluster_from_dict({"name": "k-cloud-rack-2030 (projected)", "nodes": [
        {"name": "atom-nvm", "devices": {"rebellions-atom-max": 8, "nvm-analog-pim": 8},
         "link": {"bandwidth_gbps": 64, "latency_us": 2, "name": "pcie-gen5"}}]}, "nvm")
    return {"DRAM PIM (2028)": rack, "analog NVM PIM (2030, projected)": nvm}


def configs(model: Any, cluster: Any) -> list[tuple[str, Any, int, int]]:
    """(label, stage tables, tp, copies per node) of every one-stage plan of the cluster's NPU
    nodes, with and without offload (the planner's own device types and PIM groups)."""
    from kcloud.hardware.steps import stage_tables_for
    from kcloud.planner.goal import Goal
    from kcloud.planner.space import build_types, offload_counts

    types, _ = build_types(cluster, model, Goal())
    out = []
    L = model.n_layers
    for t in types:
        if not t.pim_ratio:
            continue
        link = (t.link.bandwidth, t.link.collective_s)
        for tp in t.tps:
            stage = StageSpan(0, L, t.id, t.precision.value, tuple(str(k) for k in range(tp)))
            copies = t.node_cap // tp
            st = stage_tables_for(stage, model.forward, model.decode, t.device, link)
            out.append((f"{t.id} x{tp}", st, tp, copies))
            for p, ratio in t.pim_ratio:
                pim = types[p]
                for c in offload_counts(ratio, tp):
                    st = stage_tables_for(stage, model.forward, model.decode, t.device, link,
                                          offload=(pim.device, c, (t.link.bandwidth,
                                                                   t.link.latency)))
                    out.append((f"{t.id} x{tp} + {pim.id} x{c}", st, tp, copies))
    return out


def fits(st: Any, tokens: int) -> bool:
    from kcloud.hardware.cost import usable_memory

    t = st.tables
    if t.weight_bytes(st.start, st.end) > usable_memory(st.device):
        return False
    return st.kv_token_capacity(workspace_tokens=1) >= tokens


def cell(cfgs: list[tuple[str, Any, int, int]], ctx: int, b: int,
         offload: bool) -> tuple[Best | None, Best | None]:
    """(fastest, least energy) plan of one cell, offload allowed or not."""
    fast: Best | None = None
    low: Best | None = None
    for label, st, tp, copies in cfgs:
        if (st.offload is not None) and not offload:
            continue
        if not fits(st, b * ctx):
            continue
        c = st.step(b, b * ctx)
        rate = copies * b / c.time_s
        j = tp * c.energy_j / b
        x = Best(rate, j, label)
        if fast is None or rate > fast.tokens_s:
            fast = x
        if low is None or j < low.j_per_token:
            low = x
    return fast, low


def study(models: list[str]) -> list[dict[str, Any]]:
    from kcloud.planner.goal import Goal
    from kcloud.planner.model import load_model

    rows = []
    for name in models:
        model = load_model(name, Goal(input_tokens=512, output_tokens=64))
        for kind, cl in clusters().items():
            cfgs = configs(model, cl)
            for ctx in CONTEXTS:
                for b in BATCHES:
                    f0, e0 = cell(cfgs, ctx, b, False)
                    f1, e1 = cell(cfgs, ctx, b, True)
                    rows.append({
                        "model": name, "pim": kind, "context": ctx, "batch": b,
                        "without": None if f0 is None else {
                            "tokens_s": f0.tokens_s, "j_per_token": e0.j_per_token,  # type: ignore[union-attr]
                            "fastest": f0.config, "least_energy": e0.config},  # type: ignore[union-attr]
                        "with": None if f1 is None else {
                            "tokens_s": f1.tokens_s, "j_per_token": e1.j_per_token,  # type: ignore[union-attr]
                            "fastest": f1.config, "least_energy": e1.config},  # type: ignore[union-attr]
                        "figures": "modeled (estimated catalog figures)"
                        + ("; projected device" if "projected" in kind else ""),
                    })
    return rows


def gains(r: dict[str, Any]) -> tuple[float, float]:
    """(throughput gain, energy-efficiency gain) of offload; inf where only offload fits."""
    w, o = r["without"], r["with"]
    if o is None:
        return math.nan, math.nan
    if w is None:
        return math.inf, math.inf
    return o["tokens_s"] / w["tokens_s"], w["j_per_token"] / o["j_per_token"]


def table(rows: list[dict[str, Any]]) -> str:
    lines = []
    for (model, kind) in dict.fromkeys((r["model"], r["pim"]) for r in rows):
        sub = [r for r in rows if r["model"] == model and r["pim"] == kind]
        lines.append(f"\n{model}, {kind}: offload gain, throughput x / energy efficiency x "
                     "(modeled; '-': nothing fits; 'only': only with PIM)")
        lines.append("context \\ batch " + "".join(f"{b:>13}" for b in BATCHES))
        for ctx in CONTEXTS:
            cells = []
            for b in BATCHES:
                r = next(x for x in sub if x["context"] == ctx and x["batch"] == b)
                s, e = gains(r)
                cells.append(f"{'-':>13}" if math.isnan(s) else f"{'only':>13}"
                             if math.isinf(s) else f"{s:>6.2f}/{e:<6.2f}")
            lines.append(f"{ctx:>15} " + "".join(cells))
        best = [r for r in sub if r["with"] is not None]
        if best:
            top = max(best, key=lambda r: gains(r)[1] if math.isfinite(gains(r)[1]) else 0)
            w, o = top["without"], top["with"]
            if w is not None:
                lines.append(
                    f"  largest energy gain at context {top['context']}, batch {top['batch']}: "
                    f"{w['j_per_token']:.4f} -> {o['j_per_token']:.4f} J/token "
                    f"({w['least_energy']} -> {o['least_energy']}); tokens/s per node "
                    f"{w['tokens_s']:,.0f} -> {o['tokens_s']:,.0f}")
    lines.append("\npeers (their hardware, not these figures): "
                 + "; ".join(f"{k}: {v}" for k, v in PEERS.items()))
    return "\n".join(lines)


def heatmap(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    pairs = list(dict.fromkeys((r["model"], r["pim"]) for r in rows))
    fig, axes = plt.subplots(len(pairs), 2, figsize=(12, 3.4 * len(pairs)), squeeze=False)
    for row, (model, kind) in enumerate(pairs):
        sub = [r for r in rows if r["model"] == model and r["pim"] == kind]
        for col, name in enumerate(("throughput", "energy efficiency")):
            grid = np.full((len(CONTEXTS), len(BATCHES)), np.nan)
            only = np.zeros_like(grid, dtype=bool)
            for r in sub:
                g = gains(r)[col]
                i, j = CONTEXTS.index(r["context"]), BATCHES.index(r["batch"])
                if math.isinf(g):
                    only[i, j] = True
                else:
                    grid[i, j] = g
            ax = axes[row][col]
            data = np.log2(grid)
            im = ax.imshow(data, cmap="RdBu", vmin=-2, vmax=2, origin="lower", aspect="auto")
            for i in range(len(CONTEXTS)):
                for j in range(len(BATCHES)):
                    txt = "PIM\nonly" if only[i, j] else ("" if np.isnan(grid[i, j])
                                                          else f"{grid[i, j]:.2g}")
                    ax.text(j, i, txt, ha="center", va="center", fontsize=6)
            ax.set_xticks(range(len(BATCHES)), [str(b) for b in BATCHES])
            ax.set_yticks(range(len(CONTEXTS)), [f"{c // 1024}k" if c >= 1024 else str(c)
                                                 for c in CONTEXTS])
            ax.set_xlabel("batch")
            ax.set_ylabel("context")
            ax.set_title(f"{model}, {kind}: {name} gain (modeled)", fontsize=9)
            fig.colorbar(im, ax=ax, label="log2 gain")
    fig.suptitle("Decode attention on PIM vs NPU alone (best plan per cell; modeled, "
                 "estimated figures)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="llama-2-7b,llama-2-70b")
    ap.add_argument("--png", default=str(ROOT / "docs" / "bench_pim.png"))
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = ap.parse_args(argv)
    rows = study([m.strip() for m in args.models.split(",") if m.strip()])
    png = heatmap(rows, Path(args.png))
    if args.json:
        print(json.dumps({"rows": rows, "png": str(png), "peers": PEERS}))
    else:
        print(table(rows))
        print(f"\nheat map: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
