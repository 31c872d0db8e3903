"""A Plan: how one model runs on a cluster. Frozen, validated, JSON round-trip, versioned.

A plan holds replicas (data parallel); each replica is a pipeline of stages; a stage is a
contiguous range of layers on a group of devices of one type, tensor-parallel over the group.
Every predicted figure in it is `modeled`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kcloud import inputs
from kcloud.errors import KCloudError
from kcloud.planner.actions import Action, Kind, render

PLAN_SCHEMA_VERSION = 1
PHASES = ("forward", "prefill", "decode")
_HINT = "give a file written by `kcloud plan -o`"


@dataclass(frozen=True)
class AttentionOffload:
    """A stage's decode attention on PIM devices beside its own (the KV cache lives there)."""

    device_type: str  # catalog id of the PIM devices
    count: int
    devices: tuple[str, ...] = ()  # cluster slots; len == count

    def __post_init__(self) -> None:
        if self.count < 1:
            raise KCloudError("attention offload with no devices",
                              "give attention_offload a count of 1 or more")
        if self.devices and len(self.devices) != self.count:
            raise KCloudError(f"attention offload lists {len(self.devices)} devices for a "
                              f"count of {self.count}", "make count the number of devices")


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
    attention_offload: AttentionOffload | None = None  # decode attention on PIM devices

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
            offloaded = tuple(d for s in r.stages if s.attention_offload
                              for d in s.attention_offload.devices)
            for d in r.devices + offloaded:
                if d in seen:
                    raise KCloudError(f"device {d} is used twice in the plan",
                                      "each device may be used once")
                seen.add(d)
        if self.micro_batch < 1 or self.batch < 1:
            raise KCloudError("batch and micro-batch must be positive", "fix the plan")

    @property
    def devices(self) -> tuple[str, ...]:
        """Every device the plan uses: the stages' and their attention offloads'."""
        return tuple(d for r in self.replicas for d in r.devices) + self.offload_devices

    @property
    def offload_devices(self) -> tuple[str, ...]:
        return tuple(d for r in self.replicas for s in r.stages if s.attention_offload
                     for d in s.attention_offload.devices)

    # -- JSON ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["notes"] = list(self.notes)
        for r in d["replicas"]:
            for st in r["stages"]:
                if st["attention_offload"] is None:  # absent when there is none
                    del st["attention_offload"]
        return {"schema": "kcloud.plan", **d}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.write_text(self.to_json() + "\n")
        return p

    @classmethod
    def from_dict(cls, d: Any) -> Plan:
        """A plan from its JSON document, every field checked (`_PlanIn`): a file from
        someone else is data, and a bad one is a one-line error naming the field."""
        if not isinstance(d, dict):
            kind = {list: "list", str: "string", bool: "true/false", type(None): "null"}.get(
                type(d), "number")
            raise KCloudError(f"not a K-Cloud plan (a JSON {kind}, not an object)", _HINT)
        if d.get("schema") != "kcloud.plan":
            raise KCloudError("not a K-Cloud plan (no schema 'kcloud.plan')",
                              "give a file written by `kcloud plan -o`")
        version = d.get("version")
        if version != PLAN_SCHEMA_VERSION:
            raise KCloudError(f"plan schema version {version!r} is not supported "
                              f"(this K-Cloud reads {PLAN_SCHEMA_VERSION})",
                              "re-create the plan with this version of `kcloud plan`")
        try:
            raw = _PlanIn.model_validate(d)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            raise KCloudError(f"malformed plan: field {where}: {err['msg'][:1].lower()}"
                              f"{err['msg'][1:]}", _HINT) from None
        def stage(s: _StageIn) -> Stage:
            off = None if s.attention_offload is None else AttentionOffload(
                s.attention_offload.device_type, s.attention_offload.count,
                tuple(s.attention_offload.devices))
            return Stage(**{**s.model_dump(exclude={"attention_offload"}),
                            "devices": tuple(s.devices), "attention_offload": off})

        replicas = tuple(Replica(tuple(stage(s) for s in r.stages)) for r in raw.replicas)
        fields = raw.model_dump(exclude={"schema_", "replicas", "predicted", "notes"})
        return cls(replicas=replicas, predicted=Predicted(**raw.predicted.model_dump()),
                   notes=tuple(raw.notes), **fields)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            doc = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            where = f": {exc.msg} at line {exc.lineno}" \
                if isinstance(exc, json.JSONDecodeError) else " (nested too deep)"
            raise KCloudError(f"plan is not valid JSON{where}", _HINT) from None
        return cls.from_dict(doc)

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        return cls.from_json(inputs.read_text(path, "plan file",
                                              "write one with `kcloud plan ... -o FILE`"))

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


# ---- the plan file, as pydantic checks it (the edge; the frozen values above are inside) -----

_Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class _OffloadIn(_In):
    device_type: Annotated[str, Field(min_length=1)]
    count: Annotated[int, Field(strict=True, ge=1, le=inputs.MAX_DEVICES)]
    devices: Annotated[list[Annotated[str, Field(min_length=1)]],
                       Field(max_length=inputs.MAX_DEVICES)] = []


class _StageIn(_In):
    start: Annotated[int, Field(strict=True, ge=0, lt=inputs.MAX_LAYERS)]
    end: Annotated[int, Field(strict=True, ge=1, le=inputs.MAX_LAYERS)]
    device_type: Annotated[str, Field(min_length=1)]
    devices: Annotated[list[Annotated[str, Field(min_length=1)]],
                       Field(min_length=1, max_length=inputs.MAX_DEVICES)]
    precision: Annotated[str, Field(min_length=1)]
    time_s: _Seconds = 0.0
    comm_s: _Seconds = 0.0
    memory_bytes: _Seconds = 0.0
    power_w: _Seconds = 0.0
    attention_offload: _OffloadIn | None = None


class _ReplicaIn(_In):
    stages: Annotated[list[_StageIn], Field(min_length=1, max_length=inputs.MAX_LAYERS)]


class _PredictedIn(_In):
    latency_s: _Seconds
    throughput: _Seconds
    unit: str
    power_w: _Seconds
    energy_per_item_j: _Seconds
    device_hours_per_item: _Seconds
    cost_per_item_usd: _Seconds | None
    comm_share: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
    estimated: bool = False
    figures: str = "modeled"


class _PlanIn(_In):
    schema_: Literal["kcloud.plan"] = Field(alias="schema")
    version: int
    model: Annotated[str, Field(min_length=1)]
    cluster: Annotated[str, Field(min_length=1)]
    objective: Literal["latency", "throughput", "energy", "cost"]
    batch: Annotated[int, Field(strict=True, ge=1, le=inputs.MAX_BATCH)]
    micro_batch: Annotated[int, Field(strict=True, ge=1, le=inputs.MAX_BATCH)]
    seq_len: Annotated[int, Field(strict=True, ge=1, le=inputs.MAX_TOKENS)] | None
    phase: Literal[PHASES]  # type: ignore[valid-type]
    n_layers: Annotated[int, Field(strict=True, ge=1, le=inputs.MAX_LAYERS)]
    replicas: Annotated[list[_ReplicaIn], Field(min_length=1, max_length=inputs.MAX_DEVICES)]
    predicted: _PredictedIn
    goal: dict[str, Any] = {}
    output_tokens: Annotated[int, Field(strict=True, ge=1, le=inputs.MAX_TOKENS)] | None = None
    notes: list[str] = []

