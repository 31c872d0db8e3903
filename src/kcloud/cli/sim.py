"""`kcloud sim`: fleet studies. `run` simulates services on a fleet over traces or synthetic
streams; `size` finds the device mix that meets every SLO; `roadmap` sizes the plan's service
mix for 2025, 2028 and 2030. Every figure is modeled."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from kcloud.cli import app
from kcloud.cli._common import console, emit_json, err_console
from kcloud.errors import KCloudError

sim_app = typer.Typer(name="sim", help="Fleet simulation, sizing and the 2025/2028/2030 roadmap "
                      "(modeled).", add_completion=False, no_args_is_help=True)

_Json = Annotated[bool, typer.Option("--json", help="One JSON object on stdout")]


def _ms(q: dict[str, Any] | None) -> str:
    if not q or q.get("p50") is None:
        return "-"
    return " / ".join(f"{q[k] * 1e3:,.1f}" for k in ("p50", "p90", "p99"))


def _spec_from_flags(model: str | None, cluster: str, replicas: int | None, objective: str,
                     trace: str | None, rate: float | None, duration: float | None,
                     rate_scale: float, router: str, prompt: int | None, output: int | None,
                     ttft_ms: float | None, tpot_ms: float | None,
                     latency_ms: float | None, seed: int, front_end: bool = False) -> Any:
    from kcloud.sim.services import parse_spec

    if model is None:
        raise KCloudError("give --services FILE.yaml, or --model with --cluster",
                          "see `kcloud sim run --help`")
    if trace is None and rate is None:
        raise KCloudError("no request stream: give --trace FILE or --rate R --duration S",
                          "e.g. --trace ../shared/traces/azure-llm-2023-conversation.csv")
    svc: dict[str, Any] = {"name": model.rsplit(":", 1)[-1].rsplit("/", 1)[-1],
                           "model": model, "cluster": cluster, "objective": objective,
                           "router": router, "rate_scale": rate_scale,
                           "front_end": front_end}
    for k, v in (("replicas", replicas), ("trace", trace), ("rate", rate),
                 ("prompt_tokens", prompt), ("output_tokens", output)):
        if v is not None:
            svc[k] = v
    svc["slo"] = {k: v for k, v in (("ttft_ms", ttft_ms), ("tpot_ms", tpot_ms),
                                    ("latency_ms", latency_ms)) if v is not None}
    data: dict[str, Any] = {"seed": seed, "services": [svc]}
    if duration is not None:
        data["duration_s"] = duration
    return parse_spec(data, "flags")


@sim_app.command("run")
def run_cmd(
    services: Annotated[str | None, typer.Option("--services", help="Services YAML")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="One service's model")] = None,
    cluster: Annotated[str, typer.Option("--cluster", "-c", help="Cluster to plan on")] = (
        "k-cloud-rack"),
    replicas: Annotated[int | None, typer.Option(help="Replicas (default: the plan's)")] = None,
    objective: Annotated[str, typer.Option(help="Planner objective")] = "throughput",
    trace: Annotated[str | None, typer.Option(help="Trace CSV (Azure LLM trace format)")] = None,
    rate: Annotated[float | None, typer.Option(help="Synthetic requests per second")] = None,
    duration: Annotated[float | None, typer.Option(help="Synthetic stream length, s")] = None,
    rate_scale: Annotated[float, typer.Option(help="Speed a trace up N times")] = 1.0,
    router: Annotated[str, typer.Option(help="round-robin|least-outstanding|speed-aware")] = (
        "least-outstanding"),
    prompt_tokens: Annotated[int | None, typer.Option(help="Synthetic prompt length")] = None,
    output_tokens: Annotated[int | None, typer.Option(help="Synthetic output length")] = None,
    ttft_ms: Annotated[float | None, typer.Option(help="SLO: time to first token")] = None,
    tpot_ms: Annotated[float | None, typer.Option(help="SLO: time per output token")] = None,
    latency_ms: Annotated[float | None, typer.Option(help="SLO: end to end")] = None,
    seed: Annotated[int, typer.Option(help="Seed of synthetic streams")] = 0,
    plot: Annotated[str | None, typer.Option(help="Write PNG plots into this folder")] = None,
    front_end: Annotated[bool, typer.Option(
        "--front-end", help="Add kcloud serve's front end as measured on this host "
        "(`kcloud sim front-end`)")] = False,
    as_json: _Json = False,
) -> None:
    """Simulate services on a fleet: latency percentiles, SLOs, power, energy, cost, share."""
    from kcloud.sim.fleet import Simulator
    from kcloud.sim.services import build_service, load_spec, mean_lengths, plan_service
    from kcloud.sim.streams import read_trace

    if services is not None:
        if model is not None or trace is not None or rate is not None:
            raise KCloudError("--services and --model/--trace/--rate exclude each other",
                              "give the streams in the services file")
        spec = load_spec(services)
        if front_end:
            for svc in spec.services:
                svc.front_end = True
        if duration is not None:
            spec.duration_s = duration
        if seed:
            spec.seed = seed
    else:
        spec = _spec_from_flags(model, cluster, replicas, objective, trace, rate, duration,
                                rate_scale, router, prompt_tokens, output_tokens, ttft_ms,
                                tpot_ms, latency_ms, seed, front_end)
    built = []
    span = spec.duration_s or 0.0
    for i, s in enumerate(spec.services):
        prompt, out = mean_lengths(s)
        planned = plan_service(s, prompt=prompt, output=out)
        built.append(build_service(s, planned, duration_s=spec.duration_s, seed=spec.seed + i))
        if s.trace is not None and not spec.duration_s:
            span = max(span, read_trace(s.trace).duration_s / s.rate_scale)
    res = Simulator(built, bin_s=max(1.0, span / 100)).run()
    d = res.to_dict()
    if plot:
        from kcloud.sim.plots import plot_run

        d["plots"] = [str(p) for p in plot_run(res, plot)]
    if as_json:
        emit_json(d)
        return
    t = Table(title=f"fleet simulation: {d['requests']:,} requests, {d['completed']:,} completed, "
              f"{d['dropped']:,} dropped over {d['span_s']:,.0f} s (modeled)")
    for c in ("service", "TTFT ms p50/p90/p99", "TPOT ms p50/p90/p99", "e2e ms p50/p90/p99",
              "SLO met", "tok/s", "preempt", "J/request"):
        t.add_column(c, justify="right" if c != "service" else "left")
    for name, s in d["services"].items():
        t.add_row(name, _ms(s["ttft_s"]), _ms(s["tpot_s"]), _ms(s["e2e_s"]),
                  f"{s['slo_attainment']:.1%}" if s["slo_attainment"] is not None else "-",
                  f"{s['throughput_tok_s']:,.0f}" if s["throughput_tok_s"] is not None else "-",
                  str(s["preemptions"]),
                  f"{s['energy_per_request_j']:,.1f}" if s["energy_per_request_j"] else "-")
    console.print(t)
    u = Table(title="device types (modeled)")
    for c in ("device", "devices", "domestic", "utilization", "avg power W", "energy kJ"):
        u.add_column(c, justify="right" if c != "device" else "left")
    for name, x in d["device_types"].items():
        u.add_row(name, str(x["devices"]), "yes" if x["domestic"] else "no",
                  f"{x['utilization']:.1%}", f"{x['avg_power_w']:,.0f}",
                  f"{x['energy_j'] / 1e3:,.0f}")
    console.print(u)
    share = d["domestic_share"]
    cost = "unpriced device in the fleet" if d["cost_usd"] is None else f"${d['cost_usd']:,.2f}"
    star = " *" if d["estimated"] else ""
    console.print(f"fleet energy {d['energy_j'] / 3.6e6:,.2f} kWh{star} (idle included), "
                  f"{d['avg_power_w']:,.0f} W average, "
                  f"{(d['energy_per_request_j'] or 0):,.1f} J/request, cost {cost}; domestic "
                  f"share {share['devices']:.0%} of devices, {share['energy']:.0%} of energy, "
                  f"{share['work']:.0%} of work (modeled)")
    console.print(f"simulated in {d['sim_wall_s']:.2f} s wall (measured), {d['events']:,} events")
    if star:
        console.print("* built on estimated catalog figures")
    for p in d.get("plots", []):
        console.print(f"plot: {p}")


@sim_app.command("front-end")
def front_end_cmd(
    url: Annotated[str, typer.Option(help="The running kcloud serve")] = "http://127.0.0.1:8000",
    served_name: Annotated[str | None, typer.Option(
        help="The model's name on the server (default: the first it lists)")] = None,
    rounds: Annotated[int, typer.Option(min=1, help="Runs of each probe")] = 3,
    as_json: _Json = False,
) -> None:
    """Measure kcloud serve's front end on this host (probes of a running server) for
    `sim run --front-end`; saved in the host's cache."""
    import dataclasses

    from kcloud.sim import front_end as fe

    def progress(msg: str) -> None:
        if not as_json:
            err_console.print(f"probing: {msg}")

    costs = fe.measure(url, served_name, rounds=rounds, progress=progress)
    if as_json:
        emit_json(dataclasses.asdict(costs) | {"source": costs.source, "figures": "measured"})
        return
    console.print(f"front end of {url} (measured): {fe.describe(costs)}")


def _print_scenario(s: dict[str, Any]) -> None:
    star = " *" if s["estimated"] else ""
    cost = ("unpriced device" if s["cost_usd_per_hour"] is None
            else f"${s['cost_usd_per_hour']:,.2f}/h")
    t = Table(title=f"{s['year']}: fleet {', '.join(f'{k} x{v}' for k, v in s['fleet'].items())}"
              f" (modeled{star})")
    for c in ("service", "replica unit", "replicas", "SLO met", "J/request", "avg W"):
        t.add_column(c, justify="right" if c not in ("service", "replica unit") else "left")
    for name, o in s["services"].items():
        t.add_row(name, o["unit"], str(o["replicas"]), f"{o['slo_attainment']:.1%}",
                  f"{o['energy_per_request_j']:,.2f}", f"{o['avg_power_w']:,.0f}")
    console.print(t)
    console.print(f"  domestic share {s['domestic_share']:.0%} of devices"
                  + (f" (target {s['domestic_target']:.0%}: "
                     f"{'met' if s['meets_domestic_target'] else 'not met'})"
                     if "domestic_target" in s else "")
                  + f"; {s['avg_power_w']:,.0f} W average; {cost}; every SLO "
                  f"{'met' if s['meets_slo'] else 'NOT met'}")


@sim_app.command("size")
def size_cmd(
    services: Annotated[str, typer.Option("--services", help="Services YAML")],
    year: Annotated[int, typer.Option(help="2025 | 2028 | 2030")],
    min_domestic_share: Annotated[float, typer.Option(help="Floor on domestic devices")] = 0.0,
    objective: Annotated[str, typer.Option(help="cost | energy")] = "cost",
    power_cap_w: Annotated[float | None, typer.Option(help="Cap on average power")] = None,
    as_json: _Json = False,
) -> None:
    """Find the device mix and counts that meet every service's SLO at the lowest cost or
    energy, with the Pareto front of cost, energy and domestic share (modeled)."""
    from kcloud.sim.services import load_spec
    from kcloud.sim.size import size_fleet

    spec = load_spec(services)

    def progress(msg: str) -> None:
        if not as_json:
            err_console.print(f"[dim]sizing {msg}[/]")

    r = size_fleet(spec, year, min_domestic_share=min_domestic_share, objective=objective,
                   power_cap_w=power_cap_w, progress=progress)
    if as_json:
        emit_json(r)
        return
    _print_scenario(r)
    t = Table(title="Pareto front: cost, energy, domestic share (modeled)")
    for c in ("fleet", "USD/h", "avg W", "domestic"):
        t.add_column(c, justify="right" if c != "fleet" else "left")
    for p in r["pareto"]:
        t.add_row(", ".join(f"{k} x{v}" for k, v in p["fleet"].items()),
                  "-" if p["cost_usd_per_hour"] is None else f"{p['cost_usd_per_hour']:,.2f}",
                  f"{p['avg_power_w']:,.0f}", f"{p['domestic_share']:.0%}")
    console.print(t)


@sim_app.command("roadmap")
def roadmap_cmd(
    services: Annotated[str | None, typer.Option("--services", help="Services YAML "
                                                  "(default: the built-in mix)")] = None,
    objective: Annotated[str, typer.Option(help="energy | cost")] = "energy",
    plot: Annotated[str, typer.Option(help="PNG of the three stages")] = "kcloud-roadmap.png",
    as_json: _Json = False,
) -> None:
    """Size one service mix on the 2025, 2028 and 2030 devices toward 80 % domestic share."""
    from kcloud.sim.roadmap import plot_roadmap, roadmap
    from kcloud.sim.services import load_spec

    spec = load_spec(services) if services else None

    def progress(msg: str) -> None:
        if not as_json:
            err_console.print(f"[dim]sizing {msg}[/]")

    r = roadmap(spec, objective=objective, progress=progress)
    r["plot"] = str(plot_roadmap(r, Path(plot)))
    if as_json:
        emit_json(r)
        return
    for s in r["scenarios"]:
        _print_scenario(s)
    console.print(f"plot: {r['plot']}")
    if any(s["estimated"] for s in r["scenarios"]):
        console.print("* built on estimated or projected catalog figures")


app.add_typer(sim_app, name="sim")
