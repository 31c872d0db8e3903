"""`kcloud cloud up`: the control plane, gateway and console on one port."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from kcloud.cli import app
from kcloud.cli._common import console
from kcloud.errors import KCloudError

cloud_app = typer.Typer(name="cloud", help="The multi-tenant control plane.",
                        add_completion=False, no_args_is_help=True)


@cloud_app.command("up")
def up(
    data_dir: Annotated[Path, typer.Option("--data-dir", help="State: database, admin key, "
                                           "deployments")] = Path("kcloud-data"),
    host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port")] = 8080,
    fleet: Annotated[str, typer.Option(help="Emulated fleet: built-in cluster or YAML file")
                     ] = "k-cloud-rack",
    local_cores: Annotated[int | None, typer.Option(
        "--local-cores", help="Local CPU cores added as real devices (default: all)")] = None,
    database: Annotated[str | None, typer.Option(
        help="Database URL (default: SQLite in --data-dir; postgresql+psycopg://...)")] = None,
    isolation: Annotated[str, typer.Option(help="bwrap | runc | none")] = "bwrap",
    model_root: Annotated[list[Path] | None, typer.Option(
        "--model-root", help="Directories model files may come from (besides DIR/models)")
    ] = None,
) -> None:
    """Start the control plane: REST API, gateway and console; Ctrl-C stops it (deployments
    come back on the next start)."""
    import uvicorn

    from kcloud.cloud.api import create_app
    from kcloud.cloud.control import Config, Control

    if isolation not in ("bwrap", "runc", "none"):
        raise KCloudError(f"unknown isolation '{isolation}'", "use bwrap, runc or none")
    if not 0 < port < 65536:
        raise KCloudError(f"port {port} out of range", "give --port 1..65535")
    logging.basicConfig(level=logging.WARNING, format="kcloud: %(message)s")
    ctl = Control(Config(data_dir, database=database, fleet=fleet, local_cores=local_cores,
                         isolation=isolation, model_roots=tuple(model_root or ())))
    f = ctl.fleet
    console.print(f"K-Cloud control plane on http://{host}:{port} (console at /, API at "
                  f"/api/v1, gateway at /v1)")
    console.print(f"fleet {escape(f.name)}: {len(f.devices)} devices, "
                  f"{sum(d.real for d in f.devices.values())} real; database "
                  f"{escape(ctl.engine.url.render_as_string())}; isolation {ctl.backend.name} "
                  f"({ctl.limits})")
    if ctl.admin_key_created:
        console.print(f"admin key written to {escape(str(ctl.admin_key_path))} (mode 0600); "
                      f"it is not shown again")
    else:
        console.print(f"admin key: {escape(str(ctl.admin_key_path))}")
    if isolation == "none":
        console.print("[bold]isolation none: engines run unsandboxed[/bold]")
    uvicorn.run(create_app(ctl), host=host, port=port, log_level="warning", access_log=False)


app.add_typer(cloud_app, name="cloud")
