"""Calibration of the cost model against published whole-model results.

The procedure (reproducible, deterministic):

1. Each published row (device, model, scenario, precision, lengths) is predicted by the same
   code as `kcloud predict`. Rows from multi-accelerator systems ("x8 ... per accelerator") are
   predicted at the tensor-parallel degree (1, 2, 4 or 8) that gives the best per-accelerator
   throughput, as a submitter would choose. Blank lengths come from the row's benchmark workload
   (`kcloud.workloads`), as `kcloud predict` fills them by default.
2. The free parameters are few and physical: per device, the matrix-unit efficiency
   (`matrix_eff`); per device class, the matmul-to-conv efficiency ratio (`matmul_factor`),
   the achieved share of memory bandwidth (`memory_eff`) and the reduction length at which a
   matrix op is half efficient (`k_half`). Everything else (overheads, fill,
   attention and vector throughput) stays at its class prior.
3. They are fitted by bounded least squares (scipy) on the log error of every row, with a weak
   pull toward the class prior so that a parameter no row constrains stays at its prior.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import least_squares

from kcloud import inputs
from kcloud.errors import FitError, KCloudError
from kcloud.graph.layergraph import LayerGraph
from kcloud.hardware.cost import CLASS_PRIORS, Calibration, default_calibration, tp_max_degree
from kcloud.hardware.device import Device
from kcloud.precision import Precision
from kcloud.predict import Prediction, model_inputs, predict_graph, predict_llm
from kcloud.workloads import NONE

PRIOR_WEIGHT = 0.02  # pull of the class prior, relative to a row's log error
UNITS = ("samples/s", "tokens/s", "s", "ms")  # a row's figure: throughput, or latency
BOUNDS = {"matrix_eff": (0.05, 1.0), "matmul_factor": (0.25, 4.0), "memory_eff": (0.2, 0.95),
          "k_half": (1.0, 2048.0)}


@dataclass(frozen=True)
class Row:
    device: str
    model: str
    scenario: str
    precision: Precision
    input_tokens: int | None
    output_tokens: int | None
    value: float
    unit: str
    source: str

    @property
    def system_size(self) -> int:
        """Accelerators in the published system when the figure is per accelerator."""
        m = re.search(r"x(\d+)", self.source)
        return int(m.group(1)) if m and "per accelerator" in self.source else 1


def load_checks() -> list[Row]:
    """Published results that check the model and are never fitted (`checks.csv`: the
    NPUs' MLPerf single-stream latencies)."""
    return load_rows(None, shipped="checks.csv")


def load_rows(path: str | Path | None = None, *, shipped: str = "calibration.csv") -> list[Row]:
    """Published results: the CSV shipped with K-Cloud, or a user's file of the same columns."""
    if path is None:
        text = (resources.files("kcloud.hardware") / "data" / shipped).read_text()
        name = shipped
    else:
        name = str(path)
        text = inputs.read_text(path, "calibration file", "give the path of a CSV file")
    rows: list[Row] = []
    reader = csv.DictReader(text.splitlines())
    need = {"device", "model", "scenario", "precision", "input_tokens", "output_tokens",
            "value", "unit", "source"}
    missing = need - set(reader.fieldnames or [])
    if missing:
        raise KCloudError(f"{name}: missing columns {', '.join(sorted(missing))}",
                          "use the columns of the shipped calibration.csv")
    for i, r in enumerate(reader, start=2):
        if None in r or any(v is None for v in r.values()):
            raise KCloudError(f"{name} line {i}: {len(reader.fieldnames or [])} columns "
                              "expected", "fix the row")
        try:
            value = float(r["value"])
            unit = r["unit"].strip()
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"value must be a finite positive number, got {r['value']}")
            if unit not in UNITS:
                raise ValueError(f"unknown unit '{unit}' (use one of: {', '.join(UNITS)})")
            rows.append(Row(
                device=r["device"].strip(),
                model=r["model"].strip(),
                scenario=r["scenario"].strip(),
                precision=Precision.parse(r["precision"].strip()),
                input_tokens=_tokens(r, "input_tokens"),
                output_tokens=_tokens(r, "output_tokens"),
                value=value,
                unit=unit,
                source=r["source"].strip(),
            ))
        except (ValueError, KCloudError) as exc:
            msg = exc.problem if isinstance(exc, KCloudError) else str(exc)
            raise KCloudError(f"{name} line {i}: {msg}", "fix the row") from None
    if not rows:
        raise KCloudError(f"{name} holds no rows, only its header",
                          "add published results, one per line")
    return rows


def _tokens(r: dict[str, str], col: str) -> int | None:
    text = r[col].strip()
    return inputs.check_count(col, int(text), 1, inputs.MAX_TOKENS) if text else None


# ---------------------------------------------------------------------------------------------


@dataclass
class _Case:
    row: Row
    device: Device
    graphs: tuple[LayerGraph, ...]  # (graph,) or (prefill, decode)
    output_tokens: int | None
    tps: tuple[int, ...]
    note: str
    beams: int = 1


def _prepare(rows: Iterable[Row]) -> list[_Case]:
    from kcloud.hardware.catalog import get_device

    cases = []
    for row in rows:
        dev = get_device(row.device)
        # The row's benchmark workload fills what an LLM row leaves blank, as `kcloud
        # predict` does by default. An encoder row's length is the benchmark's padded one
        # (BERT's 384); the workload's mean unpadded length is what optimized harnesses
        # compute, so it is used in its place.
        probe_llm = row.output_tokens is not None or _is_llm(row.model)
        given = row.input_tokens if probe_llm else None
        inputs = model_inputs(row.model, None, input_tokens=given,
                              output_tokens=row.output_tokens)
        shape = inputs.shape
        note = ""
        if row.unit not in ("s", "ms") and (row.unit == "tokens/s") != inputs.is_llm:
            raise KCloudError(f"calibration row {row.device} {row.model}: unit {row.unit}, but "
                              f"{row.model} is predicted in "
                              f"{'tokens/s' if inputs.is_llm else 'samples/s'}",
                              "fix the row's unit")
        if shape.workload != NONE:
            filled = given is None or (inputs.is_llm and row.output_tokens is None)
            if filled:
                note = (f"workload {shape.workload}: lengths {shape.input_tokens}"
                        + (f"/{shape.output_tokens}" if inputs.is_llm else "")
                        + (" (estimated)" if shape.estimated else ""))
            if shape.beams > 1:
                note += f"; beam search x{shape.beams}"
        most = tp_max_degree(inputs.graphs[0])
        tps = tuple(t for t in (1, 2, 4, 8, 16) if t <= row.system_size and most % t == 0)
        cases.append(_Case(row, dev, inputs.graphs, shape.output_tokens if inputs.is_llm
                           else None, tps or (1,), note, shape.beams))
    return cases


def _is_llm(model: str) -> bool:
    from kcloud.graph.loaders import load_model_spec

    return bool(load_model_spec(model, batch=1, seq_len=None, phase=None,
                                kv_len=None).meta.get("is_llm"))


def _predict_case(case: _Case, cal: Calibration) -> Prediction:
    best: Prediction | None = None
    for tp in case.tps:
        try:
            if len(case.graphs) == 2:
                p = predict_llm(case.graphs[0], case.graphs[1], case.device, case.row.scenario,
                                output_tokens=case.output_tokens or 128,
                                precision=case.row.precision, calibration=cal, tp=tp,
                                beams=case.beams)
            else:
                p = predict_graph(case.graphs[0], case.device, case.row.scenario,
                                  precision=case.row.precision, calibration=cal, tp=tp)
        except FitError:
            continue
        if best is None or p.throughput > best.throughput:
            best = p
    if best is None:
        raise FitError(f"{case.row.model} fits on no {case.row.device} system of "
                       f"{case.row.system_size}", "check the calibration row")
    return best


def _metric(p: Prediction, row: Row) -> float:
    """The predicted figure in the row's unit."""
    if row.unit == "ms":
        return p.latency_s * 1e3
    return p.latency_s if row.unit == "s" else p.throughput


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Param:
    scope: str  # "device" | "class"
    key: str  # device id or class name
    name: str  # DeviceParams field

    @property
    def label(self) -> str:
        return f"{self.key}.{self.name}"


def _free_params(cases: list[_Case]) -> list[_Param]:
    out: list[_Param] = []
    classes: set[str] = set()
    for c in cases:
        p = _Param("device", c.device.id, "matrix_eff")
        if p not in out:
            out.append(p)
        classes.add(c.device.kind.value)
    for k in sorted(classes):
        out.extend(_Param("class", k, name) for name in ("matmul_factor", "memory_eff", "k_half"))
    return out


def _calibration_from(params: list[_Param], x: np.ndarray) -> Calibration:
    by_class: dict[str, dict[str, float]] = {}
    by_device: dict[str, dict[str, float]] = {}
    for p, v in zip(params, x, strict=True):
        target = by_device if p.scope == "device" else by_class
        target.setdefault(p.key, {})[p.name] = float(math.exp(v))
    return Calibration(by_class=by_class, by_device=by_device)


def _prior(p: _Param, cases: list[_Case]) -> float:
    kind = next(c.device.kind for c in cases
                if (c.device.id if p.scope == "device" else c.device.kind.value) == p.key)
    return float(getattr(CLASS_PRIORS[kind], p.name))


@dataclass(frozen=True)
class CalibrationResult:
    calibration: Calibration
    rows: list[dict[str, Any]]
    max_abs_error_pct: float
    params: dict[str, float]
    checks: list[dict[str, Any]] = field(default_factory=list)  # published, never fitted

    @property
    def loo_max_abs_error_pct(self) -> float | None:
        errs = [abs(r["loo_error_pct"]) for r in self.rows if "loo_error_pct" in r]
        return max(errs) if errs else None

    @property
    def loo_mean_abs_error_pct(self) -> float | None:
        errs = [abs(r["loo_error_pct"]) for r in self.rows if "loo_error_pct" in r]
        return sum(errs) / len(errs) if errs else None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"rows": self.rows, "max_abs_error_pct": self.max_abs_error_pct,
                             "params": self.params, "checks": self.checks,
                             "figures": "modeled"}
        if self.loo_max_abs_error_pct is not None:
            d["loo_max_abs_error_pct"] = self.loo_max_abs_error_pct
            d["loo_mean_abs_error_pct"] = self.loo_mean_abs_error_pct
        return d


def _fit_cases(cases: list[_Case], start: dict[str, float] | None = None,
               max_nfev: int = 400) -> tuple[list[_Param], np.ndarray]:
    """The free parameters of `cases` and their fitted values (log scale); `start` (label ->
    value) seeds the parameters it names."""
    params = _free_params(cases)
    prior = np.log([_prior(p, cases) for p in params])
    lo = np.log([BOUNDS[p.name][0] for p in params])
    hi = np.log([BOUNDS[p.name][1] for p in params])
    x0 = prior.copy()
    if start:
        x0 = np.array([math.log(start[p.label]) if p.label in start else v
                       for p, v in zip(params, prior, strict=True)])

    def residuals(x: np.ndarray) -> np.ndarray:
        cal = _calibration_from(params, x)
        errs = [math.log(_metric(_predict_case(c, cal), c.row) / c.row.value) for c in cases]
        return np.concatenate([errs, PRIOR_WEIGHT * (x - prior)])

    sol = least_squares(residuals, np.clip(x0, lo + 1e-9, hi - 1e-9), bounds=(lo, hi),
                        diff_step=1e-3, xtol=1e-8, ftol=1e-10, max_nfev=max_nfev)
    return params, sol.x


def fit(rows: list[Row] | None = None, *, cv: bool = False) -> CalibrationResult:
    """Fit the free parameters to the published rows; returns the calibration and the table.

    With `cv`, every row is also predicted by a fit made without it (leave-one-out), so the
    table shows the error on a row the fit never saw beside the in-sample error.
    """
    cases = _prepare(rows if rows is not None else load_rows())
    params, x = _fit_cases(cases)
    cal = _calibration_from(params, x)
    cal = Calibration(cal.by_class, cal.by_device, meta={
        "procedure": "kcloud.calibrate.fit: bounded least squares on log error, "
                     f"prior weight {PRIOR_WEIGHT}",
        "rows": len(cases),
        "parameters": len(params),
    })
    fitted = {p.label: float(math.exp(v)) for p, v in zip(params, x, strict=True)}
    result = _result(cases, cal, {k: round(v, 4) for k, v in fitted.items()})
    result = replace(result, checks=table(_prepare(load_checks()), cal))
    if cv:
        _leave_one_out(cases, fitted, result.rows)
    return result


def _leave_one_out(cases: list[_Case], fitted: dict[str, float],
                   rows: list[dict[str, Any]]) -> None:
    """Add `loo_predicted` and `loo_error_pct` to each row: its prediction by a fit of the other
    rows (seeded at the full fit, so each refit is short). A device whose only row is held out
    falls back to its class's fitted and prior values, as an uncalibrated device would."""
    for i, (case, row) in enumerate(zip(cases, rows, strict=True)):
        rest = cases[:i] + cases[i + 1:]
        params, x = _fit_cases(rest, start=fitted, max_nfev=60)
        pred = _metric(_predict_case(case, _calibration_from(params, x)), case.row)
        row["loo_predicted"] = pred
        row["loo_error_pct"] = 100.0 * (pred - case.row.value) / case.row.value


def evaluate(rows: list[Row] | None = None,
             calibration: Calibration | None = None) -> CalibrationResult:
    """Published vs predicted with a given (default: the shipped) calibration, no fitting."""
    cases = _prepare(rows if rows is not None else load_rows())
    cal = calibration or default_calibration()
    return replace(_result(cases, cal, {}), checks=table(_prepare(load_checks()), cal))


def table(cases: list[_Case], cal: Calibration) -> list[dict[str, Any]]:
    out = []
    for c in cases:
        p = _predict_case(c, cal)
        pred = _metric(p, c.row)
        out.append({
            "device": c.row.device,
            "model": c.row.model,
            "scenario": c.row.scenario,
            "precision": c.row.precision.value,
            "unit": c.row.unit,
            "published": c.row.value,
            "predicted": pred,
            "error_pct": 100.0 * (pred - c.row.value) / c.row.value,
            "batch": p.batch,
            "tp": p.tp,
            "bound": p.bound,
            "estimated": p.estimated,
            "note": c.note,
            "source": c.row.source,
        })
    return out


def _result(cases: list[_Case], cal: Calibration, params: dict[str, float]) -> CalibrationResult:
    rows = table(cases, cal)
    worst = max((abs(r["error_pct"]) for r in rows), default=0.0)
    return CalibrationResult(cal, rows, worst, params)


def save(cal: Calibration, path: Path | None = None) -> Path:
    import json

    target = path or Path(str(resources.files("kcloud.hardware") / "calibrated.json"))
    target.write_text(json.dumps(cal.to_dict(), indent=2, sort_keys=True) + "\n")
    default_calibration.cache_clear()
    return target
