"""Calibration of the cost model against published whole-model results.

The procedure (reproducible, deterministic):

1. Each published row (device, model, scenario, precision, lengths) is predicted by the same
   code as `kcloud predict`. Rows from multi-accelerator systems ("x8 ... per accelerator") are
   predicted at the tensor-parallel degree (1, 2, 4 or 8) that gives the best per-accelerator
   throughput, as a submitter would choose. Blank LLM lengths come from `BENCHMARK_WORKLOADS`.
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
from dataclasses import dataclass
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
from kcloud.predict import Prediction, predict_graph, predict_llm
from kcloud.workloads import BENCHMARK_WORKLOADS

PRIOR_WEIGHT = 0.02  # pull of the class prior, relative to a row's log error
UNITS = ("samples/s", "tokens/s", "s")  # a row's figure: throughput, or latency in seconds
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


def load_rows(path: str | Path | None = None) -> list[Row]:
    """Published results: the CSV shipped with K-Cloud, or a user's file of the same columns."""
    if path is None:
        text = (resources.files("kcloud.hardware") / "data" / "calibration.csv").read_text()
        name = "calibration.csv"
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
    from kcloud.graph.loaders import load_model_spec
    from kcloud.hardware.catalog import get_device

    cases = []
    for row in rows:
        dev = get_device(row.device)
        probe = load_model_spec(row.model, batch=1, seq_len=None, phase=None, kv_len=None)
        wl = BENCHMARK_WORKLOADS.get(row.model)
        note = ""
        llm = bool(probe.meta.get("is_llm"))
        if row.unit != "s" and (row.unit == "tokens/s") != llm:
            raise KCloudError(f"calibration row {row.device} {row.model}: unit {row.unit}, but "
                              f"{row.model} is predicted in "
                              f"{'tokens/s' if llm else 'samples/s'}", "fix the row's unit")
        if llm:
            prompt = row.input_tokens or (wl.input_tokens if wl else 128)
            out = row.output_tokens or (wl.output_tokens if wl and wl.output_tokens else 128)
            if row.input_tokens is None or row.output_tokens is None:
                note = f"lengths {prompt}/{out} from the data set (estimated)"
            graphs: tuple[LayerGraph, ...] = (
                load_model_spec(row.model, batch=1, seq_len=prompt, phase="prefill", kv_len=None),
                load_model_spec(row.model, batch=1, seq_len=1, phase="decode",
                                kv_len=prompt + out // 2),
            )
            output_tokens: int | None = out
        else:
            seq = row.input_tokens
            if wl is not None:
                note = f"{wl.input_tokens} tokens: mean unpadded length (estimated)"
                seq = wl.input_tokens
            graphs = (load_model_spec(row.model, batch=1, seq_len=seq, phase=None, kv_len=None),)
            output_tokens = None
        most = tp_max_degree(graphs[0])
        tps = tuple(t for t in (1, 2, 4, 8, 16) if t <= row.system_size and most % t == 0)
        beams = wl.beams if wl and len(graphs) == 2 else 1
        if beams > 1:
            note += f"; beam search x{beams}"
        cases.append(_Case(row, dev, graphs, output_tokens, tps or (1,), note, beams))
    return cases


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
    return p.latency_s if row.unit in ("s", "ms") else p.throughput


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

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "max_abs_error_pct": self.max_abs_error_pct,
                "params": self.params, "figures": "modeled"}


def fit(rows: list[Row] | None = None) -> CalibrationResult:
    """Fit the free parameters to the published rows; returns the calibration and the table."""
    cases = _prepare(rows if rows is not None else load_rows())
    params = _free_params(cases)
    prior = np.log([_prior(p, cases) for p in params])
    lo = np.log([BOUNDS[p.name][0] for p in params])
    hi = np.log([BOUNDS[p.name][1] for p in params])

    def residuals(x: np.ndarray) -> np.ndarray:
        cal = _calibration_from(params, x)
        errs = [math.log(_metric(_predict_case(c, cal), c.row) / c.row.value) for c in cases]
        return np.concatenate([errs, PRIOR_WEIGHT * (x - prior)])

    sol = least_squares(residuals, np.clip(prior, lo + 1e-9, hi - 1e-9), bounds=(lo, hi),
                        diff_step=1e-3, xtol=1e-8, ftol=1e-10, max_nfev=400)
    cal = _calibration_from(params, sol.x)
    cal = Calibration(cal.by_class, cal.by_device, meta={
        "procedure": "kcloud.calibrate.fit: bounded least squares on log error, "
                     f"prior weight {PRIOR_WEIGHT}",
        "rows": len(cases),
        "parameters": len(params),
    })
    return _result(cases, cal, {p.label: round(float(math.exp(v)), 4)
                              for p, v in zip(params, sol.x, strict=True)})


def evaluate(rows: list[Row] | None = None,
             calibration: Calibration | None = None) -> CalibrationResult:
    """Published vs predicted with a given (default: the shipped) calibration, no fitting."""
    cases = _prepare(rows if rows is not None else load_rows())
    return _result(cases, calibration or default_calibration(), {})


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
