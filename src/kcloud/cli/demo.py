"""`kcloud demo`: the main job on the embedded default.

Plans a small model on this machine's CPU cores (`local-cpu`) and runs the plan for real, then
plans the same model on the sample domestic fleet (`k-cloud-rack`) and runs it emulated
(numerics on this host, time and energy of the absent NPUs from the cost model), and prints the
two side by side, every figure labelled measured or modeled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from kcloud.cli import app
from kcloud.cli._common import console, emit_json
from kcloud.errors import KCloudError
from kcloud.inputs import MAX_BATCH


def _plan_and_run(model: str, cluster: str, objective: str, batch: int, mode: str,
                  trace: Path) -> dict[str, Any]:
    from kcloud.planner.api import make_plan
    from kcloud.planner.goal import Goal
    from kcloud.runtime.executor import execute

    outcome = make_plan(model, cluster, Goal(objective=objective, batch=batch))
    report = execute(outcome.plan, mode=mode, trace_path=trace)
    stages = [f"{s.device_type} x{s.tp} [{s.start}:{s.end})"
              for r in outcome.plan.replicas for s in r.stages]
    return {"cluster": cluster, "objective": objective, "mode": mode,
            "search_time_s": outcome.search_time_s, "kernel_s": outcome.kernel_s,
            "stages": stages,
            "replicas": len(outcome.plan.replicas), "plan": outcome.plan.to_dict(),
            "run": report.to_dict()}


@app.command()
def demo(
    model: Annotated[str, typer.Option(help="A CPU-runnable zoo model")] = "tiny-resnet",
    batch: Annotated[int, typer.Option(min=1, max=MAX_BATCH, help="Items per request batch")] =
        8,
    out: Annotated[Path, typer.Option(help="Folder for the trace files")] = Path("."),
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout")] = False,
) -> None:
    """Plan and run a model on this CPU (real, measured) and on the K-Cloud rack (emulated)."""
    from kcloud.graph import zoo

    if not zoo.is_zoo_model(model) or not zoo.model_info(model).runnable_on_cpu:
        cpu = ", ".join(m.name for m in zoo.list_models() if m.runnable_on_cpu)
        raise KCloudError(f"'{model}' is not a zoo model that runs on a CPU",
                          f"use one of: {cpu}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KCloudError(f"cannot make --out {out}: {exc.strerror or exc}",
                          "give --out a writable folder") from None
    with console.status("planning and running on local-cpu (real)...") if not as_json \
            else _quiet():
        local = _plan_and_run(model, "local-cpu", "throughput", batch, "real",
                              out / "kcloud-trace-local.json")
    with console.status("planning and running on k-cloud-rack (emulated)...") if not as_json \
            else _quiet():
        rack = _plan_and_run(model, "k-cloud-rack", "latency", batch, "emulated",
                             out / "kcloud-trace-rack.json")
    if as_json:
        emit_json({"model": model, "local": local, "rack": rack})
        return
    t = Table(title=f"{model}: one plan run for real here, one emulated on the K-Cloud rack",
              header_style="bold")
    t.add_column("")
    t.add_column("local-cpu (real)", justify="right")
    t.add_column("k-cloud-rack (emulated)", justify="right")
    t.add_row("objective", local["objective"], rack["objective"])
    t.add_row("stages", "\n".join(local["stages"]), "\n".join(rack["stages"]))
    t.add_row("search time (measured)", f"{local['search_time_s']:.3f} s",
              f"{rack['search_time_s']:.3f} s")
    t.add_row("planner's DP kernel compiled or loaded, once (measured)",
              f"{local['kernel_s']:.3f} s", f"{rack['kernel_s']:.3f} s")
    for key, label in (("max_abs_error", "max abs error vs single process"),):
        t.add_row(label, f"{local['run'][key]:.2g}", f"{rack['run'][key]:.2g}")
    lm, rp = local["run"]["measured"], rack["run"]["predicted"]
    lp = local["run"]["predicted"]
    t.add_row("latency, measured", f"{lm['latency_s'] * 1e3:,.2f} ms", "-")
    t.add_row("latency, modeled", f"{lp['latency_s'] * 1e3:,.2f} ms",
              f"{rp['latency_s'] * 1e3:,.3f} ms")
    t.add_row("throughput, measured", f"{lm['throughput']:,.0f} {lm['unit']}", "-")
    t.add_row("throughput, modeled", f"{lp['throughput']:,.0f} {lp.get('unit', lm['unit'])}",
              f"{rp['throughput']:,.0f} {rp.get('unit', lm['unit'])}")
    le, re_ = local["run"].get("energy"), rack["run"].get("energy")
    if le and re_:
        per = le["unit"].split("/", 1)[1]
        t.add_row("energy per item, modeled (power x run's stage times)",
                  *(f"{e['energy_per_item_j'] * 1e3:,.3g} mJ/{per}"
                    + (" *" if e.get("estimated") else "") for e in (le, re_)))
    emu = rack["run"].get("emulated")
    if emu:
        t.add_row("rack run: host numerics, NPU time modeled",
                  "-", f"{emu['latency_s'] * 1e3:,.3f} ms")
    console.print(t)
    if (le and le.get("estimated")) or (re_ and re_.get("estimated")):
        console.print("* built on estimated power figures (no primary source): see "
                      "`kcloud devices show <device>`")
    console.print(f"traces: {out / 'kcloud-trace-local.json'}, {out / 'kcloud-trace-rack.json'}"
                  " (open in chrome://tracing or Perfetto)")


class _quiet:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None
