"""`kcloud key create|revoke` over the REST API."""

from __future__ import annotations

from typing import Annotated

import typer

from kcloud.cli import app
from kcloud.cli._cloud_client import DEFAULT_URL, JsonOpt, KeyOpt, UrlOpt, call
from kcloud.cli._common import console, emit_json

key_app = typer.Typer(name="key", help="API keys of tenants.", add_completion=False,
                      no_args_is_help=True)


@key_app.command("create")
def create(tenant: Annotated[str, typer.Argument(help="Tenant id")],
           url: UrlOpt = DEFAULT_URL, key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """Create a key for a tenant (shown once; the control plane keeps only its hash)."""
    k = call("POST", url, key, f"/api/v1/tenants/{tenant}/keys")
    if as_json:
        emit_json(k)
        return
    console.print(f"key {k['id']} for tenant {k['tenant_id']} (shown once, keep it):")
    print(k["key"])


@key_app.command("revoke")
def revoke(key_id: Annotated[str, typer.Argument(help="Key id (k_...)")],
           url: UrlOpt = DEFAULT_URL, key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """Revoke a key: it stops working at once."""
    r = call("DELETE", url, key, f"/api/v1/keys/{key_id}")
    if as_json:
        emit_json(r)
        return
    console.print(f"key {r['id']} revoked")


app.add_typer(key_app, name="key")
