"""What a plan is for: an objective and the constraints it must meet.

A `Goal` is a small frozen value that validates itself on creation, like the other vocabulary
types; user input reaches it through the CLI or `Goal.from_dict`, and every problem is one
`KCloudError` line.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from kcloud.errors import KCloudError
from kcloud.inputs import MAX_BATCH, MAX_TOKENS
from kcloud.precision import Precision
from kcloud.predict import DEFAULT_LLM_INPUT, DEFAULT_LLM_OUTPUT
from kcloud.workloads import NONE, WORKLOADS

OBJECTIVES: tuple[str, ...] = ("latency", "throughput", "energy", "cost")
# Decode attention on PIM devices: the search decides (auto), every LLM stage that can
# offloads (on), or none does (off).
OFFLOAD_MODES: tuple[str, ...] = ("auto", "on", "off")


class GoalError(KCloudError):
    """A goal whose values are out of range."""


class InfeasibleGoal(KCloudError):
    """A goal that no plan in the plan space meets; the message names the nearest feasible point."""


@dataclass(frozen=True)
class Goal:
    objective: str = "throughput"
    slo_s: float | None = None  # bound on a request's latency (a request = `batch` items)
    batch: int = 1  # items per request
    power_cap_w: float | None = None  # bound on the plan's modeled power draw
    max_devices: int | None = None  # bound on the devices the plan uses
    min_domestic_share: float = 0.0  # floor on the share of the plan's devices that are domestic
    precision: Precision | None = None  # None: each device type's default inference precision
    input_tokens: int | None = None  # tokens per sample (LLM prompt); None: the model's default
    output_tokens: int | None = None  # LLMs: generated tokens per request; None: the default
    # The workload whose lengths the model runs (`kcloud.workloads`); None: the model's own
    # benchmark workload where it has one; "none": the raw defaults.
    workload: str | None = None
    attention_offload: str = "auto"  # one of OFFLOAD_MODES

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise GoalError(f"unknown objective '{self.objective}'",
                            f"use one of: {', '.join(OBJECTIVES)}")
        if self.attention_offload not in OFFLOAD_MODES:
            raise GoalError(f"unknown attention offload '{self.attention_offload}'",
                            f"use one of: {', '.join(OFFLOAD_MODES)}")
        if self.slo_s is not None and not self.slo_s > 0:
            raise GoalError(f"SLO must be positive, got {self.slo_s:g} s",
                            "give --slo-ms greater than 0")
        for name in ("batch", "input_tokens", "output_tokens"):
            v = getattr(self, name)
            if v is None and name != "batch":
                continue
            high = MAX_BATCH if name == "batch" else MAX_TOKENS
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= high:
                raise GoalError(f"{name.replace('_', ' ')} must be an integer from 1 to "
                                f"{high:,}, got {v!r}",
                                f"give --{name.replace('_', '-')} from 1 to {high:,}")
        if self.power_cap_w is not None and not self.power_cap_w > 0:
            raise GoalError(f"power cap must be positive, got {self.power_cap_w:g} W",
                            "give --power-cap-w greater than 0")
        if self.max_devices is not None and self.max_devices < 1:
            raise GoalError(f"max devices must be 1 or more, got {self.max_devices}",
                            "give --max-devices 1 or more")
        if not 0.0 <= self.min_domestic_share <= 1.0:
            raise GoalError(f"domestic share floor must lie in [0, 1], got "
                            f"{self.min_domestic_share:g}", "give --min-domestic-share 0..1")
        if self.workload is not None:
            name = self.workload.strip().lower()
            if name != NONE and name not in WORKLOADS:
                raise GoalError(f"unknown workload '{self.workload}'",
                                f"use one of: {', '.join([*WORKLOADS, NONE])}")
            object.__setattr__(self, "workload", name)
        if self.precision is not None and not isinstance(self.precision, Precision):
            object.__setattr__(self, "precision", Precision.parse(str(self.precision)))

    @property
    def prompt_tokens(self) -> int:
        return self.input_tokens or DEFAULT_LLM_INPUT

    @property
    def generated_tokens(self) -> int:
        return self.output_tokens or DEFAULT_LLM_OUTPUT

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["precision"] = self.precision.value if self.precision else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Goal:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise GoalError(f"unknown goal field(s): {', '.join(unknown)}",
                            f"use: {', '.join(cls.__dataclass_fields__)}")
        return cls(**known)
