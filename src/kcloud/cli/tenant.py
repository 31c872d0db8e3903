"""`kcloud tenant create|list` over the REST API (admin key)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from kcloud.cli import app
from kcloud.cli._cloud_client import DEFAULT_URL, JsonOpt, KeyOpt, UrlOpt, call
from kcloud.cli._common import console, emit_json
from kcloud.errors import KCloudError

tenant_app = typer.Typer(name="tenant", help="Tenants of the control plane.",
                         add_completion=False, no_args_is_help=True)


def parse_devices(items: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for it in items:
        dev, sep, n = it.rpartition("=")
        try:
            out[dev] = float(n)
        except ValueError:
            dev = ""
        if not sep or not dev:
            raise KCloudError(f"--devices {it!r}: expected TYPE=COUNT",
                              "e.g. --devices furiosa-rngd=8")
    return out


@tenant_app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="Tenant name")],
    devices: Annotated[list[str] | None, typer.Option(
        "--devices", help="Device quota TYPE=COUNT (repeat)")] = None,
    device_hours_per_day: Annotated[float | None, typer.Option("--device-hours-per-day")
                                    ] = None,
    requests_per_minute: Annotated[int | None, typer.Option("--requests-per-minute")] = None,
    max_deployments: Annotated[int | None, typer.Option("--max-deployments")] = None,
    url: UrlOpt = DEFAULT_URL, key: KeyOpt = None, as_json: JsonOpt = False,
) -> None:
    """Create a tenant with a quota."""
    quota = {"devices": parse_devices(devices) if devices else None,
             "device_hours_per_day": device_hours_per_day,
             "requests_per_minute": requests_per_minute, "max_deployments": max_deployments}
    t = call("POST", url, key, "/api/v1/tenants", {"name": name, "quota": quota})
    if as_json:
        emit_json(t)
        return
    console.print(f"tenant [bold]{escape(t['name'])}[/bold] created: id {t['id']}")


@tenant_app.command("list")
def list_(url: UrlOpt = DEFAULT_URL, key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """List the tenants and their quotas."""
    data = call("GET", url, key, "/api/v1/tenants")
    if as_json:
        emit_json(data)
        return
    t = Table(header_style="bold")
    for col in ("id", "name", "devices", "device-h/day", "req/min", "max deployments"):
        t.add_column(col)
    for row in data["tenants"]:
        q = row["quota"]
        devs = ", ".join(f"{k}={v:g}" for k, v in (q.get("devices") or {}).items()) or "any"
        t.add_row(row["id"], escape(row["name"]), escape(devs),
                  *(str(q.get(k)) if q.get(k) is not None else "-"
                    for k in ("device_hours_per_day", "requests_per_minute", "max_deployments")))
    console.print(t)


app.add_typer(tenant_app, name="tenant")
