"""`kcloud calibrate`: published results vs the cost model's predictions."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from kcloud.cli import app
from kcloud.cli._common import console, emit_json


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
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout")] = False,
) -> None:
    """Compare published results with the cost model (modeled), optionally refitting it."""
    from kcloud import calibrate as cal

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
