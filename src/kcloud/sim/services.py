"""Services of a fleet study: a YAML file (or flags) to `Service`s the simulator runs.

    duration_s: 600          # synthetic streams stop here (traces: their own length)
    seed: 1
    services:
      - name: chat
        model: llama-3.1-8b
        cluster: k-cloud-rack      # the planner picks the plan on it (objective below) ...
        plan: chat-plan.json       # ... or a plan from `kcloud plan -o` (cluster still given)
        objective: throughput
        replicas: 4                # default: the plan's replicas
        slo: {ttft_ms: 1000, tpot_ms: 100}     # non-LLM: {latency_ms: 50}
        trace: ../shared/traces/azure-llm-2023-conversation.csv
        rate_scale: 1.0
        # or: rate: 5, arrivals: poisson|gamma, burstiness: 2,
        #     prompt_tokens: 512, output_tokens: 128, length_cv: 0.5
        router: least-outstanding  # round-robin | least-outstanding | speed-aware
        chunk_tokens: 512          # LLM engine: token budget per iteration
        max_seqs: 128
        max_batch: 8               # non-LLM: dynamic batching bound
        autoscale: {min: 1, max: 8, up: 8, down: 1, interval_s: 10, startup_s: 30}
        power_down_idle_s: 60
        wake_s: 5
        front_end: true            # behind kcloud serve's HTTP front end, as measured on this
                                   # host (`kcloud sim front-end`)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kcloud.errors import KCloudError
from kcloud.planner.scheduling import SchedulerConfig
from kcloud.sim.fleet import ROUTERS, Autoscale, Service, Slo
from kcloud.sim.replica import ReplicaModel, replica_models
from kcloud.sim.streams import Lengths, read_trace, synthetic_stream, trace_stream

DEFAULT_BLOCK = 16


class SloSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ttft_ms: float | None = Field(default=None, gt=0)
    tpot_ms: float | None = Field(default=None, gt=0)
    latency_ms: float | None = Field(default=None, gt=0)

    def build(self) -> Slo:
        def s(v: float | None) -> float | None:
            return None if v is None else v / 1e3
        return Slo(s(self.ttft_ms), s(self.tpot_ms), s(self.latency_ms))


class AutoscaleSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min: int = Field(default=1, ge=0)
    max: int = Field(default=8, ge=1)
    up: float = Field(default=8.0, gt=0)
    down: float = Field(default=1.0, ge=0)
    interval_s: float = Field(default=10.0, gt=0)
    startup_s: float = Field(default=30.0, ge=0)


class ServiceSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    model: str = Field(min_length=1)
    cluster: str = "k-cloud-rack"
    plan: str | None = None
    objective: str = "throughput"
    replicas: int | None = Field(default=None, ge=0)
    slo: SloSpec = SloSpec()
    trace: str | None = None
    rate_scale: float = Field(default=1.0, gt=0)
    rate: float | None = Field(default=None, gt=0)
    arrivals: str = "poisson"
    burstiness: float = Field(default=1.0, gt=0)
    prompt_tokens: int | None = Field(default=None, ge=1)
    output_tokens: int | None = Field(default=None, ge=1)
    length_cv: float = Field(default=0.0, ge=0)
    router: str = "least-outstanding"
    chunk_tokens: int = Field(default=512, ge=1)
    max_seqs: int = Field(default=128, ge=1)
    max_batch: int = Field(default=8, ge=1)
    max_tokens: int | None = Field(default=None, ge=2)
    autoscale: AutoscaleSpec | None = None
    power_down_idle_s: float | None = Field(default=None, gt=0)
    wake_s: float = Field(default=0.0, ge=0)
    devices: list[str] | None = None  # only these device types (sizing, roadmap)
    front_end: bool = False  # add this host's measured front-end costs (`kcloud.sim.front_end`)


class FleetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    duration_s: float | None = Field(default=None, gt=0)
    seed: int = 0
    services: list[ServiceSpec] = Field(min_length=1)


def load_spec(path: str | Path) -> FleetSpec:
    p = Path(path)
    if not p.is_file():
        raise KCloudError(f"no services file at {p}", "give a YAML file (see `kcloud sim --help`)")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError:
        raise KCloudError(f"services file {p}: not valid YAML", "fix the file's syntax") from None
    return parse_spec(data, str(p))


def parse_spec(data: Any, source: str) -> FleetSpec:
    try:
        spec = FleetSpec.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "(top level)"
        raise KCloudError(f"services {source}: field {where}: {err['msg']}",
                          "fix the services file") from None
    names = [s.name for s in spec.services]
    if len(set(names)) != len(names):
        raise KCloudError(f"services {source}: a service name is used twice",
                          "give each service a unique name")
    for i, s in enumerate(spec.services):
        if s.router not in ROUTERS:
            raise KCloudError(f"services {source}: field services.{i}.router: unknown router "
                              f"'{s.router}'", f"use one of: {', '.join(ROUTERS)}")
        if s.trace is None and s.rate is None:
            raise KCloudError(f"services {source}: field services.{i}: no request stream",
                              "give trace: FILE or rate: R")
    return spec


# ---------------------------------------------------------------------------------------------


class Planned:
    """A service's plan, its model's graphs and its replicas' step costs."""

    def __init__(self, plan: Any, cluster: Any, graphs: Any, models: list[ReplicaModel]) -> None:
        self.plan, self.cluster, self.graphs, self.models = plan, cluster, graphs, models

    @property
    def is_llm(self) -> bool:
        return bool(self.graphs.is_llm)


def plan_service(spec: ServiceSpec, *, prompt: int | None = None, output: int | None = None,
                 cluster: Any = None, allow: Any = None, calibration: Any = None,
                 graphs: Any = None) -> Planned:
    """Plan `spec.model` on its cluster (or load its plan), with the mean lengths given
    (`graphs`: the model already loaded for those lengths)."""
    from kcloud.graph.loaders import load_model_spec
    from kcloud.hardware.cluster import load_cluster
    from kcloud.planner.api import make_plan
    from kcloud.planner.goal import Goal
    from kcloud.planner.model import load_model
    from kcloud.planner.plan import Plan

    c = cluster if cluster is not None else load_cluster(spec.cluster)
    goal_kw: dict[str, Any] = {"objective": spec.objective}
    probe = load_model_spec(spec.model, batch=1, seq_len=None, phase=None, kv_len=None)
    if not probe.meta.get("is_llm"):
        prompt = output = None
    if prompt:
        goal_kw["input_tokens"] = int(prompt)
    if output:
        goal_kw["output_tokens"] = int(output)
    goal = Goal(**goal_kw)
    if graphs is None:
        graphs = load_model(spec.model, goal)
    if spec.plan is not None:
        plan = Plan.load(spec.plan)
        if plan.model != spec.model:
            raise KCloudError(f"service {spec.name}: plan {spec.plan} is for {plan.model}, "
                              f"not {spec.model}", "give the plan of this service's model")
    else:
        plan = make_plan(graphs, c, goal, allow=allow, calibration=calibration).plan
    models = replica_models(plan, c, graphs.forward, graphs.decode, calibration)
    return Planned(plan, c, graphs, models)


def mean_lengths(spec: ServiceSpec) -> tuple[int, int]:
    if spec.trace is not None:
        tr = read_trace(spec.trace)
        return max(1, int(tr.prompt.mean())), max(1, int(tr.output.mean()))
    return spec.prompt_tokens or 512, spec.output_tokens or 128


def stream_of(spec: ServiceSpec, is_llm: bool, duration_s: float | None, seed: int,
              limit: int | None = None) -> Any:
    if spec.trace is not None:
        tr = read_trace(spec.trace)
        s = trace_stream(tr, rate_scale=spec.rate_scale, duration_s=duration_s,
                         max_tokens=spec.max_tokens, limit=limit)
        if not is_llm:
            return ((a, 0, 1) for a, _, _ in s)
        return s
    assert spec.rate is not None
    if is_llm:
        lengths = Lengths(spec.prompt_tokens or 512, spec.output_tokens or 128, spec.length_cv)
    else:
        lengths = Lengths(0, 1, 0.0)
    if duration_s is None and limit is None:
        raise KCloudError(f"service {spec.name}: a synthetic stream needs a duration",
                          "give --duration (or duration_s: in the services file)")
    return synthetic_stream(spec.rate, duration_s=duration_s, limit=limit, seed=seed,
                            arrivals=spec.arrivals, burstiness=spec.burstiness,
                            lengths=lengths)


def build_service(spec: ServiceSpec, planned: Planned, *, duration_s: float | None, seed: int,
                  replicas: int | None = None, limit: int | None = None) -> Service:
    models = planned.models
    n = replicas if replicas is not None else (
        spec.replicas if spec.replicas is not None else len(models))
    auto = spec.autoscale
    slots = max(n, auto.max if auto else 0)
    pool = [models[i % len(models)] for i in range(slots)]
    sched = None
    if planned.is_llm:
        cap = min(m.kv_token_capacity(spec.chunk_tokens) for m in models)
        if cap < DEFAULT_BLOCK:
            raise KCloudError(f"service {spec.name}: the plan leaves no memory for a KV cache",
                              "plan on devices with more memory")
        sched = SchedulerConfig(spec.chunk_tokens, spec.max_seqs, DEFAULT_BLOCK,
                                cap // DEFAULT_BLOCK)
    prompt, _ = mean_lengths(spec) if planned.is_llm else (1, 1)
    front = None
    if spec.front_end:
        from kcloud.hardware.host import front_end_costs

        front = front_end_costs()
        if front is None:
            raise KCloudError(f"service {spec.name}: front_end asks for this host's front-end "
                              "costs, which are not measured yet",
                              "measure them against a running server: kcloud sim front-end "
                              "--url URL --served-name NAME")
    return Service(
        name=spec.name, models=pool,
        stream=stream_of(spec, planned.is_llm, duration_s, seed, limit),
        slo=spec.slo.build(), replicas=n, router=spec.router, sched=sched,
        max_batch=spec.max_batch,
        autoscale=Autoscale(auto.min, auto.max, auto.up, auto.down, auto.interval_s,
                            auto.startup_s) if auto else None,
        power_down_idle_s=spec.power_down_idle_s, wake_s=spec.wake_s,
        mean_context=prompt, front_end=front,
    )
