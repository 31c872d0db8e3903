"""A plan a person can read: the stages, why they look the way they do, and the schedule."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kcloud.hardware.cost import usable_memory
from kcloud.planner.plan import AttentionOffload, Plan, Replica, Stage
from kcloud.planner.search import Context, in_flight_of
from kcloud.planner.space import StageSpace


def _signature(r: Replica) -> tuple[object, ...]:
    return tuple((s.start, s.end, s.device_type, s.tp,
                  None if s.attention_offload is None else
                  (s.attention_offload.device_type, s.attention_offload.count))
                 for s in r.stages)


def stage_devices(s: Stage) -> str:
    """'rebellions-atom-max x4', or with an offload '... + samsung-hbm-pim x16 (attention)'."""
    text = f"{s.device_type} x{s.tp}"
    off = s.attention_offload
    return text if off is None else f"{text} + {off.device_type} x{off.count} (attention)"


def replica_groups(plan: Plan) -> list[tuple[list[int], Replica]]:
    """Replicas with the same stages, grouped (indices, one of them)."""
    groups: dict[tuple[object, ...], list[int]] = {}
    for k, r in enumerate(plan.replicas):
        groups.setdefault(_signature(r), []).append(k)
    return [(ks, plan.replicas[ks[0]]) for ks in groups.values()]


def _usable(ctx: Context, device_type: str) -> float:
    return usable_memory(ctx.cluster.device_types[device_type])


def _same_offload(sp: Any, o: Any, off: AttentionOffload | None) -> bool:
    if off is None:
        return not o.offload
    return o.offload and sp.types[o.pim].id == off.device_type and o.pim_count == off.count


def _collective_s(ctx: Context, plan: Plan, s: Stage) -> float:
    sp = ctx.space(plan.micro_batch)
    for o in sp.options:
        if (sp.types[o.type].id == s.device_type and o.tp == s.tp
                and _same_offload(sp, o, s.attention_offload)):
            return float(sp.comm[o.index, s.start, s.end])
    return 0.0


def stage_rows(ctx: Context, plan: Plan) -> list[dict[str, Any]]:
    rows = []
    for ks, r in replica_groups(plan):
        label = f"{ks[0]}" if len(ks) == 1 else f"{ks[0]}..{ks[-1]} (x{len(ks)})"
        for n, s in enumerate(r.stages):
            usable = _usable(ctx, s.device_type)
            rows.append({
                "replica": label, "stage": n, "layers": f"[{s.start}, {s.end})",
                "devices": stage_devices(s), "precision": s.precision,
                "time_s": s.time_s,
                "comm_s": s.comm_s + _collective_s(ctx, plan, s),
                "memory_bytes": s.memory_bytes, "headroom": 1.0 - s.memory_bytes / usable,
            })
    return rows


def stage_table(ctx: Context, plan: Plan) -> Table:
    t = Table(title="stages (every figure modeled)", header_style="bold", title_justify="left")
    for col, just in (("replica", "left"), ("stage", "right"), ("layers", "left"),
                      ("devices", "left"), ("precision", "left"), ("time", "right"),
                      ("comm", "right"), ("memory/device", "right"), ("headroom", "right")):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for row in stage_rows(ctx, plan):
        t.add_row(row["replica"], str(row["stage"]), row["layers"], escape(row["devices"]),
                  row["precision"], f"{row['time_s'] * 1e3:,.3f} ms",
                  f"{row['comm_s'] * 1e3:,.3f} ms", f"{row['memory_bytes'] / 1e9:,.2f} GB",
                  f"{row['headroom']:.0%}")
    return t


def _space(ctx: Context, plan: Plan, r: Replica) -> StageSpace:
    """The stage space of replica r's micro-batch, its stages holding the KV cache of its
    own micro-batches in flight (what its figures were costed with)."""
    return ctx.space_at(plan.micro_batch, in_flight_of(len(r.stages)))


def _why_tp(sp: StageSpace, device_type: str, tp: int, i: int,
            j: int, off: AttentionOffload | None = None) -> tuple[str, float] | None:
    """Why `tp` and not tp / 2 for layers [i, j): ("memory", GB needed per device at tp / 2)
    or ("speed", how much longer a micro-batch would take at tp / 2), with the same
    attention offload."""
    if tp == 1:
        return None
    opt = {(sp.types[o.type].id, o.tp): o.index for o in sp.options
           if _same_offload(sp, o, off)}
    if (device_type, tp) not in opt:
        return None
    half = opt.get((device_type, tp // 2))
    if half is None:
        return None
    if not np.isfinite(sp.time[half, i, j]):
        return "memory", float(sp.mem[half, i, j])
    return "speed", float(sp.time[half, i, j] / sp.time[opt[(device_type, tp)], i, j] - 1.0)


def _tp_lines(ctx: Context, plan: Plan) -> list[str]:
    found: dict[tuple[str, int, str], list[tuple[int, int, float]]] = {}
    seen = set()
    for _, r in replica_groups(plan):
        sp = _space(ctx, plan, r)
        for s in r.stages:
            key = (s.device_type, s.tp, s.start, s.end)
            if (key, sp.in_flight) in seen:
                continue
            seen.add((key, sp.in_flight))
            why = _why_tp(sp, *key, off=s.attention_offload)
            if why is not None:
                found.setdefault((s.device_type, s.tp, why[0]), []).append(
                    (s.start, s.end, why[1]))
    out = []
    for (dev, tp, kind), items in found.items():
        ranges = ", ".join(f"[{i}, {j})" for i, j, _ in items[:3])
        if len(items) > 3:
            ranges += f" and {len(items) - 3} more"
        if kind == "memory":
            need = max(v for _, _, v in items)
            out.append(f"{dev} x{tp} for layers {ranges}: at tp {tp // 2} a device would need "
                       f"up to {need / 1e9:,.1f} GB, more than the "
                       f"{_usable(ctx, dev) / 1e9:,.1f} GB usable (memory)")
        else:
            lo, hi = min(v for _, _, v in items), max(v for _, _, v in items)
            span = f"{lo:.0%}" if hi - lo < 0.005 else f"{lo:.0%}-{hi:.0%}"
            out.append(f"{dev} x{tp} for layers {ranges}: tp {tp // 2} would fit but take "
                       f"{span} longer per micro-batch ({plan.objective})")
    return out


def reasons(ctx: Context, plan: Plan) -> list[str]:
    out: list[str] = []
    pred = plan.predicted
    groups = replica_groups(plan)
    if plan.objective == "throughput":
        out.append(f"{len(plan.replicas)} replicas in {len(groups)} kinds, picked by an integer "
                   "program for the most total throughput within the device counts"
                   + (" and constraints" if _constrained(plan) else ""))
    elif plan.objective in ("energy", "cost"):
        n = len(plan.replicas)
        out.append(f"{n} {'copy' if n == 1 else 'copies'} of the pipeline with the least "
                   f"{'energy' if plan.objective == 'energy' else 'cost'} per item (copies do "
                   "not change per-item figures; they add throughput)")
    else:
        out.append("one pipeline with the least request latency")
    for ks, r in groups:
        bn = max(range(len(r.stages)), key=lambda k: max(r.stages[k].time_s, r.stages[k].comm_s))
        s = r.stages[bn]
        period = max(s.time_s, s.comm_s)
        busy = sum(x.time_s for x in r.stages) / (len(r.stages) * period)
        what = "its transfer out" if s.comm_s > s.time_s else "it"
        who = f"replica {ks[0]}" + (f" (and {len(ks) - 1} like it)" if len(ks) > 1 else "")
        out.append(f"bottleneck of {who}: stage {bn} (layers [{s.start}, {s.end}) on "
                   f"{stage_devices(s)}); {what} sets the period at "
                   f"{period * 1e3:,.3f} ms; stages are busy {busy:.0%} of it on average")
    out.extend(_tp_lines(ctx, plan))
    out.extend(offload_lines(ctx, plan))
    tight = min((st for r in plan.replicas for st in r.stages),
                key=lambda st: 1.0 - st.memory_bytes / _usable(ctx, st.device_type))
    usable = _usable(ctx, tight.device_type)
    out.append(f"tightest memory: {tight.device_type} (layers [{tight.start}, {tight.end})) "
               f"holds {tight.memory_bytes / 1e9:,.2f} of {usable / 1e9:,.2f} GB usable "
               f"({1.0 - tight.memory_bytes / usable:.0%} headroom)")
    slots = {s.id: s for s in ctx.cluster.slots}
    dom = sum(1 for d in plan.devices if slots[d].device.domestic)
    out.append(f"domestic share: {dom} of {len(plan.devices)} devices "
               f"({dom / len(plan.devices):.0%})")
    out.append(f"communication: {pred.comm_share:.1%} of the slowest replica's micro-batch "
               "latency (transfers between stages and tensor-parallel collectives)")
    return out


def _stage_figures(sp: Any, o: int, i: int, j: int) -> tuple[float, float]:
    """(time, energy of the whole group) of option o over layers [i, j) per micro-batch."""
    return float(sp.time[o, i, j]), float(sp.opt_tp[o] * sp.busy_j[o, i, j])


def offload_lines(ctx: Context, plan: Plan) -> list[str]:
    """Per stage that could offload its decode attention to PIM: chosen or rejected, and
    by how much (the stage's time and energy per micro-batch with and without it)."""
    sp = ctx.space(plan.micro_batch)
    if not any(o.offload for o in sp.options):
        if not ctx.model.is_llm:
            return []
        if any(t.pim_ratio for t in ctx.types):
            return ["decode attention offload to PIM not searched (--attention-offload off)"]
        if any(t.device.kind.value == "pim" for t in ctx.types):
            return ["attention offload: no NPU/GPU type shares its nodes with PIM devices"]
        return []
    found: dict[tuple[str, str], list[str]] = {}  # (devices, what) -> stages

    def add(n: int, s: Stage, what: str) -> None:
        found.setdefault((f"{s.device_type} x{s.tp}", what), []).append(
            f"{n} [{s.start}, {s.end})")

    seen = set()
    mode = ctx.goal.attention_offload
    for _, r in replica_groups(plan):
        sp = _space(ctx, plan, r)
        for n, s in enumerate(r.stages):
            key = (s.device_type, s.tp, s.start, s.end, s.attention_offload, sp.in_flight)
            if key in seen:
                continue
            seen.add(key)
            mine = [o for o in sp.options if sp.types[o.type].id == s.device_type
                    and o.tp == s.tp]
            plain = next((o for o in mine if not o.offload), None)
            offs = [o for o in mine if o.offload]
            if not offs:
                continue
            i, j = s.start, s.end
            off = s.attention_offload
            if off is not None:
                o = next(x for x in offs if sp.types[x.pim].id == off.device_type
                         and x.pim_count == off.count)
                t1, e1 = _stage_figures(sp, o.index, i, j)
                piped = bool(sp.pipelined[o.index][i, j])
                how = "pipelined by layer" if piped else "sequenced"
                kv = float(sp.pim_mem[o.index][i, j])
                cap = usable_memory(sp.types[o.pim].device)
                line = (f"decode attention on {off.device_type} x{off.count} "
                        f"({how}; KV cache {kv / 1e9:,.2f} of {cap / 1e9:,.2f} GB per PIM "
                        "device)")
                if plain is None:
                    line += (f"; --attention-offload {mode}: no stage without it searched"
                             if mode == "on"
                             else "; no stage without offload was possible")
                elif not np.isfinite(sp.time[plain.index, i, j]):
                    line += (f"; without offload it would not fit (KV cache on "
                             f"{s.device_type}: {sp.mem[plain.index, i, j] / 1e9:,.1f} GB per "
                             "device)")
                else:
                    t0, e0 = _stage_figures(sp, plain.index, i, j)
                    line += (f"; chosen: the stage takes {_change(t1, t0)} time and "
                             f"{_change(e1, e0)} busy energy per micro-batch than without "
                             "(modeled)")
                add(n, s, line)
                continue
            best = min(offs, key=lambda o: _stage_figures(sp, o.index, i, j)[1]
                       if np.isfinite(sp.time[o.index, i, j]) else np.inf)
            if not np.isfinite(sp.time[best.index, i, j]):
                kv = float(sp.pim_mem[best.index][i, j])
                add(n, s, f"attention offload rejected: the KV cache would need "
                    f"{kv / 1e9:,.1f} GB per {sp.types[best.pim].id} device, more than it "
                    "holds")
                continue
            t0, e0 = _stage_figures(sp, plain.index if plain else best.index, i, j)
            t1, e1 = _stage_figures(sp, best.index, i, j)
            why = "--attention-offload off" if mode == "off" else f"its {plan.objective}"
            add(n, s, f"attention offload rejected ({why}): on {sp.types[best.pim].id} "
                f"x{best.pim_count} the stage would take {_change(t1, t0)} time and "
                f"{_change(e1, e0)} busy energy per micro-batch (modeled)")
    out = []
    for (devs, what), where in found.items():
        many = len(where) > 1
        shown = ", ".join(where[:4]) + (f" and {len(where) - 4} more" if len(where) > 4 else "")
        out.append(f"stage{'s' if many else ''} {shown} on {devs}: {what}")
    return out


def _change(new: float, old: float) -> str:
    r = new / old - 1.0 if old > 0 else 0.0
    return f"{-r:.0%} less" if r < 0 else f"{r:.0%} more"


def _constrained(plan: Plan) -> bool:
    g = plan.goal
    return any(g.get(k) for k in ("power_cap_w", "max_devices", "min_domestic_share", "slo_s"))


def schedule_lines(plan: Plan, n_micro: int = 4, width: int = 12) -> list[str]:
    """The first replica's per-worker actions (first `n_micro` micro-batches)."""
    sched = plan.schedule(n_micro=min(n_micro, max(1, plan.batch // plan.micro_batch)))
    lines = []
    for dev in plan.replicas[0].devices:
        acts = sched[dev]
        more = f" ... ({len(acts) - width} more)" if len(acts) > width else ""
        lines.append(f"{dev}: {' '.join(acts[:width])}{more}")
    return lines


def render(ctx: Context, plan: Plan, console: Console) -> None:
    pred = plan.predicted
    kinds = Counter(d.split("/")[1] for d in plan.devices)
    star = " *" if pred.estimated else ""
    console.print(f"[bold]{escape(plan.model)}[/bold] on [bold]{escape(plan.cluster)}[/bold], "
                  f"objective {plan.objective}: {len(plan.replicas)} replica(s) on "
                  f"{len(plan.devices)} devices ("
                  + ", ".join(f"{n} x {escape(k)}" for k, n in kinds.items())
                  + f"), micro-batch {plan.micro_batch}")
    console.print(stage_table(ctx, plan))
    t = Table(title=f"predicted (modeled{star})", header_style="bold", title_justify="left")
    t.add_column("figure")
    t.add_column("value", justify="right")
    per = "token" if pred.unit == "tokens/s" else "item"
    t.add_row("request latency", f"{pred.latency_s * 1e3:,.3f} ms")
    t.add_row("throughput", f"{pred.throughput:,.1f} {pred.unit}")
    t.add_row("power", f"{pred.power_w:,.0f} W")
    t.add_row(f"energy per {per}", f"{pred.energy_per_item_j * 1e3:,.4g} mJ")
    if pred.cost_per_item_usd is not None:
        t.add_row(f"cost per 1M {per}s", f"${pred.cost_per_item_usd * 1e6:,.4g}")
    t.add_row(f"device-hours per 1M {per}s", f"{pred.device_hours_per_item * 1e6:,.4g}")
    t.add_row("communication share", f"{pred.comm_share:.1%}")
    console.print(t)
    console.print("[bold]why[/bold]")
    for line in reasons(ctx, plan):
        console.print(f"  - {escape(line)}")
    for note in plan.notes:
        console.print(f"  [yellow]note:[/] {escape(note)}")
    console.print("[bold]schedule[/bold] (replica 0; F forward, R receive, S send, AR "
                  "all-reduce)")
    for line in schedule_lines(plan):
        console.print(f"  {escape(line)}")
    if pred.estimated:
        console.print("* built on estimated catalog figures (see `kcloud devices show ID`)")
