"""`kcloud devices`: the device catalog, and `kcloud devices show ID` for one device."""

from __future__ import annotations

from typing import Annotated

import typer
from rich import box
from rich.console import Console, JustifyMethod
from rich.markup import escape
from rich.table import Table

from kcloud.cli import app
from kcloud.cli._common import console, emit_json, si
from kcloud.hardware.catalog import (
    best_peak,
    device_to_dict,
    figure_unit,
    get_device,
    list_devices,
)
from kcloud.hardware.device import Device, Figure

MARK = "*"
_TABLE_WIDTH = 132
FOOTNOTE = f"{MARK} estimated: no primary source"

devices_app = typer.Typer(
    name="devices",
    help="The device catalog: every accelerator K-Cloud models, each figure with its source.",
    add_completion=False,
    no_args_is_help=False,
)

_JsonOption = Annotated[
    bool, typer.Option("--json", help="Print one JSON object on stdout instead of a table.")
]


def format_figure(name: str, value: float) -> str:
    """A figure in engineering units (capacities binary: GiB/MiB; rates decimal)."""
    unit = figure_unit(name)
    if unit == "B":
        for factor, prefix in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
            if value >= factor:
                return f"{value / factor:.4g} {prefix}"
        return f"{value:g} B"
    if unit == "W":
        return f"{value:.3g} W"
    if unit == "USD/h":
        return f"${value:.2f}/h"
    return si(value, unit)


def _cell(name: str, fig: Figure | None, dev: Device, suffix: str = "") -> str:
    if fig is None:
        return "-"
    mark = MARK if fig.estimated or dev.projected else ""
    return escape(f"{format_figure(name, fig.value)}{suffix}{mark}")


def _print_table(devs: list[Device]) -> None:
    table = Table(title="K-Cloud device catalog", header_style="bold", title_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    columns: list[tuple[str, JustifyMethod]] = [
        ("id", "left"), ("vendor", "left"), ("kind", "left"), ("year", "right"),
        ("domestic", "center"), ("best peak", "right"), ("memory", "right"),
        ("bandwidth", "right"), ("max power", "right"),
    ]
    for col, justify in columns:
        table.add_column(col, justify=justify, no_wrap=col in ("id", "best peak"))
    any_mark = False
    for dev in devs:
        precision, peak = best_peak(dev)
        cells = [
            _cell(f"peak_{precision.value}", peak, dev, f" {precision.value}"),
            _cell("memory_bytes", dev.memory_bytes, dev),
            _cell("memory_bw", dev.memory_bw, dev),
            _cell("max_power_w", dev.max_power_w, dev),
        ]
        any_mark = any_mark or any(c.endswith(MARK) for c in cells)
        table.add_row(
            escape(dev.id) + (" [dim](projected)[/dim]" if dev.projected else ""),
            escape(dev.vendor),
            dev.kind.value,
            str(dev.year),
            "yes" if dev.domestic else "no",
            *cells,
        )
    # A terminal wraps the table to fit; a pipe or file gets it whole.
    out = console if console.is_terminal else Console(width=max(console.width, _TABLE_WIDTH))
    out.print(table)
    if any_mark:
        console.print(escape(FOOTNOTE))
    console.print("Run `kcloud devices show ID` for every figure with its source.")


def _print_device(dev: Device) -> None:
    console.print(f"[bold]{escape(dev.name)}[/bold]  ({escape(dev.id)})")
    flags = [f"vendor {dev.vendor}", f"kind {dev.kind.value}", f"year {dev.year}",
             "domestic" if dev.domestic else "not domestic"]
    if dev.projected:
        flags.append("PROJECTED: every figure is a projection")
    console.print(escape(", ".join(flags)))

    table = Table(header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("figure", no_wrap=True)
    table.add_column("value", justify="right", no_wrap=True)
    table.add_column("estimated", justify="center", no_wrap=True)
    table.add_column("source / note")
    for name, fig in dev.figures.items():
        estimated = fig.estimated or dev.projected
        detail = escape(fig.source)
        if fig.note.strip():
            detail += f"\n[dim]{escape(fig.note.strip())}[/dim]"
        table.add_row(
            name,
            escape(format_figure(name, fig.value)),
            "[yellow]yes[/yellow]" if estimated else "no",
            detail,
        )
    console.print(table)

    if dev.partitions:
        parts = Table(title="partitions", header_style="bold", title_justify="left",
                      box=box.SIMPLE_HEAD, pad_edge=False)
        parts.add_column("id", no_wrap=True)
        parts.add_column("count", justify="right")
        parts.add_column("share", justify="right")
        parts.add_column("memory", justify="right")
        parts.add_column("source")
        for p in dev.partitions:
            parts.add_row(
                escape(f"{dev.id}:{p.name}"),
                str(p.count),
                f"{p.compute_fraction:.3g}",
                format_figure("memory_bytes", p.memory_bytes),
                escape(p.source),
            )
        console.print(parts)
    if dev.notes:
        console.print(f"[bold]notes[/bold]: {escape(dev.notes)}")


@devices_app.callback(invoke_without_command=True)
def devices(ctx: typer.Context, as_json: _JsonOption = False) -> None:
    """List every device in the catalog (built-in files, KCLOUD_CATALOG_PATH, this host's CPU)."""
    if ctx.invoked_subcommand is not None:
        return
    devs = list_devices()
    if as_json:
        emit_json({"devices": [device_to_dict(d) for d in devs]})
        return
    _print_table(devs)


@devices_app.command("show")
def show(
    device_id: Annotated[
        str, typer.Argument(metavar="ID", help="A device id, or id:partition (e.g. "
                                               "furiosa-rngd:4core.24gb).")
    ],
    as_json: _JsonOption = False,
) -> None:
    """Show one device: every figure with its unit, source and estimated flag."""
    dev = get_device(device_id)
    if as_json:
        emit_json(device_to_dict(dev))
        return
    _print_device(dev)


app.add_typer(devices_app, name="devices")
