"""`kcloud calibrate`: published results vs the cost model's predictions."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from kcloud.cli import app
from kcloud.cli._common import console, emit_json


@app.command()
def calibrate(
    refit: Annotated[bool, typer.Option("--fit", help="Refit the parameters (else: evaluate "
                                        "the shipped calibration)")] = False,
    save: Annotated[bool, typer.Option("--save", help="With --fit: write the fitted "
                                       "parameters as K-Cloud's calibration")] = False,
    csv: Annotated[Path | None, typer.Option("--csv", help="Published results (default: the "
                                             "shipped calibration.csv)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout")] = False,
) -> None:
    """Compare published results with the cost model (modeled), optionally refitting it."""
    from kcloud import calibrate as cal

    rows = cal.load_rows(csv)
    if refit:
        with console.status("fitting the cost model to published results...",
                            spinner="dots") if not as_json else nullcontext():
            result = cal.fit(rows)
        if save:
            path = cal.save(result.calibration)
            if not as_json:
                console.print(f"saved calibration to {path}")
    else:
        result = cal.evaluate(rows)
    if as_json:
        emit_json(result.to_dict())
        return
    t = Table(title="Calibration: published vs predicted (modeled)", header_style="bold")
    for col, j in (("device", "left"), ("model", "left"), ("scenario", "left"),
                   ("prec", "left"), ("published", "right"), ("predicted", "right"),
                   ("error", "right"), ("batch", "right"), ("tp", "right"),
                   ("bound", "left")):
        t.add_column(col, justify=j)  # type: ignore[arg-type]
    for r in result.rows:
        err = r["error_pct"]
        color = "green" if abs(err) <= 15 else "red"
        star = "*" if r["estimated"] else ""
        t.add_row(r["device"], r["model"], r["scenario"], r["precision"],
                  f"{r['published']:,.0f} {r['unit']}", f"{r['predicted']:,.0f}{star}",
                  f"[{color}]{err:+.1f}%[/]", str(r["batch"]), str(r["tp"]), r["bound"])
    console.print(t)
    console.print(f"max |error| {result.max_abs_error_pct:.1f}%   "
                  "* built on estimated catalog figures")
    for r in result.rows:
        if r["note"]:
            console.print(f"  {r['device']} {r['model']}: {r['note']}")
    if result.params:
        console.print("fitted: " + ", ".join(f"{k}={v:g}" for k, v in result.params.items()))

