"""The pipeline dynamic program: the cheapest chain of stages over a graph's layers.

State between stages: (the next layer i, the previous stage's device type t, how many devices
of t the current node already holds for this pipeline, u). A stage of option (type t', tp k)
over layers [i, j) either continues the node (t' == t and u + k fits the node: the cut moves
over the node link and the state becomes (j, t, u + k)) or starts on a fresh node (the cut
moves over the network, the state becomes (j, t', k); for t' == t only where t has a second
node). Every pipeline the DP returns can therefore be placed as it was costed: co-located
stages really share a node.

Costs are additive. One call solves a batch of K problems at once (different period caps and
weights over the same options), which is how the search sweeps caps and multipliers: for
problem k, a stage of option o over [i, j) costs

    base[o, i, j] + lat[k] * (time[o, i, j] + refill[o, i, j]) + per_option[k, o]
                                                                    if time[o, i, j] <= cap[k]

(infinite otherwise, and where `base` is infinite: the stage does not fit), and a transfer of
cut i from type t over link kind x costs lat[k] * trans[t, x, i] if that time is <= cap[k]. A
chain of more than one stage also pays lat[k] * feedback[t, INTRA] for its first stage's type t
(an LLM's tokens going back to the first stage; zero otherwise, and in `evaluate` it goes over
the network where the pipeline does, which the DP leaves out). Every chain pays
lat[k] * arrival[t] for its first stage's type t, and every stage its refill (what a request's
first pass loses on idle devices: `StageSpace.arrival`, `StageSpace.refill`).
The recursion runs backward over i in a compiled kernel (numba; the problems of a batch in
parallel, one per thread), each option over its own reach: stages of few devices reach few
layers (memory).

A sweep (`Batch.sweep`: runs of problems that differ only in one rising weight, the SLO's
latency multiplier or the price of a device) is solved at the ends of each run and then at
the midpoints of stretches whose ends differ: a problem's cost is linear in the weight, so
each chain is cheapest over one interval of it, and where both ends take one chain every
weight between does too.

Device availability (per type) and a device budget are resources, enforced lazily and exactly:
the DP first runs without tracking them; problems whose best chain uses more of some resource
than there is run again with that resource's usage in the state (repeat until every chain
respects every limit). On large clusters nothing binds and the state stays small; on small
clusters the tracked counts are small. Should the tracked state exceed `MAX_TRACKED_STATES`
counters (a pipeline wanting hundreds of devices of one type on a big cluster), the broken
limits are priced instead: each device of the resource costs a multiplier mu, swept over a
geometric range, and the cheapest chain that respects every limit is kept. That answer always
respects the limits; it is optimal among the chains some mu reaches (a Lagrangian bound).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
from numba import njit, prange

from kcloud.planner.space import INTRA, NET, StageSpace

MAX_TRACKED_STATES = 40
PRICE_STEPS = 12


@dataclass(frozen=True)
class Path:
    """A pipeline: stages (option, first layer, end layer) and the link kind (INTRA or NET)
    into each stage after the first."""

    stages: tuple[tuple[int, int, int], ...]
    links: tuple[int, ...]

    def usage(self, space: StageSpace) -> Mapping[int, int]:
        """Devices of each type the pipeline takes (by type index; PIM groups included), kept
        by the space (read-only)."""
        got = space.usages.get(self.stages)
        if got is None:
            use = space.opt_use[[o for o, _, _ in self.stages]].sum(axis=0).tolist()
            got = space.usages[self.stages] = MappingProxyType(
                {ty: n for ty, n in enumerate(use) if n})
        return got


@dataclass(frozen=True)
class Limits:
    """Resource limits for one pipeline: devices per type, and devices in total."""

    per_type: tuple[tuple[int, int], ...] = ()  # (type index, devices available)
    total: int | None = None

    def violated(self, usage: Mapping[int, int]) -> list[tuple[str, int]]:
        out: list[tuple[str, int]] = []
        for t, cap in self.per_type:
            if usage.get(t, 0) > cap:
                out.append(("type", t))
        if self.total is not None and sum(usage.values()) > self.total:
            out.append(("total", -1))
        return out

    def cap(self, res: tuple[str, int]) -> int:
        if res[0] == "total":
            assert self.total is not None
            return self.total
        return dict(self.per_type)[res[1]]


@dataclass
class Batch:
    """K additive problems over the same options (see the module docstring)."""

    options: list[int]  # indices into space.options
    base: np.ndarray  # (len(options), L+1, L+1); inf where the stage is not allowed
    lat: np.ndarray  # (K,)
    per_option: np.ndarray  # (K, len(options))
    cap: np.ndarray  # (K,)
    # Problems in runs of `sweep` that differ only in one weight, rising along the run (the
    # latency weight, or the price of a device): see `_dp`.
    sweep: int = 1

    @property
    def K(self) -> int:
        return len(self.lat)

    def take(self, ks: np.ndarray) -> Batch:
        return Batch(self.options, self.base, self.lat[ks], self.per_option[ks], self.cap[ks])


def solve(space: StageSpace, batch: Batch, limits: Limits, *, exact: bool = True,
          price: bool = True) -> list[Path | None]:
    """The cheapest pipeline of each problem in `batch`, within `limits`.

    With `exact=False` a broken limit is priced at once instead of tracked (faster; see the
    module docstring), or with `price=False` too, the problem reads as infeasible (right when
    the first pass already minimized the broken resource).
    """
    out: list[Path | None] = [None] * batch.K
    todo = np.arange(batch.K)
    tracked: list[tuple[str, int]] = []
    while len(todo):
        paths = _dp(space, batch if len(todo) == batch.K else batch.take(todo), tracked, limits)
        again: list[int] = []
        broken: list[Path] = []
        new: set[tuple[str, int]] = set()
        for k, p in zip(todo, paths, strict=True):
            if p is None:
                continue
            bad = [r for r in limits.violated(p.usage(space)) if r not in tracked]
            if bad:
                again.append(int(k))
                broken.append(p)
                new.update(bad)
            else:
                out[int(k)] = p
        if not again:
            break
        size = int(np.prod([limits.cap(x) + 1 for x in [*tracked, *new]]))
        if size > MAX_TRACKED_STATES or not exact:
            if price:
                got = _priced(space, batch, again, broken, sorted({*tracked, *new}), limits)
                for k, p in zip(again, got, strict=True):
                    out[k] = p
            break
        tracked.extend(sorted(new))
        todo = np.array(again)
    return out


def _priced(space: StageSpace, batch: Batch, ks: list[int], first: list[Path],
            resources: list[tuple[str, int]], limits: Limits) -> list[Path | None]:
    """Problems `ks` (whose best chains `first` broke a limit) with every device of the
    limited `resources` priced at mu, swept geometrically; the cheapest chain within the
    limits, by the problem's own cost, is kept (see the module docstring)."""
    opt_use = space.opt_use[batch.options].astype(float)  # devices per type (PIM included)
    use = np.zeros(len(batch.options))
    for r in resources:
        use += opt_use.sum(axis=1) if r[0] == "total" else opt_use[:, r[1]]
    rows, mus = [], []
    for k, p in zip(ks, first, strict=True):
        c0 = max(abs(stage_costs(space, batch, k, p)), 1e-30)
        n_dev = max(1, sum(p.usage(space).values()))
        for mu in np.geomspace(1e-4, 10.0, PRICE_STEPS) * c0 / n_dev:
            rows.append(k)
            mus.append(mu)
    big = batch.take(np.array(rows))
    big.per_option = big.per_option + np.array(mus)[:, None] * use[None, :]
    big.sweep = PRICE_STEPS
    paths = _dp(space, big, [], limits)
    out: list[Path | None] = []
    for k in ks:
        best, best_c = None, np.inf
        for row, p in zip(rows, paths, strict=True):
            if row != k or p is None or limits.violated(p.usage(space)):
                continue
            c = stage_costs(space, batch, k, p)
            if c < best_c:
                best, best_c = p, c
        out.append(best)
    return out


def stage_costs(space: StageSpace, batch: Batch, k: int, path: Path) -> float:
    """Problem k's cost of `path` (what `solve` minimizes), recomputed stage by stage."""
    pos = {o: n for n, o in enumerate(batch.options)}
    o, i, j = (np.array(x) for x in zip(*path.stages, strict=True))
    at = np.array([pos[x] for x in o.tolist()])
    lat = batch.lat[k]
    c = float(batch.base[at, i, j].sum() + lat * (space.time[o, i, j].sum()
                                                   + space.refill[o, i, j].sum())
              + batch.per_option[k, at].sum())
    if path.links:
        c += lat * float(space.trans[space.opt_type[o[:-1]], np.array(path.links), j[:-1]].sum())
    first = space.options[path.stages[0][0]].type
    c += batch.lat[k] * float(space.arrival[first])
    if len(path.stages) > 1:
        c += batch.lat[k] * float(space.feedback[first, INTRA])
    return c


def _dp(space: StageSpace, batch: Batch, tracked: list[tuple[str, int]],
        limits: Limits) -> list[Path | None]:
    """Every problem's cheapest chain. A run of a sweep (`Batch.sweep`) is solved at its ends,
    then at midpoints of the stretches whose ends differ: a problem's cost is linear in the
    swept weight, so the least of the chains' lines is concave, and each chain is cheapest
    over one interval of weights: where both ends of a stretch take one chain, every weight
    between takes it too (the answers equal solving every problem)."""
    s = batch.sweep
    if s <= 2 or batch.K % s:
        return _dp_batch(space, batch, tracked, limits)
    got: dict[int, Path | None] = {}
    ends = [k for r in range(0, batch.K, s) for k in (r, r + s - 1)]
    stretches = [(r, r + s - 1) for r in range(0, batch.K, s)]
    ask = ends
    while ask:
        got.update(zip(ask, _dp_batch(space, batch.take(np.array(ask)), tracked, limits),
                       strict=True))
        ask, todo = [], []
        for a, b in stretches:
            if b - a < 2:
                continue
            if got[a] == got[b]:
                got.update((k, got[a]) for k in range(a + 1, b))
                continue
            m = (a + b) // 2
            ask.append(m)
            todo += [(a, m), (m, b)]
        stretches = todo
    return [got[k] for k in range(batch.K)]


def _dp_batch(space: StageSpace, batch: Batch, tracked: list[tuple[str, int]],
              limits: Limits) -> list[Path | None]:
    with np.errstate(invalid="ignore"):  # 0 x inf where a weight is zero: masked below
        return _dp_inner(space, batch, tracked, limits)


def _dp_inner(space: StageSpace, batch: Batch, tracked: list[tuple[str, int]],
              limits: Limits) -> list[Path | None]:
    L = space.L
    opts = batch.options
    n_opt = len(opts)
    o_type = space.opt_type[opts]
    o_tp = space.opt_tp[opts]
    types = sorted({int(t) for t in o_type})
    n_t = len(types)
    caps = np.array([space.types[t].node_cap for t in types], dtype=np.int64)
    # Options on a (type, slot) grid, by tensor-parallel degree, then in each type's own order
    # (the order ties go in); empty slots hold n_opt (never allowed).
    width = max(int((o_type == t).sum()) for t in types)
    grid = np.full((n_t, width), n_opt, dtype=np.int64)
    for n, t in enumerate(types):
        x = np.flatnonzero(o_type == t)
        grid[n, :len(x)] = x[np.argsort(o_tp[x], kind="stable")]
    tp = o_tp.astype(np.int64)

    # Tracked resources: flattened counters plus one slot (index R) for "over the limit";
    # shift[n, r]: the counters after a stage of option n.
    dims = [limits.cap(r) + 1 for r in tracked]
    R = int(np.prod(dims)) if dims else 1
    shift = np.tile(np.arange(R, dtype=np.int64), (n_opt, 1))
    if dims:
        strides = np.cumprod([1, *dims[:-1]]).astype(np.int64)
        coords = (np.arange(R)[:, None] // strides[None, :]) % np.array(dims)[None, :]
        o_use = space.opt_use[opts]  # devices per type, an offload's PIM group included
        for n in range(n_opt):
            use = np.array([o_use[n].sum() if r[0] == "total" else o_use[n, r[1]]
                            for r in tracked])
            new = coords + use[None, :]
            ok = (new < np.array(dims)[None, :]).all(axis=1)
            shift[n] = np.where(ok, new @ strides, R)

    base = np.ascontiguousarray(batch.base)
    lat, cap = batch.lat.astype(float), batch.cap.astype(float)
    # Transfer costs per problem into a stage after type t: (K, T, 2, L+1).
    tr = space.trans[types][None]
    tcost = np.ascontiguousarray(
        np.where(tr <= cap[:, None, None, None], lat[:, None, None, None] * tr, np.inf))
    # A fresh node of the previous stage's own type needs a second node of that type.
    multi = np.array([len(space.types[t].nodes) > 1 for t in types])
    may_follow = ~np.eye(n_t, dtype=bool) | np.diag(multi)  # [previous type, next type]

    stages, links, depth = _kernel(
        L, np.ascontiguousarray(space.time), np.ascontiguousarray(space.refill),
        np.asarray(opts, dtype=np.int64), base,
        np.ascontiguousarray(batch.per_option, dtype=float), lat, cap, grid, tp, caps, shift,
        tcost, space.arrival[types].astype(float), space.feedback[types, INTRA].astype(float),
        may_follow)
    # every problem's stages, flat, read out at once
    held = np.arange(L)[None, :] < depth[:, None]
    flat = stages[held]
    flat[:, 0] = np.asarray(opts, dtype=np.int64)[flat[:, 0]]  # options by their own index
    st_all = list(map(tuple, flat.tolist()))
    ln_all = links[held].tolist()
    out: list[Path | None] = []
    at = 0
    for d in depth.tolist():
        out.append(Path(tuple(st_all[at:at + d]), tuple(ln_all[at:at + d - 1])) if d else None)
        at += d
    return out


@njit(cache=True, nogil=True, parallel=True)
def _kernel(L, time, refill, oidx, base, per, lat, cap, grid, tp, caps, shift, tcost, arrival,
            feedback, may_follow):  # pragma: no cover - compiled
    """The backward recursion for each problem, and its chain read back from the choices.

    F[t, u, r, i]: the least cost from layer i on, after a stage of type t that left its node
    holding u + 1 devices (tracked counters r; r == R: over a limit, never finite). G[t, m, u,
    r]: the least cost of a stage of slot (t, m) from the current layer on that leaves its
    node holding u + 1 devices. Ties go to the first end, slot and type, in order."""
    K = lat.shape[0]
    n_t, M = grid.shape
    n_opt, R = shift.shape
    U = 0
    for t in range(n_t):
        U = max(U, caps[t])
    inf = np.inf
    # Reach per option: the furthest end it may take from each start (memory, the largest
    # cap); beyond it every stage costs inf for every problem.
    top = -inf
    for k in range(K):
        top = max(top, cap[k])
    reach = np.full((n_opt, L + 1), -1, dtype=np.int64)
    for n in range(n_opt):
        for i in range(L):
            for j in range(L, i, -1):
                if np.isfinite(base[n, i, j]) and time[oidx[n], i, j] <= top:
                    reach[n, i] = j
                    break
    stages = np.zeros((K, L, 3), dtype=np.int64)
    links = np.zeros((K, L), dtype=np.int64)
    depth = np.zeros(K, dtype=np.int64)
    for k in prange(K):
        F = np.full((n_t, U, R + 1, L + 1), inf)
        for t in range(n_t):
            for u in range(caps[t]):
                for r in range(R):
                    F[t, u, r, L] = 0.0
        G = np.full((n_t, M, U + 1, R), inf)
        arg_j = np.zeros((L, n_t, M, U, R), dtype=np.int32)
        arg_pt = np.zeros((L, n_t, R), dtype=np.int32)
        arg_fm = np.zeros((L, n_t, R), dtype=np.int32)
        arg_cont = np.full((L, n_t, U, R), -1, dtype=np.int32)
        C = np.empty(L + 1)
        fv = np.empty((n_t, R))
        start = inf
        for i in range(L - 1, -1, -1):
            for t in range(n_t):
                for m in range(M):
                    n = grid[t, m]
                    for u in range(U + 1):
                        for r in range(R):
                            G[t, m, u, r] = inf
                    if n == n_opt:
                        continue
                    jhi = reach[n, i]
                    if jhi <= i:
                        continue
                    # the stage's cost over [i, j) (the request's first pass, and an LLM's
                    # tokens back to its first stage, at i = 0)
                    for j in range(i + 1, jhi + 1):
                        tau = time[oidx[n], i, j]
                        c = (base[n, i, j] + lat[k] * (tau + refill[oidx[n], i, j]) + per[k, n]
                             if tau <= cap[k] else inf)
                        if i == 0:
                            c += lat[k] * arrival[t]
                            if j < L:
                                c += lat[k] * feedback[t]
                        C[j] = c
                    for u in range(tp[n] - 1, caps[t]):
                        for r in range(R):
                            r2 = shift[n, r]
                            best = inf
                            bj = i + 1
                            for j in range(i + 1, jhi + 1):
                                v = C[j] + F[t, u, r2, j]
                                if v < best:
                                    best = v
                                    bj = j
                            G[t, m, u, r] = best
                            arg_j[i, t, m, u, r] = bj
            # a stage on a fresh node, leaving it holding tp devices: the best slot per type
            for t in range(n_t):
                for r in range(R):
                    best = inf
                    bm = 0
                    for m in range(M):
                        n = grid[t, m]
                        if n == n_opt:
                            continue
                        v = G[t, m, tp[n] - 1, r]
                        if v < best:
                            best = v
                            bm = m
                    fv[t, r] = best
                    arg_fm[i, t, r] = bm
            if i == 0:
                best = inf
                bt = 0
                for t in range(n_t):
                    if fv[t, 0] < best:
                        best = fv[t, 0]
                        bt = t
                start = best
                arg_pt[0, 0, 0] = bt
                break
            for p in range(n_t):  # the previous stage's type
                for r in range(R):
                    fbest = inf
                    bt = 0
                    for t in range(n_t):
                        if may_follow[p, t] and fv[t, r] < fbest:
                            fbest = fv[t, r]
                            bt = t
                    arg_pt[i, p, r] = bt
                    net = fbest + tcost[k, p, NET, i]
                    for u in range(caps[p]):
                        cv = inf
                        cm = 0
                        for m in range(M):
                            n = grid[p, m]
                            if n == n_opt or u + 1 + tp[n] > caps[p]:
                                continue
                            v = G[p, m, u + tp[n], r] + tcost[k, p, INTRA, i]
                            if v < cv:
                                cv = v
                                cm = m
                        F[p, u, r, i] = cv if cv < net else net
                        arg_cont[i, p, u, r] = cm if cv < net else -1
        if not start < inf:
            continue
        # the chain, read back from the choices
        i = 0
        r = 0
        t = arg_pt[0, 0, 0]
        m = arg_fm[0, t, 0]
        u = tp[grid[t, m]]
        d = 0
        while True:
            j = arg_j[i, t, m, u - 1, r]
            n = grid[t, m]
            stages[k, d, 0] = n
            stages[k, d, 1] = i
            stages[k, d, 2] = j
            d += 1
            r = shift[n, r]
            if j == L:
                break
            i = j
            c = arg_cont[i, t, u - 1, r]
            if c >= 0:
                m = c
                u = u + tp[grid[t, c]]
                links[k, d - 1] = INTRA
            else:
                t2 = arg_pt[i, t, r]
                m = arg_fm[i, t2, r]
                t = t2
                u = tp[grid[t, m]]
                links[k, d - 1] = NET
        depth[k] = d
    return stages, links, depth


_loaded = False


def load_kernel() -> float:
    """Compile the DP kernel (the first use in a checkout, about 10 s; then cached beside the
    source) or load it (a few tenths of a second), once per process, on a one-layer problem:
    the seconds it took (measured; 0 once loaded). `make_plan` calls it before timing its
    search, so a search time is the search's own."""
    global _loaded
    if _loaded:
        return 0.0
    t0 = time.perf_counter()
    one = np.zeros((1, 2, 2))
    i64 = np.ones(1, dtype=np.int64)
    _kernel(1, one, one, i64 - 1, one, np.zeros((1, 1)), np.ones(1), np.ones(1),
            np.zeros((1, 1), dtype=np.int64), i64, i64, np.zeros((1, 1), dtype=np.int64),
            np.zeros((1, 1, 2, 2)), np.zeros(1), np.zeros(1), np.ones((1, 1), dtype=bool))
    _loaded = True
    return time.perf_counter() - t0


def make_batch(space: StageSpace, options: Sequence[int], base: np.ndarray,
               lat: np.ndarray | float, per_option: np.ndarray | None,
               cap: np.ndarray | float, sweep: int = 1) -> Batch:
    """A Batch with scalars broadcast to the batch size."""
    lat_a = np.atleast_1d(np.asarray(lat, dtype=float))
    cap_a = np.atleast_1d(np.asarray(cap, dtype=float))
    K = max(len(lat_a), len(cap_a), 1 if per_option is None else per_option.shape[0])
    lat_a = np.broadcast_to(lat_a, (K,)).copy()
    cap_a = np.broadcast_to(cap_a, (K,)).copy()
    po = (np.zeros((K, len(options))) if per_option is None
          else np.broadcast_to(per_option, (K, len(options))).copy())
    return Batch(list(options), base, lat_a, po, cap_a, sweep)
