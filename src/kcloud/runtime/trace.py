"""A run's timeline as a Chrome trace (trace event format; open in chrome://tracing or
Perfetto). One process row per worker; `R`, `F`, `S` = receive, forward, send of a
micro-batch, as in `Plan.schedule`; `AR` = an all-reduce of a tensor-parallel group (inside
`F`)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

_CATEGORY = {"F": "compute", "L": "latency-probe compute", "R": "recv", "S": "send",
             "AR": "allreduce"}


def trace_events(specs: Sequence[Any], timeline: dict[int, list[tuple[str, int, int, int]]],
                 modeled: Mapping[int, float]) -> list[dict[str, Any]]:
    """Complete ("X") events in microseconds from the run's first event, plus row names.

    `modeled`: the cost model's time per micro-batch of emulated workers, by rank."""
    t0 = min((e[2] for ev in timeline.values() for e in ev), default=0)
    events: list[dict[str, Any]] = []
    for s in specs:
        tp = len(s.group) if s.group else 1
        name = f"r{s.replica} s{s.stage} {s.device} ({s.backend})"
        if tp > 1:
            name += f" tp {s.tp_rank}/{tp}"
        mt = modeled.get(s.rank)
        events.append({"name": "process_name", "ph": "M", "pid": s.rank, "tid": 0,
                       "args": {"name": name}})
        events.append({"name": "process_sort_index", "ph": "M", "pid": s.rank, "tid": 0,
                       "args": {"sort_index": s.rank}})
        for action, m, a, b in timeline.get(s.rank, []):
            events.append({
                "name": f"{action}{m}", "ph": "X", "ts": (a - t0) / 1e3, "dur": (b - a) / 1e3,
                "pid": s.rank, "tid": 1 if action == "AR" else 0, "cat": _CATEGORY[action],
                "args": {"replica": s.replica, "stage": s.stage, "micro_batch": m,
                         "figures": "measured",
                         **({"modeled_time_s": mt} if mt is not None and action == "F" else {})},
            })
    return events


def save_trace(path: str | os.PathLike[str], events: list[dict[str, Any]]) -> Path:
    """Write trace events as a Chrome trace file."""
    p = Path(path)
    p.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}) + "\n")
    return p


def write_trace(path: str | os.PathLike[str], specs: Sequence[Any],
                timeline: dict[int, list[tuple[str, int, int, int]]],
                modeled: Mapping[int, float]) -> Path:
    return save_trace(path, trace_events(specs, timeline, modeled))
