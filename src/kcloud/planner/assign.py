"""Concrete slots for the chosen replicas, and the `Plan` that records them.

Every stage's tensor-parallel group goes inside one node. Stages the DP costed as sharing a
node (a *run*: consecutive stages of one type joined by the node link) are placed together
first, largest run first, each into the node with the least room that still holds it. If the
runs do not all fit that way, groups are placed one by one, largest first, next to their
predecessor where there is room, else in the fullest node that holds them: group sizes are
powers of two and every node holds a multiple of its type's largest group, so this always
succeeds when the per-type counts allow. Links are then read off the placement, and a replica
whose links changed is re-costed, so the plan's figures are those of its actual placement.

An LLM plan records its prompt graph's phase ("prefill") and seq_len, and `output_tokens`: the
decode steps each request runs after it (the figures cover both).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from kcloud.planner.dp import Path
from kcloud.planner.evaluate import Mix, Template
from kcloud.planner.plan import AttentionOffload, Plan, Predicted, Replica, Stage
from kcloud.planner.search import Context
from kcloud.planner.space import INTRA, NET


@dataclass
class _Group:
    replica: int
    stage: int
    type_id: str
    size: int
    run: int  # index of its run


class _Pool:
    def __init__(self, ctx: Context) -> None:
        self.free: dict[tuple[str, str], list[str]] = {}
        for s in ctx.cluster.slots:
            self.free.setdefault((s.node, s.device.id), []).append(s.id)
        self.order = [n.name for n in ctx.cluster.nodes]

    def nodes_for(self, type_id: str, size: int) -> list[str]:
        return [n for n in self.order if len(self.free.get((n, type_id), ())) >= size]

    def best_fit(self, type_id: str, size: int, avoid: set[str] | None = None) -> str | None:
        """The fullest node that still holds `size`, away from `avoid` where possible."""
        fits = self.nodes_for(type_id, size)
        away = [n for n in fits if n not in (avoid or set())]
        pick = away or fits
        return min(pick, key=lambda n: len(self.free[(n, type_id)])) if pick else None

    def take(self, node: str, type_id: str, size: int) -> tuple[str, ...]:
        slots = self.free[(node, type_id)]
        got, self.free[(node, type_id)] = slots[:size], slots[size:]
        return tuple(got)


def _replicas(mix: Mix) -> list[Template]:
    return [t for t, n in mix.parts for _ in range(n)]


def assign(ctx: Context, mix: Mix) -> tuple[list[Template], list[list[tuple[str, ...]]],
                                              list[list[tuple[str, ...]]], list[str]]:
    """Replicas (re-costed where the placement changed a link), their slots, the slots of
    their stages' attention offloads, and notes."""
    reps = _replicas(mix)
    groups: list[_Group] = []
    runs: list[list[int]] = []
    for r, t in enumerate(reps):
        for s, (o, _, _) in enumerate(t.path.stages):
            opt = t.space.options[o]
            if s == 0 or t.path.links[s - 1] != INTRA:
                runs.append([])
            runs[-1].append(len(groups))
            groups.append(_Group(r, s, t.space.types[opt.type].id, opt.tp, len(runs) - 1))
    # An offloaded stage's PIM group goes on its own devices' node, taken right after them;
    # stages that run on PIM devices are placed last (the search took at most a node's PIM
    # devices per device for each offload, so the node holds them).
    offload: dict[int, tuple[str, int]] = {}
    for n, g in enumerate(groups):
        opt = reps[g.replica].space.options[reps[g.replica].path.stages[g.stage][0]]
        if opt.offload:
            offload[n] = (reps[g.replica].space.types[opt.pim].id, opt.pim_count)
    late = {pid for pid, _ in offload.values()}
    pim_of: dict[int, tuple[str, ...]] = {}
    placed = _by_runs(ctx, groups, runs, offload, late, pim_of)
    if placed is None:
        pim_of.clear()
        placed = _by_groups(ctx, groups, runs, offload, late, pim_of)
    slots: list[list[tuple[str, ...]]] = [[() for _ in t.path.stages] for t in reps]
    pim: list[list[tuple[str, ...]]] = [[() for _ in t.path.stages] for t in reps]
    for n, (g, devs) in enumerate(zip(groups, placed, strict=True)):
        slots[g.replica][g.stage] = devs
        pim[g.replica][g.stage] = pim_of.get(n, ())
    notes: list[str] = []
    out: list[Template] = []
    for r, t in enumerate(reps):
        nodes = [ss[0].split("/", 1)[0] for ss in slots[r]]
        links = []
        for s in range(len(t.path.stages) - 1):
            same = nodes[s] == nodes[s + 1] and _stage_type(t, s) == _stage_type(t, s + 1)
            links.append(INTRA if same else NET)
        if tuple(links) != t.path.links:
            t = ctx.evaluate(t.b, Path(t.path.stages, tuple(links)), t.space)
            notes.append(f"replica {r}: stages placed on other nodes than costed; figures "
                         "re-costed for the placement")
        out.append(t)
    return out, slots, pim, notes


def _stage_type(t: Template, s: int) -> int:
    return t.space.options[t.path.stages[s][0]].type


def _apart(groups: list[_Group], runs: list[list[int]]) -> dict[int, list[int]]:
    """Per run, the runs it must not share a node with: its neighbours in the same replica
    of the same type (the DP costed the cut between them over the network)."""
    out: dict[int, list[int]] = {k: [] for k in range(len(runs))}
    for k in range(1, len(runs)):
        a, b = groups[runs[k - 1][0]], groups[runs[k][0]]
        if a.replica == b.replica and a.type_id == b.type_id:
            out[k - 1].append(k)
            out[k].append(k - 1)
    return out


def _take_pim(pool: _Pool, node: str, g: int, offload: dict[int, tuple[str, int]],
              pim_of: dict[int, tuple[str, ...]]) -> bool:
    if g not in offload:
        return True
    pid, count = offload[g]
    if len(pool.free.get((node, pid), ())) < count:
        return False
    pim_of[g] = pool.take(node, pid, count)
    return True


def _by_runs(ctx: Context, groups: list[_Group], runs: list[list[int]],
             offload: dict[int, tuple[str, int]], late: set[str],
             pim_of: dict[int, tuple[str, ...]]) -> list[tuple[str, ...]] | None:
    pool = _Pool(ctx)
    out: list[tuple[str, ...]] = [() for _ in groups]
    apart = _apart(groups, runs)
    node_of: dict[int, str] = {}
    order = sorted(range(len(runs)), key=lambda k: (groups[runs[k][0]].type_id in late,
                                                    -sum(groups[g].size for g in runs[k])))
    for k in order:
        members = runs[k]
        tid = groups[members[0]].type_id
        avoid = {node_of[x] for x in apart[k] if x in node_of}
        fits = [n for n in pool.nodes_for(tid, sum(groups[g].size for g in members))
                if _pim_room(pool, n, members, offload)]
        away = [n for n in fits if n not in avoid] or fits
        if not away:
            return None
        node = min(away, key=lambda n: len(pool.free[(n, tid)]))
        node_of[k] = node
        for g in members:
            out[g] = pool.take(node, tid, groups[g].size)
            if not _take_pim(pool, node, g, offload, pim_of):
                return None
    return out


def _pim_room(pool: _Pool, node: str, members: list[int],
              offload: dict[int, tuple[str, int]]) -> bool:
    need: dict[str, int] = {}
    for g in members:
        if g in offload:
            need[offload[g][0]] = need.get(offload[g][0], 0) + offload[g][1]
    return all(len(pool.free.get((node, p), ())) >= n for p, n in need.items())


def _by_groups(ctx: Context, groups: list[_Group], runs: list[list[int]],
               offload: dict[int, tuple[str, int]], late: set[str],
               pim_of: dict[int, tuple[str, ...]]) -> list[tuple[str, ...]]:
    pool = _Pool(ctx)
    out: list[tuple[str, ...]] = [() for _ in groups]
    apart = _apart(groups, runs)
    node_of: dict[int, str] = {}
    run_nodes: dict[int, set[str]] = {k: set() for k in range(len(runs))}
    prev: dict[int, int] = {}
    for members in runs:
        for a, b in itertools.pairwise(members):
            prev[b] = a
    for g in sorted(range(len(groups)), key=lambda g: (groups[g].type_id in late,
                                                       -groups[g].size)):
        grp = groups[g]
        near = node_of.get(prev.get(g, -1))
        if (near is not None and len(pool.free.get((near, grp.type_id), ())) >= grp.size
                and _pim_room(pool, near, [g], offload)):
            node = near
        else:
            avoid = set().union(*(run_nodes[x] for x in apart[grp.run]))
            node = pool.best_fit(grp.type_id, grp.size, avoid)  # type: ignore[assignment]
        if node is None:
            raise AssertionError(f"no node holds {grp.size} x {grp.type_id}: counts were checked")
        out[g] = pool.take(node, grp.type_id, grp.size)
        if not _take_pim(pool, node, g, offload, pim_of):
            raise AssertionError(f"node {node} has no PIM group left for an offload: the "
                                 "search bounds offloads by the node's PIM devices")
        node_of[g] = node
        run_nodes[grp.run].add(node)
    return out


def build_plan(ctx: Context, mix: Mix, extra_notes: list[str] | None = None) -> Plan:
    reps, slots, pim, notes = assign(ctx, mix)
    final = Mix(tuple((t, 1) for t in reps))
    replicas = []
    for t, ss in zip(reps, slots, strict=True):
        stages = []
        for s, (o, i, j) in enumerate(t.path.stages):
            opt = t.space.options[o]
            ty = t.space.types[opt.type]
            off = None if not opt.offload else AttentionOffload(
                t.space.types[opt.pim].id, opt.pim_count, pim[len(replicas)][s])
            stages.append(Stage(
                start=i, end=j, device_type=ty.id, devices=ss[s], precision=ty.precision.value,
                time_s=t.stage_time[s], comm_s=t.transfers[s] if s < len(t.transfers) else 0.0,
                memory_bytes=t.stage_mem[s], power_w=t.stage_power[s],
                attention_offload=off))
        replicas.append(Replica(tuple(stages)))
    m, g = ctx.model, ctx.goal
    used = {ty for t in reps for ty, _ in t.devices}
    estimated = any(ctx.types[ty].device.estimated_fields for ty in used)
    predicted = Predicted(
        latency_s=final.latency_s, throughput=final.throughput, unit=m.unit,
        power_w=final.power_w, energy_per_item_j=final.energy_per_item_j,
        device_hours_per_item=final.device_hours_per_item,
        cost_per_item_usd=final.cost_per_item, comm_share=final.comm_share,
        estimated=estimated)
    return Plan(
        model=m.spec, cluster=ctx.cluster.source, objective=g.objective, batch=g.batch,
        micro_batch=reps[0].b, seq_len=m.forward.seq_len,
        phase=m.forward.phase, n_layers=m.n_layers,
        replicas=tuple(replicas), predicted=predicted, goal=g.to_dict(),
        output_tokens=m.output_tokens if m.is_llm else None,
        notes=tuple([*ctx.notes, *(extra_notes or []), *notes]))
