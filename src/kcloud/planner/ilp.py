"""Combining replicas: an integer program over pipeline templates, solved with HiGHS.

Variables: n_k >= 0, the replicas of template k (all at one micro-batch size). Maximize
sum n_k * throughput_k subject to
    sum n_k * devices_k[t] <= available[t]              for every device type t
    sum n_k * power_k <= power cap                       (if any)
    sum n_k * devices_k <= max devices                   (if any)
    sum n_k * (domestic_k - F * devices_k) >= 0          (domestic share floor F)
    sum n_k >= 1
Every template already meets the SLO on its own, so every mix does.

Tensor-parallel groups must sit inside one node. Stage sizes are powers of two and every node
holding a type holds a multiple of that type's largest stage size (the plan space only offers
such degrees), so groups pack into the nodes without waste whenever the per-type counts allow:
counting devices by type is exact for the groups (see `kcloud.planner.assign`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from functools import lru_cache

import highspy
import numpy as np

from kcloud.planner.evaluate import Template


@lru_cache(maxsize=1)
def _silence_banner() -> None:
    """HiGHS prints a banner on stdout when its first instance is made; keep stdout clean."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def best_counts(templates: Sequence[Template], available: dict[int, int], *,
                power_cap_w: float | None = None, max_devices: int | None = None,
                min_domestic_share: float = 0.0) -> list[int] | None:
    """Replica counts that maximize total throughput under the constraints (None: infeasible)."""
    if not templates:
        return None
    _silence_banner()
    n = len(templates)
    types = sorted(available)
    rows: list[tuple[np.ndarray, float, float]] = []  # (coefficients, lower, upper)
    inf = highspy.kHighsInf
    for t in types:
        a = np.array([dict(tp.devices).get(t, 0) for tp in templates], dtype=float)
        if a.any():
            rows.append((a, -inf, float(available[t])))
    if power_cap_w is not None:
        rows.append((np.array([tp.power_w for tp in templates]), -inf, float(power_cap_w)))
    devs = np.array([tp.n_devices for tp in templates], dtype=float)
    if max_devices is not None:
        rows.append((devs, -inf, float(max_devices)))
    if min_domestic_share > 0:
        dom = np.array([tp.domestic_devices for tp in templates], dtype=float)
        rows.append((dom - min_domestic_share * devs, -1e-9, inf))
    rows.append((np.ones(n), 1.0, inf))

    # Scale the objective so HiGHS' tolerances see numbers near 1.
    thr = np.array([tp.throughput for tp in templates])
    scale = float(thr.max()) if thr.max() > 0 else 1.0
    upper = np.array([
        min([available[t] // c for t, c in tp.devices if c > 0] or [0]) for tp in templates
    ], dtype=float)

    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("mip_rel_gap", 1e-9)
    h.setOptionValue("time_limit", 30.0)
    # Tens of columns and a few rows: presolve costs more than it saves (about 8.5 against
    # 3.5 ms a program on the 1,024-device search's, same answers).
    h.setOptionValue("presolve", "off")
    lp = highspy.HighsLp()
    lp.num_col_ = n
    lp.num_row_ = len(rows)
    lp.col_cost_ = -thr / scale
    lp.col_lower_ = np.zeros(n)
    lp.col_upper_ = upper
    lp.row_lower_ = np.array([r[1] for r in rows])
    lp.row_upper_ = np.array([r[2] for r in rows])
    mat = np.array([r[0] for r in rows])  # (rows, n)
    starts, index, value = [0], [], []
    for k in range(n):
        nz = np.flatnonzero(mat[:, k])
        index.extend(int(i) for i in nz)
        value.extend(float(v) for v in mat[nz, k])
        starts.append(len(index))
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = np.array(starts, dtype=np.int32)
    lp.a_matrix_.index_ = np.array(index, dtype=np.int32)
    lp.a_matrix_.value_ = np.array(value)
    lp.integrality_ = [highspy.HighsVarType.kInteger] * n
    h.passModel(lp)
    h.run()
    if h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
        return None
    x = np.rint(np.array(h.getSolution().col_value)).astype(int)
    return [max(0, int(v)) for v in x]
