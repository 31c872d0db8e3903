"""`kcloud calibrate`: published results vs the cost model's predictions."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from kcloud.cli import app
from kcloud.cli._common import console, emit_json
from kcloud.errors import KCloudError


def _fmt(value: float, unit: str) -> str:
    """A figure in its unit: latencies in ms to three significant digits, rates whole."""
    if unit in ("s", "ms"):
        ms = value * 1e3 if unit == "s" else value
        return f"{ms:,.3g} ms" if ms < 100 else f"{ms:,.0f} ms"
    return f"{value:,.0f} {unit}"


def _table(title: str, rows: list[dict[str, Any]], loo: bool) -> Table:
    t = Table(title=title, header_style="bold")
    cols = [("device", "left"), ("model", "left"), ("scenario", "left"), ("prec", "left"),
            ("published", "right"), ("predicted", "right"), ("error", "right")]
    if loo:
        cols += [("left out", "right"), ("error", "right")]
    cols += [("batch", "right"), ("tp", "right"), ("bound", "left")]
    for col, j in cols:
        t.add_column(col, justify=j)  # type: ignore[arg-type]

    def err(e: float) -> str:
        return f"[{'green' if abs(e) <= 15 else 'red'}]{e:+.1f}%[/]"

    for r in rows:
        star = "*" if r["estimated"] else ""
        unit = r["unit"]
        cells = [r["device"], r["model"], r["scenario"], r["precision"],
                 _fmt(r["published"], unit), _fmt(r["predicted"], unit).split(" ")[0] + star,
                 err(r["error_pct"])]
        if loo:
            cells += [_fmt(r["loo_predicted"], unit).split(" ")[0], err(r["loo_error_pct"])]
        cells += [str(r["batch"]), str(r["tp"]), r["bound"]]
        t.add_row(*cells)
    return t


# This host's figures as `kcloud calibrate --host` shows them: (figure, unit, scale, value of
# the micro-benchmark's and the micro-calibration's results).
_HOST_FIGURES: tuple[tuple[str, str, float, Callable[[Any, Any], float | None]], ...] = (
    ("peak fp32 matmul, all cores", "GFLOP/s", 1e-9, lambda m, p: m and m.fp32_flops),
    ("memory bandwidth", "GB/s", 1e-9, lambda m, p: m and m.memory_bw),
    ("share of peak one core reaches", "", 1.0, lambda m, p: p and p.matrix_eff),
    ("one core's matmul rate (peak / cores x share)", "GFLOP/s", 1e-9,
     lambda m, p: m and p and m.fp32_flops / m.cores * p.matrix_eff),
    ("DRAM efficiency", "", 1.0, lambda m, p: p and p.memory_eff),
    ("per-kernel cost", "us", 1e6, lambda m, p: p and p.kernel_overhead_s),
    ("hop between two workers, one way", "ms", 1e3, lambda m, p: p and p.link_latency_s),
    ("link bandwidth", "GB/s", 1e-9, lambda m, p: p and p.link_bw),
    ("small all-reduce", "ms", 1e3, lambda m, p: p and p.collective_latency_s),
    ("first pass after idle, extra", "ms", 1e3, lambda m, p: p and p.resume_s),
    ("worst fit error of the timed chains", "%", 1.0, lambda m, p: p and p.fit_error_pct),
)


def _host_figures(before: tuple[Any, Any], now: tuple[Any, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, unit, scale, get in _HOST_FIGURES:
        old, new = get(*before), get(*now)
        rows.append({"figure": name, "unit": unit,
                     "before": None if old is None else old * scale, "now": new * scale,
                     "change_pct": None if not old else 100.0 * (new / old - 1.0)})
    return rows


def _remeasure_host(as_json: bool) -> None:
    """`kcloud calibrate --host`: this host measured again, beside what its cache held."""
    import dataclasses

    from kcloud.hardware import host

    before = host.cached_host()
    with console.status("measuring this host: matmul rate and memory bandwidth, then timed "
                        "chains in one worker per core...", spinner="dots") \
            if not as_json else nullcontext():
        now = host.remeasure_host()
    rows = _host_figures(before, now)
    files = [str(host.cache_file()), str(host.params_cache_file())]
    if as_json:
        emit_json({"cpu_model": now[0].cpu_model, "cores": now[0].cores,
                   "before": [dataclasses.asdict(x) if x else None for x in before],
                   "now": [dataclasses.asdict(x) for x in now], "figures": rows,
                   "figures_are": "measured", "cache_files": files})
        return
    dates = sorted({x.date for x in before if x})
    t = Table(title=f"This host, measured again: {now[0].cpu_model}, {now[0].cores} cores",
              header_style="bold")
    for col, j in (("figure", "left"), ("unit", "left"),
                   (f"cached ({', '.join(dates)})" if dates else "cached", "right"),
                   (f"now ({now[1].date})", "right"), ("change", "right")):
        t.add_column(col, justify=j)  # type: ignore[arg-type]
    for r in rows:
        t.add_row(r["figure"], r["unit"], "-" if r["before"] is None else f"{r['before']:,.4g}",
                  f"{r['now']:,.4g}",
                  "" if r["change_pct"] is None else f"{r['change_pct']:+.1f}%")
    console.print(t)
    console.print(f"measured in {now[0].seconds + now[1].seconds:.1f} s; cached in "
                  f"{files[1]} (and {files[0]}): host-cpu and local-cpu predictions and plans "
                  "use these from now on")


@app.command()
def calibrate(
    refit: Annotated[bool, typer.Option("--fit", help="Refit the parameters (else: evaluate "
                                        "the shipped calibration)")] = False,
    save: Annotated[bool, typer.Option("--save", help="With --fit: write the fitted "
                                       "parameters as K-Cloud's calibration")] = False,
    cv: Annotated[bool, typer.Option("--cv", help="Also predict each row by a fit made "
                                     "without it (leave-one-out; implies --fit)")] = False,
    csv: Annotated[Path | None, typer.Option("--csv", help="Published results (default: the "
                                             "shipped calibration.csv)")] = None,
    host: Annotated[bool, typer.Option("--host", help="Measure this host's CPU again (its "
                                       "cached figures age: a shared host's speed drifts) and "
                                       "show the change")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout")] = False,
) -> None:
    """Compare published results with the cost model (modeled), refit it, or measure this CPU."""
    from kcloud import calibrate as cal

    if host:
        given = [f for f, on in (("--fit", refit), ("--save", save), ("--cv", cv),
                                 ("--csv", csv is not None)) if on]
        if given:
            raise KCloudError(f"--host measures this host and fits nothing; {given[0]} does "
                              "not go with it", "run kcloud calibrate --host on its own")
        _remeasure_host(as_json)
        return
    rows = cal.load_rows(csv)
    if refit or cv:
        what = ("fitting the cost model, then once per row without it..." if cv
                else "fitting the cost model to published results...")
        with console.status(what, spinner="dots") if not as_json else nullcontext():
            result = cal.fit(rows, cv=cv)
        if save:
            path = cal.save(result.calibration)
            if not as_json:
                console.print(f"saved calibration to {path}")
    else:
        result = cal.evaluate(rows)
    if as_json:
        emit_json(result.to_dict())
        return
    console.print(_table("Calibration: published vs predicted (modeled)", result.rows, cv))
    console.print(f"max |error| {result.max_abs_error_pct:.1f}% (in sample)"
                  + (f"; left out: max {result.loo_max_abs_error_pct:.1f}%, mean "
                     f"{result.loo_mean_abs_error_pct:.1f}% (each row predicted by a fit "
                     "without it)" if result.loo_max_abs_error_pct is not None else "")
                  + "   * built on estimated catalog figures")
    for r in result.rows:
        if r["note"]:
            console.print(f"  {r['device']} {r['model']}: {r['note']}")
    if result.checks:
        console.print(_table("Checks: published results never fitted (modeled)",
                             result.checks, False))
        worst = max(abs(r["error_pct"]) for r in result.checks)
        console.print(f"max |error| {worst:.1f}% on results the fit never saw")
    if result.params:
        console.print("fitted: " + ", ".join(f"{k}={v:g}" for k, v in result.params.items()))
