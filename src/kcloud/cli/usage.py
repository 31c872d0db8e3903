"""`kcloud usage` over the REST API: per deployment and day."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from kcloud.cli import app
from kcloud.cli._cloud_client import DEFAULT_URL, JsonOpt, KeyOpt, UrlOpt, call
from kcloud.cli._common import console, emit_json


@app.command()
def usage(url: UrlOpt = DEFAULT_URL, key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """Device-seconds, requests, tokens (measured), energy (modeled), cost (estimated)."""
    data = call("GET", url, key, "/api/v1/usage")
    if as_json:
        emit_json(data)
        return
    t = Table(header_style="bold")
    for col in ("day", "tenant", "deployment", "requests", "tokens", "device-s",
                "energy J (modeled)", "cost $ (estimated)"):
        t.add_column(col, justify="left" if col in ("day", "tenant", "deployment") else "right")
    for r in data["usage"]:
        t.add_row(r["day"], escape(str(r["tenant"])), escape(str(r["deployment"])),
                  str(r["requests"]), str(r["tokens"]), f"{r['device_seconds']:.4g}",
                  f"{r['energy_j']:.4g}", f"{r['cost_usd']:.4g}")
    console.print(t)
