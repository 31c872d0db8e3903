"""From a Plan to the engine's workers: who runs which layers (and which shard) where, their
ranks and groups, and the KV-block budget of each replica.

Everything here runs before any worker starts, so a plan the runtime cannot run fails with one
line first. The model is built on the meta device (shapes only) for LLM stages, which each
worker then builds for itself; no weights pass through the driver.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from kcloud.errors import KCloudError
from kcloud.graph import zoo
from kcloud.graph.tokenizer import eos_token_id
from kcloud.hardware.catalog import get_device
from kcloud.planner.plan import Plan
from kcloud.precision import Precision
from kcloud.runtime import backends
from kcloud.runtime.generate import GenStage, eager_layout, layer_units, stage_units
from kcloud.runtime.model import layer_graph, load_runnable
from kcloud.runtime.split import split_model
from kcloud.runtime.stage_worker import StageSpec
from kcloud.runtime.tensor_parallel import (
    ShardError,
    ShardLayout,
    check_degree,
    find_layout,
    stage_groups,
)

HOST_KV_BYTES = 512 << 20  # host memory one worker gives its KV blocks, at most
KV_SHARE = 0.9  # of a device's memory left after its weights


@dataclass
class StagePlan:
    replicas: list[list[StageSpec]]  # per replica, its workers in rank order
    llm: bool
    max_len: int
    eos: int | None
    kv_blocks: int
    kv_blocks_plan: int  # what the plan's memory figures allow (before the host's cap)
    notes: list[str]
    layouts: dict[tuple[int, int], ShardLayout | None]


def is_llm_plan(plan: Plan) -> bool:
    return zoo.is_zoo_model(plan.model) and zoo.model_info(plan.model).is_llm


def stage_plan(plan: Plan, mode: str, *, weights: str | None = None, block_size: int = 16,
               kv_blocks: int | None = None, max_seqs: int = 64,
               serving: bool = True, generate: bool = True,
               comm_timeout_s: float = 60.0) -> StagePlan:
    """The workers of every replica. The KV blocks of a replica: `kv_blocks`, or what the
    plan's devices hold, capped by the host memory a worker gives them and by what `max_seqs`
    sequences of the whole context need. `serving=False` (a benchmark run of `kcloud run`):
    no KV blocks, and one process group over every replica (ranks numbered across them), so
    that the run's phases start together. An LLM plan that does not `generate` (a run of its
    prompt only) runs its traced stages, as other models do."""
    llm = is_llm_plan(plan) and generate
    notes: list[str] = []
    graph = layer_graph(plan.model, batch=plan.micro_batch, seq_len=plan.seq_len,
                        phase=plan.phase)
    layouts: dict[tuple[int, int], ShardLayout | None] = {}
    units: list[list[str]] = []
    max_len = 0
    cfg = None
    if llm:
        module, example = zoo.build(plan.model, device="meta", batch=1,
                                    seq_len=min(plan.seq_len or 8, 8))
        cfg = module.cfg  # type: ignore[attr-defined]
        max_len = cfg.max_seq_len
        units = layer_units(module, example, plan.model)
        if len(units) != plan.n_layers:
            raise KCloudError(f"{plan.model} has {len(units)} layers here but the plan has "
                              f"{plan.n_layers}", "re-create the plan with `kcloud plan`")
        for ri, rep in enumerate(plan.replicas):
            for si, st in enumerate(rep.stages):
                if st.tp > 1:
                    layouts[ri, si] = _llm_layout(module, units, st, graph, ri, si, notes)
    else:
        module, example = load_runnable(plan.model, batch=plan.micro_batch,
                                        seq_len=plan.seq_len, phase=plan.phase)
        for ri in range(len(plan.replicas)):
            _forward_layouts(plan, module, example, graph, ri, layouts, notes)

    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    n_cpu = sum(st.tp for rep in plan.replicas for st in rep.stages
                if backends.choose(st.device_type, mode, st.devices[0]).name == "cpu")
    pin = 0 < n_cpu <= len(cores)
    next_core = 0
    replicas: list[list[StageSpec]] = []
    plan_blocks: list[int] = []
    host_blocks: list[int] = []
    all_widths = [[st.tp if layouts.get((ri, si)) is not None else 1
                   for si, st in enumerate(rep.stages)] for ri, rep in enumerate(plan.replicas)]
    offsets = [sum(map(sum, all_widths[:ri])) if not serving else 0
               for ri in range(len(plan.replicas))]
    # A run (not serving) of an LLM plan gives each stage that offloads its decode attention a
    # worker of its own for the PIM group, ranked after every stage worker.
    offloaded = [(ri, si) for ri, rep in enumerate(plan.replicas)
                 for si, st in enumerate(rep.stages) if st.attention_offload is not None]
    pim_rank: dict[tuple[int, int], int] = {}
    if offloaded and llm and not serving:
        base = sum(map(sum, all_widths))
        pim_rank = {k: base + n for n, k in enumerate(offloaded)}
    elif offloaded:
        notes.append("attention offload: this execution runs the offloaded stages' attention "
                     "on their own devices (`kcloud run` of a generation runs it in a worker "
                     "of the PIM group)")
    every_group = tuple(
        tuple(range(off + f, off + f + w))
        for off, widths in zip(offsets, all_widths, strict=True)
        for f, w in zip([sum(widths[:i]) for i in range(len(widths))], widths, strict=True)
        if w > 1)
    for ri, rep in enumerate(plan.replicas):
        widths = all_widths[ri]
        off = offsets[ri]
        firsts = [off + sum(widths[:i]) for i in range(len(widths))]
        world = sum(widths) if serving else sum(map(sum, all_widths)) + len(pim_rank)
        # every rank of a process group creates every one of its groups, in the same order
        tp_groups = every_group if not serving else tuple(
            tuple(range(f, f + w)) for f, w in zip(firsts, widths, strict=True) if w > 1)
        bounds = tuple((s.start, s.end) for s in rep.stages)
        specs: list[StageSpec] = []
        for si, st in enumerate(rep.stages):
            lay = layouts.get((ri, si))
            group = tuple(range(firsts[si], firsts[si] + widths[si]))
            su = stage_units(units, st.start, st.end) if llm else ()
            if llm and serving:
                assert cfg is not None
                b_plan, b_host = _blocks(cfg, su, st, widths[si], block_size)
                plan_blocks.append(b_plan)
                host_blocks.append(b_host)
            for ti in range(widths[si]):
                slot = st.devices[ti]
                be = backends.choose(st.device_type, mode, slot)
                core = None
                if pin and be.name == "cpu":
                    core, next_core = cores[next_core], next_core + 1
                specs.append(StageSpec(
                    replica=ri, stage=si, rank=group[ti], world=world, port=0, device=slot,
                    device_type=st.device_type, backend=be.name, torch_device=be.torch_device,
                    model=plan.model, llm=llm, units=su, bounds=() if llm else bounds,
                    micro_batch=plan.micro_batch, seq_len=plan.seq_len, phase=plan.phase,
                    layout=lay, group=group, tp_groups=tp_groups,
                    prev=None if si == 0 else firsts[si - 1],
                    next=None if si == len(rep.stages) - 1 else firsts[si + 1],
                    block_size=block_size, weights=weights, pin_core=core,
                    comm_timeout_s=comm_timeout_s, attention=pim_rank.get((ri, si)),
                ))
        for si, st in enumerate(rep.stages):
            if (ri, si) not in pim_rank or st.attention_offload is None:
                continue
            off = st.attention_offload
            slot = off.devices[0] if off.devices else st.devices[0]
            be = backends.choose(off.device_type, mode, slot)
            group = tuple(range(firsts[si], firsts[si] + widths[si]))
            specs.append(StageSpec(
                replica=ri, stage=si, rank=pim_rank[ri, si], world=world, port=0, device=slot,
                device_type=off.device_type, backend=be.name, torch_device=be.torch_device,
                model=plan.model, llm=llm, micro_batch=plan.micro_batch, seq_len=plan.seq_len,
                phase=plan.phase, tp_groups=tp_groups, comm_timeout_s=comm_timeout_s,
                serves=group))
        replicas.append(specs)
    blocks_plan = min(plan_blocks) if plan_blocks else 0
    enough = max_seqs * -(-max_len // block_size) if llm else 0
    blocks = kv_blocks if kv_blocks is not None else min(blocks_plan, enough,
                                                         min(host_blocks, default=0))
    if llm and serving:
        if blocks < 1:
            raise KCloudError("the plan leaves no memory for the KV cache on its devices",
                              "plan with more devices or a shorter context")
        if kv_blocks is None and blocks < blocks_plan:
            notes.append(f"KV cache: {blocks} blocks of {block_size} tokens per replica (the "
                         f"plan's devices hold {blocks_plan}; capped at what {max_seqs} "
                         "sequences of the whole context need, and by the host memory a "
                         "worker gives them)")
        replicas = [[_kv(s, blocks) for s in specs] for specs in replicas]
    return StagePlan(replicas, llm, max_len,
                     eos_token_id(plan.model) if llm and serving else None,
                     blocks if llm and serving else 0, blocks_plan, notes, layouts)


def _kv(spec: StageSpec, blocks: int) -> StageSpec:
    from dataclasses import replace

    return replace(spec, kv_blocks=blocks)


def _blocks(cfg: Any, su: tuple[str, ...], st: Any, width: int,
            block_size: int) -> tuple[int, int]:
    """KV blocks a stage's devices hold (the plan's memory figures: what is left of each
    device's memory after its modeled use), and what the host cap allows."""
    layers = sum(1 for u in su if u.startswith("layers."))
    if layers == 0:
        return 1 << 30, 1 << 30
    kv_heads = max(1, cfg.n_kv_heads // width)
    elems = block_size * layers * 2 * kv_heads * cfg.head_dim
    try:
        bytes_per = Precision.parse(st.precision).bytes
    except Exception:
        bytes_per = 2
    dev = get_device(st.device_type)
    free = KV_SHARE * dev.memory_bytes.value - st.memory_bytes
    plan_blocks = max(0, int(free // (elems * bytes_per)))
    host_blocks = max(1, int(HOST_KV_BYTES // (elems * 4)))  # fp32 on the host
    return plan_blocks, host_blocks


def _llm_layout(module: Any, units: list[list[str]], st: Any, graph: Any, ri: int, si: int,
                notes: list[str]) -> ShardLayout | None:
    where = f"stage {si} of replica {ri}"
    check_degree(stage_groups(graph, st.start, st.end), st.tp, where)
    try:
        lay = eager_layout(GenStage(module, stage_units(units, st.start, st.end)), st.tp)
    except ShardError as exc:
        notes.append(f"{where} cannot be sharded ({exc}): it runs whole on {st.devices[0]}")
        return None
    if not (lay.columns or lay.gathers or lay.vocab):
        notes.append(f"{where} holds nothing the runtime shards (no attention, MLP or "
                     f"vocabulary): it runs whole on {st.devices[0]}")
        return None
    return lay


def _forward_layouts(plan: Plan, module: Any, example: tuple[Any, ...], graph: Any, ri: int,
                     layouts: dict[tuple[int, int], ShardLayout | None],
                     notes: list[str]) -> None:
    """The tensor-parallel layouts of replica `ri`'s stages of a non-LLM plan."""
    rep = plan.replicas[ri]
    bounds = tuple((s.start, s.end) for s in rep.stages)
    split = split_model(module, example, bounds)
    if split.n_layers != plan.n_layers:
        raise KCloudError(f"{plan.model} has {split.n_layers} layers here but the plan has "
                          f"{plan.n_layers}", "re-create the plan with `kcloud plan`")
    stage_in = None
    for si, st in enumerate(rep.stages):
        if st.tp == 1:
            continue
        groups = stage_groups(graph, st.start, st.end)
        check_degree(groups, st.tp, f"stage {si} of replica {ri}")
        if not groups:
            layouts[ri, si] = None
            notes.append(f"stage {si} of replica {ri} holds nothing the runtime shards: it "
                         f"runs whole on {st.devices[0]}")
            continue
        if stage_in is None:
            stage_in = split.stage_inputs(*example)
        sub = split.stages[si]
        try:
            layouts[ri, si] = find_layout(sub.sub, sub.sub_args(*stage_in[si]), groups, st.tp)
        except ShardError as exc:
            layouts[ri, si] = None
            notes.append(f"stage {si} of replica {ri} cannot be sharded ({exc}): it runs "
                         f"whole on {st.devices[0]}")
