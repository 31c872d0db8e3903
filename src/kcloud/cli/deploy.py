"""`kcloud deploy MODEL` and `kcloud deployments` over the REST API (tenant key)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from kcloud.cli import app
from kcloud.cli._cloud_client import DEFAULT_URL, JsonOpt, KeyOpt, UrlOpt, call
from kcloud.cli._common import console, emit_json


def _devices(d: dict[str, Any]) -> str:
    out = []
    for a in d["placement"]:
        out.append(a["device"] + (f" [{a['partition']}]" if a.get("partition") else ""))
    return ", ".join(out)


@app.command()
def deploy(
    model: Annotated[str, typer.Argument(help="Zoo name or a model file under a model root")],
    name: Annotated[str, typer.Option("--name", "-n", help="Deployment name (the gateway's "
                                      "model name)")],
    objective: Annotated[str, typer.Option(help="latency | throughput | energy | cost")
                         ] = "throughput",
    slo_ms: Annotated[float | None, typer.Option("--slo-ms")] = None,
    min_domestic_share: Annotated[float | None, typer.Option("--min-domestic-share")] = None,
    mode: Annotated[str, typer.Option(help="emulated | real")] = "emulated",
    max_devices: Annotated[int, typer.Option("--max-devices")] = 1,
    priority: Annotated[int, typer.Option()] = 0,
    url: UrlOpt = DEFAULT_URL, key: KeyOpt = None, as_json: JsonOpt = False,
) -> None:
    """Deploy a model: planned on the fleet's free devices, placed, started in a sandbox."""
    body: dict[str, Any] = {"name": name, "model": model, "objective": objective,
                            "mode": mode, "max_devices": max_devices, "priority": priority}
    if slo_ms is not None:
        body["slo_ms"] = slo_ms
    if min_domestic_share is not None:
        body["min_domestic_share"] = min_domestic_share
    d = call("POST", url, key, "/api/v1/deployments", body)
    if as_json:
        emit_json(d)
        return
    p = d["plan"]["predicted"]
    console.print(f"deployment [bold]{escape(d['name'])}[/bold] ({d['id']}): {d['state']} on "
                  f"{escape(_devices(d))}")
    console.print(f"plan (modeled): {p['latency_s'] * 1e3:.3g} ms latency, "
                  f"{p['throughput']:.4g} {p['unit']}, {p['power_w']:.4g} W")


@app.command()
def deployments(url: UrlOpt = DEFAULT_URL, key: KeyOpt = None, as_json: JsonOpt = False
                ) -> None:
    """List your deployments (the admin sees all)."""
    data = call("GET", url, key, "/api/v1/deployments")
    if as_json:
        emit_json(data)
        return
    t = Table(header_style="bold")
    for col in ("id", "name", "model", "mode", "state", "devices", "restarts"):
        t.add_column(col)
    for d in data["deployments"]:
        t.add_row(d["id"], escape(d["name"]), escape(d["model"]), d["mode"], d["state"],
                  escape(_devices(d)), str(d["restarts"]))
    console.print(t)
