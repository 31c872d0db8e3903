"""`kcloud clusters`: the built-in clusters, and `kcloud clusters show NAME|FILE` for one."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from kcloud.cli import app
from kcloud.cli._common import console, emit_json
from kcloud.hardware.cluster import Cluster, builtin_names, load_cluster

clusters_app = typer.Typer(
    name="clusters",
    help="Clusters: nodes of devices, the links inside nodes and the network between them.",
    add_completion=False,
    no_args_is_help=False,
)

_JsonOption = Annotated[
    bool, typer.Option("--json", help="Print one JSON object on stdout instead of a table.")
]


def _link(bw: float, lat: float) -> str:
    return f"{bw / 1e9:,.4g} GB/s, {lat * 1e6:,.3g} us"


def _domestic(c: Cluster) -> tuple[int, int]:
    dom = sum(n for d, n in c.counts.items() if c.device_types[d].domestic)
    return dom, c.size


def cluster_doc(c: Cluster) -> dict[str, Any]:
    d = c.to_dict()
    dom, total = _domestic(c)
    d["domestic_devices"] = dom
    d["domestic_share"] = dom / total if total else 0.0
    return d


@clusters_app.callback(invoke_without_command=True)
def clusters(ctx: typer.Context, as_json: _JsonOption = False) -> None:
    """List the built-in clusters with their device counts per type."""
    if ctx.invoked_subcommand is not None:
        return
    cs = [load_cluster(n) for n in builtin_names()]
    if as_json:
        emit_json({"clusters": [cluster_doc(c) for c in cs]})
        return
    t = Table(title="built-in clusters", header_style="bold", title_justify="left")
    for col in ("name", "nodes", "devices", "by type", "domestic", "network"):
        t.add_column(col, justify="right" if col in ("nodes", "devices", "domestic") else "left")
    for c in cs:
        dom, total = _domestic(c)
        t.add_row(escape(c.name), str(len(c.nodes)), str(c.size),
                  escape(", ".join(f"{n} x {d}" for d, n in c.counts.items())),
                  f"{dom / total:.0%}" if total else "-",
                  escape(_link(c.network.bandwidth, c.network.latency)))
    console.print(t)
    console.print("Run `kcloud clusters show NAME` (or a YAML file) for nodes and links.")


@clusters_app.command("show")
def show(
    name: Annotated[str, typer.Argument(metavar="NAME|FILE",
                                        help="A built-in cluster name or a YAML file")],
    as_json: _JsonOption = False,
) -> None:
    """Show one cluster: nodes, devices and links."""
    c = load_cluster(name)
    if as_json:
        emit_json(cluster_doc(c))
        return
    dom, total = _domestic(c)
    console.print(f"[bold]{escape(c.name)}[/bold] ({escape(c.source)}): {c.size} devices on "
                  f"{len(c.nodes)} nodes, {dom} domestic ({dom / total:.0%})")
    console.print(f"network between nodes: {escape(c.network.name or 'network')}, "
                  f"{_link(c.network.bandwidth, c.network.latency)} (one direction)")
    t = Table(header_style="bold")
    for col in ("node", "devices", "link inside the node"):
        t.add_column(col)
    for n in c.nodes:
        t.add_row(escape(n.name), escape(", ".join(f"{k} x {d}" for d, k in n.devices)),
                  escape(f"{n.link.name or 'link'}: {_link(n.link.bandwidth, n.link.latency)}"
                         + (f", all-reduce {n.link.collective_s * 1e6:,.3g} us"
                            if n.link.collective_latency is not None else "")))
    console.print(t)
    kinds = Table(title="device types", header_style="bold", title_justify="left")
    for col in ("id", "kind", "count", "memory", "domestic"):
        kinds.add_column(col, justify="right" if col in ("count", "memory") else "left")
    for d, n in c.counts.items():
        dev = c.device_types[d]
        kinds.add_row(escape(d), dev.kind.value, str(n),
                      f"{dev.memory_bytes.value / 2**30:,.4g} GiB",
                      "yes" if dev.domestic else "no")
    console.print(kinds)


app.add_typer(clusters_app, name="clusters")
