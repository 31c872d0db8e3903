"""A Plan: how one model runs on a cluster. Frozen, validated, JSON round-trip, versioned.

A plan holds replicas (data parallel); each replica is a pipeline of stages; a stage is a
contiguous range of layers on a group of devices of one type, tensor-parallel over the group.
Every predicted figure in it is `modeled`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kcloud.errors import KCloudError
from kcloud.planner.actions import Action, Kind, render

PLAN_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Stage:
    start: int  # first layer (inclusive)
    end: int  # last layer (exclusive)
    device_type: str  # catalog id (partition ids allowed)
    devices: tuple[str, ...]  # cluster slots, e.g. "node0/furiosa-rngd/3"; len == tp
    precision: str
    time_s: float = 0.0  # modeled time of one micro-batch through this stage
    comm_s: float = 0.0  # modeled time to send its output to the next stage
    memory_bytes: float = 0.0  # modeled memory per device
    power_w: float = 0.0  # modeled power per device while busy

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise KCloudError(f"stage layer range [{self.start}, {self.end}) is empty",
                              "a stage must hold at least one layer")
        if not self.devices:
            raise KCloudError("stage with no devices", "give each stage at least one device")
        if len(set(self.devices)) != len(self.devices):
            raise KCloudError(f"stage lists a device twice: {', '.join(self.devices)}",
                              "each device may be used once")

    @property
    def tp(self) -> int:
        return len(self.devices)

    @property
    def layers(self) -> range:
        return range(self.start, self.end)


@dataclass(frozen=True)
class Replica:
    stages: tuple[Stage, ...]

    def __post_init__(self) -> None:
        if not self.stages:
            raise KCloudError("replica with no stages", "give each replica at least one stage")
        for a, b in zip(self.stages, self.stages[1:], strict=False):
            if a.end != b.start:
                raise KCloudError(
                    f"stages are not contiguous: one ends at layer {a.end}, the next starts "
                    f"at {b.start}", "make each stage start where the previous one ends")

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(d for s in self.stages for d in s.devices)

    @property
    def bottleneck(self) -> Stage:
        return max(self.stages, key=lambda s: max(s.time_s, s.comm_s))


@dataclass(frozen=True)
class Predicted:
    latency_s: float
    throughput: float
    unit: str
    power_w: float
    energy_per_item_j: float
    device_hours_per_item: float
    cost_per_item_usd: float | None
    comm_share: float  # share of a micro-batch's pipeline time spent communicating
    estimated: bool = False
    figures: str = "modeled"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Plan:
    model: str  # what the runtime rebuilds: zoo name, file.py:factory or .onnx
    cluster: str  # built-in name or path of the cluster file
    objective: str
    batch: int  # items per request batch
    micro_batch: int
    seq_len: int | None
    phase: str
    n_layers: int
    replicas: tuple[Replica, ...]
    predicted: Predicted
    goal: dict[str, Any] = field(default_factory=dict)
    output_tokens: int | None = None  # LLM plans: generated tokens per request
    notes: tuple[str, ...] = ()
    version: int = PLAN_SCHEMA_VERSION

    def __post_init__(self) -> None:
        if not self.replicas:
            raise KCloudError("plan with no replicas", "a plan needs at least one replica")
        seen: set[str] = set()
        for r in self.replicas:
            if r.stages[0].start != 0 or r.stages[-1].end != self.n_layers:
                raise KCloudError(
                    f"a replica covers layers [{r.stages[0].start}, {r.stages[-1].end}) of "
                    f"{self.n_layers}", "each replica must run every layer once")
            for d in r.devices:
                if d in seen:
                    raise KCloudError(f"device {d} is used twice in the plan",
                                      "each device may be used once")
                seen.add(d)
        if self.micro_batch < 1 or self.batch < 1:
            raise KCloudError("batch and micro-batch must be positive", "fix the plan")

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(d for r in self.replicas for d in r.devices)

    # -- JSON ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["notes"] = list(self.notes)
        return {"schema": "kcloud.plan", **d}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.write_text(self.to_json() + "\n")
        return p

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        if d.get("schema") != "kcloud.plan":
            raise KCloudError("not a K-Cloud plan (no schema 'kcloud.plan')",
                              "give a file written by `kcloud plan -o`")
        version = d.get("version")
        if version != PLAN_SCHEMA_VERSION:
            raise KCloudError(f"plan schema version {version} is not supported "
                              f"(this K-Cloud reads {PLAN_SCHEMA_VERSION})",
                              "re-create the plan with this version of `kcloud plan`")
        try:
            replicas = tuple(
                Replica(tuple(Stage(**{**s, "devices": tuple(s["devices"])})
                              for s in r["stages"]))
                for r in d["replicas"]
            )
            fields = {k: v for k, v in d.items()
                      if k not in ("schema", "replicas", "predicted", "notes")}
            return cls(replicas=replicas, predicted=Predicted(**d["predicted"]),
                       notes=tuple(d.get("notes", ())), **fields)
        except (KeyError, TypeError) as exc:
            raise KCloudError(f"malformed plan: {exc}",
                              "give a file written by `kcloud plan -o`") from None

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise KCloudError(f"plan is not valid JSON: {exc.msg} at line {exc.lineno}",
                              "give a file written by `kcloud plan -o`") from None

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        p = Path(path)
        if not p.is_file():
            raise KCloudError(f"no plan file at {p}", "write one with `kcloud plan ... -o FILE`")
        return cls.from_json(p.read_text())

    # -- readable schedule -----------------------------------------------------------------
    def schedule(self, n_micro: int | None = None) -> dict[str, list[str]]:
        """Per-worker action lists of a GPipe-style inference schedule.

        Actions: `F<m>` run micro-batch m forward, `R<m>` receive it from the previous stage,
        `S<m>` send it to the next stage; tensor-parallel peers do the same with `AR` after
        each stage (all-reduce inside the stage).
        """
        n = n_micro if n_micro is not None else max(1, self.batch // self.micro_batch)
        out: dict[str, list[str]] = {}
        for r in self.replicas:
            last = len(r.stages) - 1
            for si, st in enumerate(r.stages):
                for dev in st.devices:
                    acts: list[Action] = []
                    for m in range(n):
                        if si > 0:
                            acts.append(Action(Kind.RECV, m))
                        acts.append(Action(Kind.FORWARD, m, reduced=st.tp > 1))
                        if si < last:
                            acts.append(Action(Kind.SEND, m))
                    out[dev] = render(acts)
        return out
