"""The search: pipeline templates by dynamic programming, replicas by integer programming.

Plan space
----------
- A replica is a pipeline of stages. A stage is a contiguous range of layers on a group of `tp`
  devices of ONE type inside ONE node, at that type's precision (the goal's, with the device's
  visible fallback, or the type's default inference precision). tp is a power of two <= 8 that
  divides every node's count of that type and the graph's tensor-parallel degree.
  Consecutive stages may use different types; replicas may differ from one another.
- One micro-batch size b per plan: the request batch for the latency objective, else every
  power of two up to `MAX_MICRO_BATCH` (`MAX_LLM_MICRO_BATCH` for LLMs) that fits in memory.
- Memory per device of a stage: its weights / tp plus two micro-batches' activations (the one
  it works on and the one it receives), or for an LLM the KV cache of prompt + output tokens of
  every micro-batch in flight (a pipeline of S stages keeps S in flight). The search counts
  two at first; a pipeline of at most as many stages as its round counted is kept for every
  later round; while the best mix has a deeper one, the search runs again counting its stages.
  The plan's pipelines are then costed with their own count (`in_flight_of`), and the chunked
  prefill workspace; it must fit in the device's memory x `MEMORY_HEADROOM`.
- The throughput objective without an SLO takes a default latency bound: `DEFAULT_SLO_FACTOR`
  x the latency of the fastest request any pipeline gives (a plan a person would deploy); the
  plan's notes state it, `--slo-ms` replaces it.
- The cut activation between consecutive stages crosses the node link when both stages are of
  one type and share a node (the DP tracks how full the node is), else the network.
- Figures: `kcloud.planner.evaluate` (latency, period, power, energy and cost per item).

Algorithm
---------
Per micro-batch b and per restriction of the device types (every type together, each type
alone, and the domestic types together when a domestic share is asked), `kcloud.planner.dp`
solves batches of additive problems exactly over all stage chains, device limits included:

- latency: the least sum of stage and transfer times.
- throughput (the fastest single pipeline): the smallest period cap T under which a chain meets
  the SLO; "least latency with every stage and transfer <= T" is checked for rising T (with no
  SLO: "fewest devices under T", which also proves infeasibility when even that breaks the
  limits of a single type). Candidate caps: every distinct stage and transfer time. The check
  is monotone when a request is one micro-batch, so a k-ary search over the sorted candidates
  is exact; it first runs without device limits (cheap) and, if that chain breaks them, goes
  on above its period with them. When a request spans several micro-batches the queueing term
  breaks monotonicity: every candidate is scanned on small instances (<= `EXACT_CANDIDATES`),
  and the k-ary search is a heuristic on large ones.
- energy and cost: for a fixed cap T both are additive (each stage's busy energy plus idle
  power x T; device price x T), so every candidate T is tried on small instances and each chain
  is re-evaluated exactly at its own period (exact); on large instances a geometric grid of
  `GRID` caps, refined on a finer grid around the best `REFINE_TOP` (heuristic there).
- an SLO under the energy, cost or device-count objectives is priced: latency weighted by a
  multiplier swept over a geometric range (a Lagrangian relaxation), at up to `GRID` of the
  caps whose cheapest chain misses the SLO; the chains kept always meet the SLO, and are
  optimal among those some multiplier reaches.

Micro-batches are searched in order of a bound on what each can reach (`objective_bound`:
one additive problem per micro-batch, the limits, caps and SLO dropped): leaders alone until
one gives a plan, then together every micro-batch whose bound reaches that plan's objective;
the others cannot beat it and are not searched (on small instances the plan is the one a
search of all finds; on large ones `FASTEST_WITHIN` ranks the micro-batches searched together).
Each in-flight round after the first does the same with each micro-batch's best of the round
before as its bound (more micro-batches in flight only take memory away; a near-bound on
large instances, whose grids of caps move with the candidates).

Templates for combining replicas: the fewest-device chain under each period cap of the grid
(for every device budget the best pipeline within it, at the grid's resolution: small efficient
replicas exist), the least-energy chains when there is a power cap, and the fastest single
pipeline (for every micro-batch on small instances; on large ones for the micro-batches whose
mix comes within `FASTEST_WITHIN` of the best). On large instances the throughput objective's
mixed-type family (the costliest search) is likewise run only for the micro-batches whose
one-type families come within `FASTEST_WITHIN` of the best (a heuristic).
`kcloud.planner.ilp` then picks replica counts per micro-batch (throughput); for energy and
cost the single best template is replicated as far as the constraints allow (replicas do not
change per-item figures); for latency one replica.
Under a power cap or a domestic floor the latency objective also considers the small replicas
and keeps the fastest that meets them (a heuristic). Slots: `kcloud.planner.assign`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import numpy as np

from kcloud.errors import KCloudError
from kcloud.hardware.cluster import Cluster
from kcloud.hardware.cost import Calibration, default_calibration, weight_bytes
from kcloud.hardware.device import Device
from kcloud.planner.dp import Batch, Limits, Path, make_batch, solve, stage_costs
from kcloud.planner.evaluate import Mix, Template, evaluate, queue_periods
from kcloud.planner.goal import Goal, InfeasibleGoal
from kcloud.planner.ilp import best_counts
from kcloud.planner.model import ModelGraphs
from kcloud.planner.space import DeviceType, OptionCosts, StageSpace, build_types

MAX_MICRO_BATCH = 64
MAX_LLM_MICRO_BATCH = 256
EXACT_CANDIDATES = 512  # up to this many candidate period caps, every one is tried
GRID = 24  # period caps on the geometric grid of large instances
KARY = 8  # probes per round of the k-ary search
CHUNK = 96  # problems per DP batch
REFINE_TOP = 3  # large instances: (micro-batch, types) refined for energy and cost
FASTEST_WITHIN = 0.8  # large instances: micro-batches searched for the fastest pipeline
LAMBDAS = np.geomspace(1e-3, 1e3, 13)  # Lagrange multipliers of the SLO, relative
DEFAULT_SLO_FACTOR = 4.0  # throughput plans: latency bound, x the fastest request's latency
MAX_IN_FLIGHT_ROUNDS = 4  # LLM searches again while its pipelines outgrow the in-flight count


@dataclass
class Context:
    model: ModelGraphs
    cluster: Cluster
    goal: Goal
    types: list[DeviceType]
    notes: list[str]
    calibration: Calibration
    limits: Limits
    micro_batches: list[int]
    restrictions: list[tuple[str, tuple[int, ...]]]
    spaces: dict[int, StageSpace] = field(default_factory=dict)
    in_flight: int = 2  # LLM: micro-batches in flight per pipeline (see `StageSpace`)
    # option costs by (b, type, tp), shared by the spaces of every in-flight round
    costs: dict[tuple[int, int, int], OptionCosts] = field(default_factory=dict)
    # replica counts found for a group of templates (`choose` asks again for the same group)
    counts: dict[tuple[object, ...], list[int] | None] = field(default_factory=dict)
    # LLM: spaces by (micro-batches in flight, b) for other counts than this round's
    # (`space_at`), shared by every round
    by_count: dict[tuple[int, int], StageSpace] = field(default_factory=dict)

    def space(self, b: int) -> StageSpace:
        sp = self.spaces.get(b)
        if sp is None:
            sp = self.spaces[b] = self._new_space(b, self.in_flight)
        return sp

    def _new_space(self, b: int, in_flight: int) -> StageSpace:
        return StageSpace(self.model, self.types, self.cluster.network, b, self.calibration,
                          in_flight, self.costs, offload=self.goal.attention_offload)

    def options(self, b: int, types: Iterable[int]) -> list[int]:
        ts = set(types)
        sp = self.space(b)
        return [o.index for o in sp.options
                if o.type in ts and (not o.offload or o.pim in ts)
                and np.isfinite(sp.time[o.index]).any()]

    def space_at(self, b: int, in_flight: int) -> StageSpace:
        """The space of micro-batch b whose stages hold `in_flight` micro-batches' KV cache
        (this round's own when the count is its count, or the model is no LLM)."""
        if not self.model.is_llm or in_flight == self.in_flight:
            return self.space(b)
        sp = self.by_count.get((in_flight, b))
        if sp is None:
            sp = self.by_count[(in_flight, b)] = self._new_space(b, in_flight)
        return sp

    def evaluate(self, b: int, path: Path, space: StageSpace | None = None) -> Template:
        sp = self.space(b) if space is None else space
        key = (path, self.goal.batch)
        t = sp.evaluated.get(key)
        if t is None:
            t = sp.evaluated[key] = evaluate(sp, path, self.goal.batch)
        return t

    def meets_slo(self, t: Template) -> bool:
        return self.goal.slo_s is None or t.request_latency_s <= self.goal.slo_s * (1 + 1e-12)


def make_context(model: ModelGraphs, cluster: Cluster, goal: Goal, *,
                 allow: Callable[[Device], bool] | None = None,
                 micro_batches: Iterable[int] | None = None,
                 calibration: Calibration | None = None) -> Context:
    names = None if allow is None else frozenset(
        d for d, dev in cluster.device_types.items() if allow(dev))
    types, notes = build_types(cluster, model, goal, require_price=goal.objective == "cost",
                               allow=names)
    if not types:
        if goal.objective == "cost" and any(n.endswith("gives no price") for n in notes):
            raise InfeasibleGoal("no device in the cluster has a price in the catalog",
                                 "use --objective energy or throughput, or add prices")
        raise InfeasibleGoal(f"no device in cluster {cluster.name} can run {model.spec}"
                             + (f" ({'; '.join(notes)})" if notes else ""),
                             "use another --precision or cluster")
    limits = Limits(tuple((t.index, t.count) for t in types), goal.max_devices)
    if micro_batches is not None:
        mbs = sorted(set(int(b) for b in micro_batches))
    elif goal.objective == "latency":
        mbs = [goal.batch]
    else:
        top = MAX_LLM_MICRO_BATCH if model.is_llm else MAX_MICRO_BATCH
        mbs = [1 << k for k in range(int(math.log2(top)) + 1)]
    restrictions: list[tuple[str, tuple[int, ...]]] = []
    if len(types) > 1:
        restrictions.append(("all", tuple(t.index for t in types)))
    restrictions.extend((t.id, (t.index,)) for t in types)
    dom = tuple(t.index for t in types if t.domestic)
    if goal.min_domestic_share > 0 and dom and 1 < len(dom) < len(types):
        restrictions.append(("domestic", dom))
    return Context(model, cluster, goal, types, notes, calibration or default_calibration(),
                   limits, mbs, restrictions)


# ---------------------------------------------------------------------------------------------
# Batched problems


def _fits(sp: StageSpace, opts: list[int]) -> np.ndarray:
    return np.where(np.isfinite(sp.time[opts]), 0.0, np.inf)


def _latency_bound(sp: StageSpace, opts: list[int]) -> float:
    """An upper bound on any chain's latency (for lexicographic tie-breaks)."""
    t = sp.time[opts]
    tr = sp.trans[np.isfinite(sp.trans)]
    return sp.L * (float(t[np.isfinite(t)].max()) + (float(tr.max()) if tr.size else 0.0))


def _run(ctx: Context, sp: StageSpace, batch: Batch, exact: bool = True,
         price: bool = True) -> list[Path | None]:
    out: list[Path | None] = []
    step = CHUNK - CHUNK % batch.sweep  # a sweep's runs whole in each part
    for s in range(0, batch.K, step):
        part = batch.take(np.arange(s, min(s + step, batch.K)))
        part.sweep = batch.sweep
        out.extend(solve(sp, part, ctx.limits, exact=exact, price=price))
    return out


def min_latency(ctx: Context, b: int, opts: list[int], caps: np.ndarray,
                exact: bool = True) -> list[Path | None]:
    sp = ctx.space(b)
    return _run(ctx, sp, make_batch(sp, opts, _fits(sp, opts), 1.0, None, caps), exact)


def min_devices(ctx: Context, b: int, opts: list[int], caps: np.ndarray,
                exact: bool = True) -> list[Path | None]:
    """Fewest devices under each cap; ties broken by latency.

    Over one device type, a fewest-device chain that breaks that type's limit proves that no
    chain fits: nothing to track or price."""
    sp = ctx.space(b)
    eps = 0.5 / _latency_bound(sp, opts)
    per = sp.opt_use[opts].sum(axis=1).astype(float)[None, :]  # PIM groups included
    one_type = len({int(t) for o in opts for t in np.flatnonzero(sp.opt_use[o])}) == 1
    return _run(ctx, sp, make_batch(sp, opts, _fits(sp, opts), eps, per, caps),
                exact and not one_type, price=not one_type)


def _per_item_problem(ctx: Context, sp: StageSpace, opts: list[int], kind: str,
                      caps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(base, per-option constants per cap) of the energy or cost objective."""
    if kind == "energy":
        tp = sp.opt_tp[opts].astype(float)
        base = tp[:, None, None] * sp.busy_j[opts] - sp.opt_idle_w[opts][:, None, None] \
            * sp.time[opts]
        base = np.where(np.isfinite(sp.time[opts]), base, np.inf)
        per = caps[:, None] * sp.opt_idle_w[opts][None, :]
    else:
        base = _fits(sp, opts)
        per = caps[:, None] * sp.opt_price_s[opts][None, :]
    return base, per


def min_per_item(ctx: Context, b: int, opts: list[int], kind: str, caps: np.ndarray,
                 lat: np.ndarray | float, exact: bool = True, sweep: int = 1
                 ) -> list[Path | None]:
    """Least energy (or cost) per period under each cap, latency weighted by `lat` (in runs
    of `sweep` rising weights: `Batch.sweep`).

    Exact: device limits tracked. Otherwise (large instances) a chain over the limits is
    dropped: the cheapest chains per item sit at looser caps, with fewer devices."""
    sp = ctx.space(b)
    base, per = _per_item_problem(ctx, sp, opts, kind, caps)
    return _run(ctx, sp, make_batch(sp, opts, base, lat, per, caps, sweep), exact, price=exact)


# ---------------------------------------------------------------------------------------------
# Candidate period caps


def candidate_caps(ctx: Context, b: int, opts: list[int]) -> np.ndarray:
    cands = ctx.space(b).candidate_periods(opts)
    if ctx.goal.slo_s is not None:
        q = queue_periods(ctx.goal.batch, b)
        cands = cands[cands <= ctx.goal.slo_s / (1 + q) * (1 + 1e-12)]
    return cands


def grid_caps(cands: np.ndarray, n: int = GRID) -> np.ndarray:
    """All candidates on small instances, else n of them spaced geometrically."""
    if len(cands) <= n:
        return cands
    pts = np.geomspace(cands[0], cands[-1], n)
    idx = np.unique(np.clip(np.searchsorted(cands, pts), 0, len(cands) - 1))
    return cands[idx]


def min_period(ctx: Context, b: int, opts: list[int]) -> Template | None:
    """The single pipeline with the smallest period that meets the SLO (k-ary search).

    The search first drops the device limits (cheap: nothing to track); if the fastest chain
    then fits the cluster it is the answer, else the search goes on above its period with the
    limits in force (the relaxed optimum is a lower bound)."""
    cands = candidate_caps(ctx, b, opts)
    if not len(cands):
        return None
    goal = ctx.goal
    q = queue_periods(goal.batch, b)

    def check(c: Context, idx: np.ndarray) -> list[Template | None]:
        caps = cands[idx]
        if goal.slo_s is None:
            return [None if p is None else c.evaluate(b, p)
                    for p in min_devices(c, b, opts, caps)]
        out: list[Template | None] = []
        for p, cap in zip(min_latency(c, b, opts, caps), caps, strict=True):
            t = None if p is None else c.evaluate(b, p)
            ok = t is not None and t.latency_s + q * cap <= goal.slo_s * (1 + 1e-12)
            out.append(t if ok else None)
        return out

    monotone = goal.slo_s is None or q == 0
    if not monotone and len(cands) <= EXACT_CANDIDATES:
        for s in range(0, len(cands), CHUNK):
            res = check(ctx, np.arange(s, min(s + CHUNK, len(cands))))
            for t in res:
                if t is not None:
                    return t
        return None
    free = replace(ctx, limits=Limits())
    found = _kary(lambda idx: check(free, idx), -1, len(cands))
    if found is None:
        return None
    k, t = found
    if not ctx.limits.violated(t.path.usage(t.space)):
        return t
    found = _kary(lambda idx: check(ctx, idx), k - 1, len(cands))
    return None if found is None else found[1]


def _kary(check: Callable[[np.ndarray], list[Template | None]], lo: int,
          n: int) -> tuple[int, Template] | None:
    """The first index in (lo, n) whose check passes, for a monotone check."""
    top = check(np.array([n - 1]))[0]
    if top is None:
        return None
    hi, best = n - 1, top
    while hi - lo > 1:
        probe = np.unique(np.linspace(lo + 1, hi - 1, min(KARY, hi - lo - 1)).round()
                          .astype(int))
        res = check(probe)
        first = next((k for k, t in enumerate(res) if t is not None), None)
        if first is None:
            lo = int(probe[-1])
        else:
            hi, best = int(probe[first]), res[first]  # type: ignore[assignment]
            lo = int(probe[first - 1]) if first > 0 else lo
    return hi, best


def _priced_slo(ctx: Context, b: int, caps: np.ndarray,
                solve_with: Callable[[np.ndarray, np.ndarray, int], list[Path | None]],
                seeds: list[Template | None],
                value: Callable[[Template], float]) -> list[Template | None]:
    """For caps whose chain misses the SLO: sweep the latency multiplier, keep the chain of
    least `value` that meets it. `solve_with(caps, lat, sweep)` solves the weighted problems
    (each cap's in one run of rising weights: `Batch.sweep`)."""
    out: list[Template | None] = [t if t is not None and ctx.meets_slo(t) else None
                                  for t in seeds]
    miss = [k for k, t in enumerate(seeds) if t is not None and not ctx.meets_slo(t)]
    if not miss:
        return out
    if len(miss) > GRID:  # sweep at up to GRID of those caps, spread geometrically
        keep = grid_caps(caps[miss], GRID)
        miss = [k for k in miss if caps[k] in set(keep.tolist())][:GRID]
    rows, lams = [], []
    for k in miss:
        t = seeds[k]
        assert t is not None
        scale = abs(value(t)) / max(t.latency_s, 1e-30)
        for lam in LAMBDAS:
            rows.append(k)
            lams.append(lam * scale)
    paths = solve_with(caps[np.array(rows)], np.array(lams), len(LAMBDAS))
    for k, p in zip(rows, paths, strict=True):
        if p is None:
            continue
        t = ctx.evaluate(b, p)
        if not ctx.meets_slo(t):
            continue
        cur = out[k]
        if cur is None or value(t) < value(cur):
            out[k] = t
    return out


def device_family(ctx: Context, b: int, opts: list[int]) -> list[Template]:
    """Fewest-device pipelines, one per period cap: the small efficient replicas."""
    caps = grid_caps(candidate_caps(ctx, b, opts))
    if not len(caps):
        return []
    seeds = [None if p is None else ctx.evaluate(b, p)
             for p in min_devices(ctx, b, opts, caps, exact=False)]
    sp = ctx.space(b)
    per = sp.opt_use[opts].sum(axis=1).astype(float)[None, :]

    def weighted(c: np.ndarray, lam: np.ndarray, sweep: int) -> list[Path | None]:
        return _run(ctx, sp, make_batch(sp, opts, _fits(sp, opts), lam, per, c, sweep),
                    exact=False)

    got = _priced_slo(ctx, b, caps, weighted, seeds, lambda t: float(t.n_devices))
    return [t for t in got if t is not None]


def per_item_family(ctx: Context, b: int, opts: list[int], kind: str,
                    refine: bool = True) -> list[Template]:
    """Least energy (or cost) pipelines, one per period cap: every candidate cap on small
    instances, else a geometric grid (then, with `refine`, a finer grid between the two caps
    around the best)."""
    cands = candidate_caps(ctx, b, opts)
    if not len(cands):
        return []
    exact = len(cands) <= EXACT_CANDIDATES
    caps = cands if exact else grid_caps(cands)
    found = _per_item_at(ctx, b, opts, kind, caps, exact)
    if refine and not exact and found:
        found += refine_per_item(ctx, b, opts, kind, found)
    return found


def refine_per_item(ctx: Context, b: int, opts: list[int], kind: str,
                    found: list[Template]) -> list[Template]:
    """Zoom in on the best cap: between the grid caps around it, a finer grid, until the
    window holds few enough candidates to try every one."""
    cands = candidate_caps(ctx, b, opts)
    caps = grid_caps(cands)
    out: list[Template] = []
    best = min(found, key=lambda t: t.objective(kind))
    for _ in range(4):
        k = int(np.searchsorted(caps, best.period_s * (1 - 1e-12)))
        lo, hi = caps[max(0, k - 1)], caps[min(len(caps) - 1, k + 1)]
        window = cands[(cands >= lo) & (cands <= hi)]
        last = len(window) <= CHUNK
        caps = window if last else grid_caps(window, KARY)
        got = _per_item_at(ctx, b, opts, kind, caps, False)
        out += got
        best = min([best, *got], key=lambda t: t.objective(kind))
        if last:
            break
    return out


def _per_item_at(ctx: Context, b: int, opts: list[int], kind: str, caps: np.ndarray,
                 exact: bool) -> list[Template]:
    sp = ctx.space(b)
    eps = np.zeros(len(caps))
    if kind == "cost":  # many chains tie on price: prefer the faster, by a negligible weight
        eps = 1e-9 * float(np.nanmin(sp.opt_price_s[opts])) * caps / _latency_bound(sp, opts)
    seeds = [None if p is None else ctx.evaluate(b, p)
             for p in min_per_item(ctx, b, opts, kind, caps, eps, exact)]

    def weighted(c: np.ndarray, lam: np.ndarray, sweep: int) -> list[Path | None]:
        return min_per_item(ctx, b, opts, kind, c, lam, exact, sweep)

    got = _priced_slo(ctx, b, caps, weighted, seeds,
                     lambda t: t.objective(kind) * t.space.items)
    return [t for t in got if t is not None]


# ---------------------------------------------------------------------------------------------
# Templates per objective


def dedupe(ts: Iterable[Template | None]) -> list[Template]:
    seen: dict[tuple[object, ...], Template] = {}
    for t in ts:
        if t is not None and t.key not in seen:
            seen[t.key] = t
    return list(seen.values())


def latency_floor(ctx: Context, b: int, tys: tuple[int, ...]) -> float:
    """A lower bound on the latency of any pipeline of types `tys` at micro-batch b: the
    least DP latency with the device limits dropped (the DP's latency leaves out only what
    `evaluate` adds: network feedback, shared caches)."""
    opts = ctx.options(b, tys)
    if not opts:
        return math.inf
    sp = ctx.space(b)
    batch = make_batch(sp, opts, _fits(sp, opts), 1.0, None, np.array([np.inf]))
    path = solve(sp, batch, Limits(), exact=False, price=False)[0]
    return math.inf if path is None else stage_costs(sp, batch, 0, path)


def _searched(ctx: Context) -> list[tuple[int, tuple[int, ...]]]:
    """The (micro-batch, restriction) pairs worth searching: under an SLO, those whose fastest
    micro-batch alone meets it (a request also waits behind its own earlier micro-batches)."""
    g = ctx.goal
    pairs = [(b, tys) for b in ctx.micro_batches for _, tys in ctx.restrictions]
    if g.slo_s is None:
        return pairs
    # Every restriction's chains are chains of the first (all types): one floor per b.
    ok = {b: latency_floor(ctx, b, ctx.restrictions[0][1]) <= g.slo_s * (1 + 1e-9)
          for b in ctx.micro_batches}
    return [(b, tys) for b, tys in pairs if ok[b]]


def templates_for(ctx: Context, objective: str) -> list[Template]:
    out: list[Template | None] = []
    pairs = _searched(ctx)
    mixed = ctx.restrictions[0][1] if len(ctx.restrictions) > 1 else None
    deferred: list[tuple[int, tuple[int, ...]]] = []
    for b, tys in pairs:
        opts = ctx.options(b, tys)
        if not opts:
            continue
        if (objective == "throughput" and tys == mixed
                and len(candidate_caps(ctx, b, opts)) > EXACT_CANDIDATES):
            deferred.append((b, tys))  # large: after the one-type families have ranked b
            continue
        out.extend(_templates_at(ctx, objective, b, opts))
    if deferred:
        # Large instances: the mixed-type family (the costliest search) only for the
        # micro-batches whose one-type replica mix comes within `FASTEST_WITHIN` of the best.
        found = dedupe(out)
        value = {}
        for b, _ in deferred:
            mix = choose(ctx, [t for t in found if t.b == b])
            value[b] = mix.throughput if mix is not None else 0.0
        top = max(value.values(), default=0.0)
        keep = [b for b in value if value[b] >= FASTEST_WITHIN * top and value[b] > 0] or \
            list(value)
        for b, tys in deferred:
            if b in keep:
                out.extend(_templates_at(ctx, objective, b, ctx.options(b, tys)))
    if objective in ("energy", "cost"):
        out.extend(_refine_best(ctx, objective, dedupe(out)))
    if objective == "throughput":
        out.extend(_fastest(ctx, dedupe(out)))
    return dedupe(out)


def _templates_at(ctx: Context, objective: str, b: int, opts: list[int]
                  ) -> list[Template | None]:
    out: list[Template | None] = []
    if objective == "latency":
        p = min_latency(ctx, b, opts, np.array([np.inf]))[0]
        t = None if p is None else ctx.evaluate(b, p)
        out.append(t if t is not None and ctx.meets_slo(t) else None)
        if ctx.goal.power_cap_w is not None or ctx.goal.min_domestic_share > 0:
            out.extend(device_family(ctx, b, opts))
    elif objective == "throughput":
        out.extend(device_family(ctx, b, opts))
        if ctx.goal.power_cap_w is not None:
            out.extend(per_item_family(ctx, b, opts, "energy"))
    else:
        out.extend(per_item_family(ctx, b, opts, objective, refine=False))
    return out


def _refine_best(ctx: Context, kind: str, found: list[Template]) -> list[Template]:
    """On large instances: a finer cap grid for the best `REFINE_TOP` (micro-batch, types)."""
    by: dict[tuple[int, tuple[int, ...]], list[Template]] = {}
    for t in found:
        if ctx.meets_slo(t):
            by.setdefault((t.b, tuple(ty for ty, _ in t.devices)), []).append(t)
    ranked = sorted(by.items(), key=lambda kv: min(t.objective(kind) for t in kv[1]))
    out: list[Template] = []
    for (b, used), ts in ranked[:REFINE_TOP]:
        # the smallest restriction that holds the types these pipelines use
        tys = min((r for _, r in ctx.restrictions if set(used) <= set(r)), key=len)
        opts = ctx.options(b, tys)
        if opts and len(candidate_caps(ctx, b, opts)) > EXACT_CANDIDATES:
            out += refine_per_item(ctx, b, opts, kind, ts)
    return out


def _fastest(ctx: Context, family: list[Template]) -> list[Template | None]:
    """The fastest single pipeline over every type (exact), per micro-batch.

    On small instances for every micro-batch; on large ones for the micro-batches whose
    replica mix (from the device families) comes within `FASTEST_WITHIN` of the best: the
    fastest pipeline is one more template there, and the costliest search of all."""
    tys = ctx.restrictions[0][1]
    small = all(len(candidate_caps(ctx, b, ctx.options(b, tys))) <= EXACT_CANDIDATES
                for b in ctx.micro_batches if ctx.options(b, tys))
    bs = list(ctx.micro_batches)
    if not small:
        value = {}
        for b in bs:
            mix = choose(ctx, [t for t in family if t.b == b])
            value[b] = mix.throughput if mix is not None else 0.0
        top = max(value.values(), default=0.0)
        bs = [b for b in bs if value[b] >= FASTEST_WITHIN * top and value[b] > 0] or \
            [max(bs, key=lambda b: value[b])]
    out: list[Template | None] = []
    for b in bs:
        opts = ctx.options(b, tys)
        if opts:
            out.append(min_period(ctx, b, opts))
    return out


# ---------------------------------------------------------------------------------------------
# Choosing replicas


def fits_alone(ctx: Context, t: Template) -> bool:
    g = ctx.goal
    if g.power_cap_w is not None and t.power_w > g.power_cap_w * (1 + 1e-12):
        return False
    if g.max_devices is not None and t.n_devices > g.max_devices:
        return False
    return t.domestic_devices >= g.min_domestic_share * t.n_devices - 1e-9


def copies(ctx: Context, t: Template) -> int:
    """How many copies of `t` the device counts, power cap and device budget allow."""
    g = ctx.goal
    n = min(ctx.types[ty].count // c for ty, c in t.devices)
    if g.power_cap_w is not None:
        n = min(n, int(g.power_cap_w // t.power_w))
    if g.max_devices is not None:
        n = min(n, g.max_devices // t.n_devices)
    return max(n, 1)


def choose(ctx: Context, templates: list[Template]) -> Mix | None:
    g = ctx.goal
    ok = [t for t in templates if ctx.meets_slo(t)]
    if g.objective == "throughput":
        best: Mix | None = None
        for b in sorted({t.b for t in ok}):
            group = [t for t in ok if t.b == b]
            key = (g.power_cap_w, g.max_devices, g.min_domestic_share,
                   *((id(t.space), t.key) for t in group))
            if key not in ctx.counts:
                ctx.counts[key] = best_counts(
                    group, {t.index: t.count for t in ctx.types}, power_cap_w=g.power_cap_w,
                    max_devices=g.max_devices, min_domestic_share=g.min_domestic_share)
            counts = ctx.counts[key]
            if counts is None:
                continue
            mix = Mix(tuple((t, n) for t, n in zip(group, counts, strict=True) if n > 0))
            if not _mix_ok(ctx, mix):
                continue
            if best is None or mix.throughput > best.throughput * (1 + 1e-12):
                best = mix
        return best
    alone = [t for t in ok if fits_alone(ctx, t)]
    if not alone:
        return None
    t = min(alone, key=lambda t: (t.objective(g.objective), t.request_latency_s, t.n_devices))
    n = 1 if g.objective == "latency" else copies(ctx, t)
    return Mix(((t, n),))


def _mix_ok(ctx: Context, mix: Mix) -> bool:
    g = ctx.goal
    use = mix.usage()
    if any(use.get(t.index, 0) > t.count for t in ctx.types):
        return False
    if g.power_cap_w is not None and mix.power_w > g.power_cap_w * (1 + 1e-9):
        return False
    if g.max_devices is not None and mix.n_devices > g.max_devices:
        return False
    return mix.domestic_share >= g.min_domestic_share - 1e-9


# ---------------------------------------------------------------------------------------------
# Infeasible goals: say which constraint, and the nearest feasible point


def diagnose(ctx: Context) -> KCloudError:
    g = ctx.goal
    relaxed = Goal(objective="latency", batch=g.batch, precision=g.precision,
                   input_tokens=g.input_tokens, output_tokens=g.output_tokens,
                   workload=g.workload)
    free = Context(ctx.model, ctx.cluster, relaxed, ctx.types, ctx.notes, ctx.calibration,
                   Limits(ctx.limits.per_type), sorted({1, *ctx.micro_batches}),
                   ctx.restrictions, ctx.spaces, ctx.in_flight)
    fastest: Template | None = None
    for b in free.micro_batches:
        opts = free.options(b, [t.index for t in ctx.types])
        if not opts:
            continue
        p = min_latency(free, b, opts, np.array([np.inf]))[0]
        if p is not None:
            t = free.evaluate(b, p)
            if fastest is None or t.request_latency_s < fastest.request_latency_s:
                fastest = t
    if fastest is None:
        return _no_fit(ctx)
    if g.max_devices is not None:
        fewest = None
        for b in free.micro_batches:
            opts = free.options(b, [t.index for t in ctx.types])
            if opts:
                p = min_devices(free, b, opts, np.array([np.inf]))[0]
                if p is not None:
                    n = sum(p.usage(free.space(b)).values())
                    fewest = n if fewest is None else min(fewest, n)
        if fewest is not None and fewest > g.max_devices:
            return InfeasibleGoal(f"max devices {g.max_devices} too low: the smallest plan "
                                  f"needs {fewest} devices", f"give --max-devices {fewest} or more")
    if g.slo_s is not None and fastest.request_latency_s > g.slo_s:
        return InfeasibleGoal(
            f"SLO {_ms(g.slo_s)} unreachable: best latency {_ms(fastest.request_latency_s)} "
            f"(modeled) with plan {fastest.describe()}",
            f"give --slo-ms {fastest.request_latency_s * 1e3 * 1.01:.4g} or more")
    pool = [t for t in templates_for(free, "throughput") + templates_for(free, "energy")
            if ctx.meets_slo(t)] if g.slo_s is not None else \
        templates_for(free, "throughput") + templates_for(free, "energy")
    if g.power_cap_w is not None and pool:
        low = min(pool, key=lambda t: t.power_w)
        if low.power_w > g.power_cap_w:
            return InfeasibleGoal(
                f"power cap {g.power_cap_w:g} W too low: the smallest plan draws "
                f"{low.power_w:.4g} W (modeled) with {low.describe()}",
                f"give --power-cap-w {math.ceil(low.power_w)} or more")
    if g.min_domestic_share > 0:
        shares = [t.domestic_devices / t.n_devices for t in pool] or [0.0]
        best = max(shares)
        if best < g.min_domestic_share:
            hint = (f"give --min-domestic-share {math.floor(best * 100) / 100:g} or less"
                    if best > 0 else "use a cluster with domestic devices that can run it")
            return InfeasibleGoal(
                f"domestic share {g.min_domestic_share:.0%} unreachable: the most domestic "
                f"plan that meets the other constraints reaches {best:.0%}", hint)
    return InfeasibleGoal("no plan meets every constraint together (each alone can be met)",
                          "relax the SLO, power cap, device budget or domestic share")


def _no_fit(ctx: Context) -> KCloudError:
    need = min(weight_bytes(ctx.model.forward, t.precision) for t in ctx.types)
    total = sum(t.count * t.device.memory_bytes.value for t in ctx.types)
    big = max(ctx.types, key=lambda t: t.device.memory_bytes.value)
    return InfeasibleGoal(
        f"{ctx.model.spec} does not fit in cluster {ctx.cluster.name}: needs {need / 1e9:.1f} GB "
        f"of weights plus activations, the cluster holds {total / 1e9:.1f} GB (largest device "
        f"{big.id}, {big.device.memory_bytes.value / 1e9:.1f} GB; usable share "
        f"{_headroom():.0%})", "use a lower --precision or a larger cluster")


def _headroom() -> float:
    from kcloud.hardware.cost import MEMORY_HEADROOM

    return MEMORY_HEADROOM


def _ms(s: float) -> str:
    return f"{s * 1e3:.4g} ms"


# ---------------------------------------------------------------------------------------------


@dataclass
class SearchResult:
    ctx: Context
    mix: Mix
    templates: list[Template]


def search(model: ModelGraphs, cluster: Cluster, goal: Goal, *,
           allow: Callable[[Device], bool] | None = None,
           micro_batches: Iterable[int] | None = None,
           calibration: Calibration | None = None) -> SearchResult:
    """The best mix of replicas for `goal` (raises InfeasibleGoal with the nearest point)."""
    ctx = make_context(model, cluster, goal, allow=allow, micro_batches=micro_batches,
                       calibration=calibration)
    if goal.objective == "throughput" and goal.slo_s is None:
        ctx = _default_slo(ctx)
    bounds: dict[int, float] | None = None  # per micro-batch: the best it can still reach
    held: list[Template] = []  # pipelines whose stages hold all their micro-batches in flight
    for _ in range(MAX_IN_FLIGHT_ROUNDS):
        templates, bounds = _round(ctx, bounds)
        held = dedupe([*held, *(t for t in templates if holds_in_flight(t))])
        over = [t for t in templates if not holds_in_flight(t)]
        mix = choose(ctx, [*held, *over])
        if mix is None:
            raise diagnose(ctx)
        short = [t for t, _ in mix.parts if not holds_in_flight(t)]
        if not short:
            break
        # Pipelines of the best mix keep more micro-batches in flight than their stages'
        # memory counted: search again counting as many as the deepest of them has stages.
        ctx = replace(ctx, in_flight=max(len(t.path.stages) for t in short), spaces={},
                      counts={})
    else:
        mix = choose(ctx, held)
        if mix is None:
            raise InfeasibleGoal(f"{model.spec}: no plan whose pipelines hold the KV cache of "
                                 "every micro-batch in flight was found", "use fewer "
                                 "--output-tokens or a cluster with more memory")
    # Each pipeline's figures with its own micro-batches in flight (its memory: a round may
    # have counted more than it keeps; everything else is the same).
    mix = Mix(tuple((with_own_count(ctx, t), n) for t, n in mix.parts))
    return SearchResult(ctx, mix, held)


def in_flight_of(stages: int) -> int:
    """Micro-batches in flight whose KV cache an LLM pipeline of `stages` stages holds in
    each stage: one per stage, and at least two (the one a stage works on and the one it
    receives: what the search counts at first)."""
    return max(stages, 2)


def holds_in_flight(t: Template) -> bool:
    """Whether `t`'s stages hold the KV cache of every micro-batch its pipeline keeps in
    flight (what its space counted is at least `in_flight_of` its stages; not an LLM: yes)."""
    return not t.space.model.is_llm or in_flight_of(len(t.path.stages)) <= t.space.in_flight


def with_own_count(ctx: Context, t: Template) -> Template:
    """`t` costed with its own micro-batches in flight (`in_flight_of` its stages)."""
    sp = ctx.space_at(t.b, in_flight_of(len(t.path.stages)))
    return t if sp is t.space else ctx.evaluate(t.b, t.path, sp)


def objective_bound(ctx: Context, b: int) -> float:
    """A lower bound on the objective (to minimize) of any mix at micro-batch b, from one
    additive problem with the device limits, caps and SLO dropped (inf: no chain fits).

    Throughput: a chain of N devices with period P has P x N >= the sum over its stages of
    devices x stage time (W), so it yields at most items x N / W, and a mix at most items x
    (the cluster's devices) / the least W. Energy: a period's energy is at least its stages'
    busy energy; cost: the price of a stage's devices over the period, at least over its own
    time. Latency: the least sum of stage and transfer times (`latency_floor`)."""
    objective = ctx.goal.objective
    tys = ctx.restrictions[0][1]
    if objective == "latency":
        return latency_floor(ctx, b, tys)
    opts = ctx.options(b, tys)
    if not opts:
        return math.inf
    sp = ctx.space(b)
    time = sp.time[opts]
    if objective == "throughput":
        w = sp.opt_use[opts].sum(axis=1)[:, None, None] * time
    elif objective == "energy":
        w = sp.opt_tp[opts][:, None, None] * sp.busy_j[opts]
    else:
        w = sp.opt_price_s[opts][:, None, None] * time
    w = np.where(np.isfinite(time) & np.isfinite(w), w, np.inf)
    # no latency weight: what the chains' times and transfers add is zero (under a finite
    # cap, so that a missing transfer stays missing)
    batch = make_batch(sp, opts, w, 0.0, None, np.finfo(float).max)
    path = solve(sp, batch, Limits(), exact=False, price=False)[0]
    if path is None:
        return math.inf
    least = stage_costs(sp, batch, 0, path)
    if objective == "throughput":
        devices = sum(t.count for t in ctx.types)
        if ctx.goal.max_devices is not None:
            devices = min(devices, ctx.goal.max_devices)
        return -sp.items * devices / least if least > 0 else -math.inf
    return least / sp.items


def _round(ctx: Context, bounds: dict[int, float] | None
           ) -> tuple[list[Template], dict[int, float]]:
    """One round's templates, and per micro-batch a bound on what it can reach in the next.

    A micro-batch is searched only while it can still beat the best found. Its bound: in
    the first round `objective_bound`; in a later one its best in the round before (more
    micro-batches in flight only take memory away, so a micro-batch does no better than it
    did; the large instances' grids of caps make that a near-bound: a heuristic there).
    Leaders go alone, in order of their bounds, until one gives a plan; the others whose
    bounds reach its objective follow together."""
    objective = ctx.goal.objective
    if bounds is None:  # one micro-batch: nothing to order, no bound to compute
        bounds = {b: -math.inf if len(ctx.micro_batches) == 1 else objective_bound(ctx, b)
                  for b in ctx.micro_batches}
    order = sorted((b for b in ctx.micro_batches if bounds[b] < math.inf),
                   key=bounds.__getitem__)
    out: list[Template] = []
    searched: list[int] = []
    best = math.inf
    while order and best == math.inf:
        searched.append(order.pop(0))
        out += templates_for(replace(ctx, micro_batches=searched[-1:]), objective)
        mix = choose(ctx, out)
        best = math.inf if mix is None else mix.objective(objective)
    rest = [b for b in order if bounds[b] <= best + 1e-9 * abs(best)]
    if rest:
        out += templates_for(replace(ctx, micro_batches=rest), objective)
    return out, _bests(ctx, out, [*searched, *rest], bounds)


def _bests(ctx: Context, templates: list[Template], searched: list[int],
           bounds: dict[int, float]) -> dict[int, float]:
    """The objective (to minimize) of the best mix at each searched micro-batch (inf: none);
    the others keep their bounds."""
    out = dict(bounds)
    for b in searched:
        mix = choose(ctx, [t for t in templates if t.b == b])
        out[b] = math.inf if mix is None else mix.objective(ctx.goal.objective)
    return out


def _default_slo(ctx: Context) -> Context:
    """The throughput objective's default latency bound: `DEFAULT_SLO_FACTOR` x the fastest
    request (one pipeline over every type, micro-batch = the request), stated in the notes."""
    tys = ctx.restrictions[0][1]
    b = ctx.goal.batch
    opts = ctx.options(b, tys)
    path = min_latency(ctx, b, opts, np.array([np.inf]))[0] if opts else None
    if path is None:
        return ctx  # nothing fits at that batch: the search says so
    fastest = ctx.evaluate(b, path).request_latency_s
    slo = DEFAULT_SLO_FACTOR * fastest
    note = (f"latency bound {slo * 1e3:,.1f} ms: the default for throughput, "
            f"{DEFAULT_SLO_FACTOR:g}x the fastest request ({fastest * 1e3:,.1f} ms); "
            "--slo-ms sets another")
    return replace(ctx, goal=replace(ctx.goal, slo_s=slo), notes=[*ctx.notes, note])
