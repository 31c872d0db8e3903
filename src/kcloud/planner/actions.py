"""The schedule vocabulary: one action of one worker, as data that prints and parses back.

An action is a kind, a micro-batch and, in a generation, its step: `F3` forwards micro-batch
3, `P0` prefills micro-batch 0, `D0.5` runs its decode step 5, `R2`/`S2` receive/send its
hidden states (`RT0.5`/`ST0.5`: the generated token's hop back to the first stage), and a
compute that all-reduced over its tensor-parallel group is written `F3+AR`. The planner's
printed schedule (`Plan.schedule`), the workers' timelines (their event kinds), the run's
report and its trace all use it, in the manner of torch pipelining's `_Action` strings.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class Kind(StrEnum):
    FORWARD = "F"
    PREFILL = "P"
    DECODE = "D"
    RECV = "R"
    SEND = "S"
    RECV_TOKEN = "RT"
    SEND_TOKEN = "ST"
    ALLREDUCE = "AR"
    PROBE = "L"  # a latency probe's forward
    PROBE_PREFILL = "LP"
    PROBE_DECODE = "LD"
    WARMUP = "W"

    @property
    def computes(self) -> bool:
        return self in (Kind.FORWARD, Kind.PREFILL, Kind.DECODE)


_TEXT = re.compile(r"^(RT|ST|AR|LP|LD|F|P|D|R|S|L|W)(\d+)(?:\.(\d+))?(\+AR)?$")


@dataclass(frozen=True)
class Action:
    kind: Kind
    micro: int
    step: int | None = None  # a generation's step (0: the prefill)
    reduced: bool = False  # its compute all-reduced over the group

    def __str__(self) -> str:
        step = "" if self.step is None or self.kind in (Kind.PREFILL, Kind.PROBE_PREFILL) \
            else f".{self.step}"
        return f"{self.kind.value}{self.micro}{step}" + ("+AR" if self.reduced else "")

    @classmethod
    def parse(cls, text: str) -> Action:
        m = _TEXT.match(text.strip())
        if m is None:
            raise ValueError(f"not a schedule action: {text!r}")
        kind = Kind(m.group(1))
        step = int(m.group(3)) if m.group(3) is not None else (
            0 if kind in (Kind.PREFILL, Kind.PROBE_PREFILL) else None)
        return cls(kind, int(m.group(2)), step, m.group(4) is not None)


def render(actions: Iterable[Action]) -> list[str]:
    return [str(a) for a in actions]


def parse_all(texts: Sequence[str]) -> list[Action]:
    return [Action.parse(t) for t in texts]


def from_events(events: Sequence[tuple[Any, ...]]) -> list[Action]:
    """What a worker ran, in order, from its timed events ((kind, micro, start, end[, step]));
    the all-reduces fold into the compute they belong to, latency probes are left out."""
    gen = bool(events) and len(events[0]) > 4
    reduced = {(e[1], e[4] if gen else None) for e in events if e[0] == Kind.ALLREDUCE}
    out: list[Action] = []
    for e in events:
        kind = Kind(e[0])
        if kind in (Kind.ALLREDUCE, Kind.PROBE, Kind.PROBE_PREFILL, Kind.PROBE_DECODE):
            continue
        step = e[4] if gen else None
        out.append(Action(kind, e[1], step, kind.computes and (e[1], step) in reduced))
    return out
