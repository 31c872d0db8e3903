"""`kcloud plan`: how should this model run on this cluster, for this goal?"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from kcloud.cli import app
from kcloud.cli._common import (
    ModelTimeoutOpt,
    check_model_code,
    check_writable,
    console,
    emit_json,
    progress,
)
from kcloud.errors import KCloudError
from kcloud.inputs import MAX_BATCH, MAX_TOKENS

if TYPE_CHECKING:
    from kcloud.planner.api import Outcome
    from kcloud.planner.goal import Goal


def _value(objective: str, d: dict[str, Any]) -> str:
    per = "token" if d.get("unit") == "tokens/s" else "item"
    if objective == "latency":
        return f"{d['latency_s'] * 1e3:,.3f} ms"
    if objective == "throughput":
        return f"{d['throughput']:,.1f} {d['unit']}"
    if objective == "energy":
        return f"{d['energy_per_item_j'] * 1e3:,.4g} mJ/{per}"
    c = d.get("cost_per_item_usd")
    return "n/a (unpriced device)" if c is None else f"${c * 1e6:,.4g} per 1M {per}s"


def _pareto_path(out: Path | None) -> Path:
    return out.with_suffix(".pareto.png") if out is not None else Path("kcloud-pareto.png")


# The options that say what a plan is for, shared by `kcloud plan` and `kcloud run`.
ObjectiveOpt = Annotated[str, typer.Option(help="latency | throughput | energy | cost")]
SloOpt = Annotated[float | None, typer.Option("--slo-ms", help="Bound on a request's latency")]
BatchOpt = Annotated[int, typer.Option(min=1, max=MAX_BATCH, help="Items per request")]
PowerCapOpt = Annotated[float | None, typer.Option("--power-cap-w",
                                                   help="Bound on the plan's power")]
MaxDevicesOpt = Annotated[int | None, typer.Option("--max-devices", help="Bound on devices used")]
DomesticOpt = Annotated[float, typer.Option(
    "--min-domestic-share", help="Floor on the share of domestic devices, 0..1")]
PrecisionOpt = Annotated[str | None, typer.Option(
    help="fp32|bf16|fp16|fp8|int8|int4 (default: each device type's own)")]
InputTokensOpt = Annotated[int | None, typer.Option(
    "--input-tokens", min=1, max=MAX_TOKENS, help="Tokens per sample (LLM prompt)")]
OutputTokensOpt = Annotated[int | None, typer.Option(
    "--output-tokens", min=1, max=MAX_TOKENS, help="LLM generated tokens per request")]
OffloadOpt = Annotated[str, typer.Option(
    "--attention-offload", help="Decode attention on PIM devices beside the NPUs/GPUs: auto "
    "(the search decides) | on (every LLM stage that can) | off")]
WorkloadOpt = Annotated[str | None, typer.Option(
    "--workload", help="Benchmark workload whose lengths to use (default: the model's "
    "benchmark, if it has one; 'none': the raw default lengths)")]


def search_line(out: Outcome) -> str:
    """What a command that planned prints of its search."""
    return (f"search time: {out.search_time_s:.2f} s (measured)"
            + (f"; its DP kernel compiled or loaded first, once, in {out.kernel_s:.2f} s "
               "(measured)" if out.kernel_s else ""))


def build_goal(objective: str, slo_ms: float | None, batch: int, power_cap_w: float | None,
               max_devices: int | None, min_domestic_share: float, precision: str | None,
               input_tokens: int | None = None, output_tokens: int | None = None,
               workload: str | None = None, attention_offload: str = "auto") -> Goal:
    """The `Goal` the plan options describe (a bad value raises a one-line `KCloudError`)."""
    from kcloud.planner.goal import Goal
    from kcloud.precision import Precision

    return Goal(
        objective=objective, slo_s=None if slo_ms is None else slo_ms / 1e3, batch=batch,
        power_cap_w=power_cap_w, max_devices=max_devices,
        min_domestic_share=min_domestic_share,
        precision=Precision.parse(precision) if precision else None,
        input_tokens=input_tokens, output_tokens=output_tokens, workload=workload,
        attention_offload=attention_offload.strip().lower(),
    )


@app.command()
def plan(
    model: Annotated[str, typer.Option("--model", "-m",
                                       help="Zoo name, file.py:factory or .onnx")],
    cluster: Annotated[str, typer.Option("--cluster", "-c",
                                         help="Built-in cluster name or a YAML file")],
    objective: ObjectiveOpt = "throughput",
    slo_ms: SloOpt = None,
    batch: BatchOpt = 1,
    power_cap_w: PowerCapOpt = None,
    max_devices: MaxDevicesOpt = None,
    min_domestic_share: DomesticOpt = 0.0,
    precision: PrecisionOpt = None,
    input_tokens: InputTokensOpt = None,
    output_tokens: OutputTokensOpt = None,
    workload: WorkloadOpt = None,
    attention_offload: OffloadOpt = "auto",
    compare: Annotated[bool, typer.Option(
        "--compare", help="Also plan the baselines and show them beside the plan")] = False,
    pareto: Annotated[bool, typer.Option(
        "--pareto", help="The latency-energy frontier: a table and a PNG plot")] = False,
    output: Annotated[Path | None, typer.Option("-o", "--output",
                                                help="Write the plan JSON here")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout")] = False,
    model_timeout_s: ModelTimeoutOpt = 120.0,
) -> None:
    """Find the best parallel plan (pipeline x tensor parallel x replicas; modeled)."""
    from kcloud.hardware.cluster import load_cluster
    from kcloud.planner.api import make_plan, resolve
    from kcloud.planner.baselines import compare as run_compare
    from kcloud.planner.explain import render

    goal = build_goal(objective, slo_ms, batch, power_cap_w, max_devices, min_domestic_share,
                      precision, input_tokens, output_tokens, workload, attention_offload)
    cl = load_cluster(cluster)  # a bad cluster fails before the model is captured
    if output is not None:
        check_writable(output, "-o")
    check_model_code(model, model_timeout_s, batch=1, seq_len=goal.input_tokens)
    with progress(f"planning {model} on {cl.name}", not as_json):
        m, _ = resolve(model, cl, goal)
        out = make_plan(m, cl, goal)
    p = out.plan
    assert out.result is not None
    ctx = out.result.ctx
    if output is not None:
        try:
            p.save(output)
        except OSError as exc:
            raise KCloudError(f"cannot write {output}: {exc.strerror}",
                              "give -o a writable path") from None
    rows = run_compare(m, cl, goal) if compare else None
    front_doc = None
    if pareto:
        from kcloud.planner.pareto import frontier, plot

        front, every = frontier(ctx, out.result.templates)
        png = plot(front, every, _pareto_path(output), f"{p.model} on {p.cluster}",
                   (p.predicted.latency_s, p.predicted.energy_per_item_j),
                   "token" if m.is_llm else "item")
        front_doc = {"points": [x.to_dict() for x in front], "candidates": len(every),
                     "png": str(png)}

    if as_json:
        doc: dict[str, Any] = {"plan": p.to_dict(), "predicted": p.predicted.to_dict(),
                               "workload": m.workload.to_dict() if m.workload else None,
                               "search_time_s": out.search_time_s, "kernel_s": out.kernel_s}
        if rows is not None:
            doc["baselines"] = rows
        if front_doc is not None:
            doc["pareto"] = front_doc
        emit_json(doc)
        return

    render(ctx, p, console)
    if m.workload is not None:
        console.print(f"workload: {escape(m.workload.describe())}")
        if m.workload.beams > 1:
            console.print("  the plan generates one sequence per request: beam search is "
                          "costed by `kcloud predict`, not planned")
    if rows is not None:
        t = Table(title=f"compared with baselines (modeled; objective {objective})",
                  header_style="bold", title_justify="left")
        cols = ("latency", "throughput", "energy", "cost")
        t.add_column("plan")
        for col in cols:
            t.add_column(f"{col} (objective)" if col == objective else col, justify="right")
        t.add_column("devices", justify="right")
        mine = {"name": "this plan", **p.predicted.to_dict(), "devices": len(p.devices)}
        for r in [mine, *rows]:
            if "infeasible" in r:
                t.add_row(escape(str(r["name"])), f"infeasible: {escape(str(r['infeasible']))}",
                          *[""] * len(cols))
                continue
            t.add_row(escape(str(r["name"])), *[_value(c, r) for c in cols], str(r["devices"]))
        console.print(t)
    if front_doc is not None:
        t = Table(title="latency-energy frontier (modeled; one replica each)",
                  header_style="bold", title_justify="left")
        for col in ("latency", "energy", "throughput", "power", "devices", "micro-batch",
                    "meets goal", "pipeline"):
            t.add_column(col, justify="left" if col == "pipeline" else "right")
        per = "token" if m.is_llm else "item"
        for x in front:
            t.add_row(f"{x.latency_s * 1e3:,.3f} ms", f"{x.energy_per_item_j * 1e3:,.4g} mJ/{per}",
                      f"{x.throughput:,.1f} {m.unit}", f"{x.power_w:,.0f} W", str(x.devices),
                      str(x.micro_batch), "yes" if x.meets_goal else "no", escape(x.pipeline))
        console.print(t)
        console.print(f"plot: {escape(front_doc['png'])}")
    console.print(search_line(out))
    if output is not None:
        console.print(f"plan written to {escape(str(output))}")
