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

    base[o, i, j] + lat[k] * time[o, i, j] + per_option[k, o]      if time[o, i, j] <= cap[k]

(infinite otherwise, and where `base` is infinite: the stage does not fit), and a transfer of
cut i from type t over link kind x costs lat[k] * trans[t, x, i] if that time is <= cap[k]. A
chain of more than one stage also pays lat[k] * feedback[t, INTRA] for its first stage's type t
(an LLM's tokens going back to the first stage; zero otherwise, and in `evaluate` it goes over
the network where the pipeline does, which the DP leaves out). Every chain pays
lat[k] * arrival[t] for its first stage's type t (a request's first pass on an idle device).
The recursion runs backward over i, vectorized with numpy over the batch, the stage's end j,
the run state and the tracked resources; the options are summed in blocks of tensor-parallel
degrees, each over its own reach (`_blocks`), since stages of few devices reach few layers.

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

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from kcloud.planner.space import INTRA, NET, StageSpace

MAX_TRACKED_STATES = 40
PRICE_STEPS = 12


@dataclass(frozen=True)
class Path:
    """A pipeline: stages (option, first layer, end layer) and the link kind (INTRA or NET)
    into each stage after the first."""

    stages: tuple[tuple[int, int, int], ...]
    links: tuple[int, ...]

    def usage(self, space: StageSpace) -> dict[int, int]:
        """Devices of each type the pipeline takes (by type index; PIM groups included)."""
        use = space.opt_use[[o for o, _, _ in self.stages]].sum(axis=0).tolist()
        return {ty: n for ty, n in enumerate(use) if n}


@dataclass(frozen=True)
class Limits:
    """Resource limits for one pipeline: devices per type, and devices in total."""

    per_type: tuple[tuple[int, int], ...] = ()  # (type index, devices available)
    total: int | None = None

    def violated(self, usage: dict[int, int]) -> list[tuple[str, int]]:
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
        paths = _dp(space, batch.take(todo), tracked, limits)
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
    c = 0.0
    for o, i, j in path.stages:
        c += (float(batch.base[pos[o], i, j]) + batch.lat[k] * float(space.time[o, i, j])
              + float(batch.per_option[k, pos[o]]))
    for (o, _, j), kind in zip(path.stages, path.links, strict=False):
        c += batch.lat[k] * float(space.trans[space.options[o].type, kind, j])
    first = space.options[path.stages[0][0]].type
    c += batch.lat[k] * float(space.arrival[first])
    if len(path.stages) > 1:
        c += batch.lat[k] * float(space.feedback[first, INTRA])
    return c


def _dp(space: StageSpace, batch: Batch, tracked: list[tuple[str, int]],
        limits: Limits) -> list[Path | None]:
    with np.errstate(invalid="ignore"):  # 0 x inf where a weight is zero: masked below
        return _dp_inner(space, batch, tracked, limits)


def _dp_inner(space: StageSpace, batch: Batch, tracked: list[tuple[str, int]],
              limits: Limits) -> list[Path | None]:
    L, K = space.L, batch.K
    opts = batch.options
    n_opt = len(opts)
    o_type = space.opt_type[opts]
    o_tp = space.opt_tp[opts]
    types = sorted({int(t) for t in o_type})
    n_t = len(types)
    caps = np.array([space.types[t].node_cap for t in types])
    U = int(caps.max())
    # Options on a (type, slot) grid, the slots of one tensor-parallel degree together (in
    # each type's own order of options); empty slots point at a dummy row never allowed.
    degrees = sorted({int(k) for k in o_tp})
    width = [max(int(((o_type == t) & (o_tp == k)).sum()) for t in types) for k in degrees]
    M = sum(width)
    grid = np.full((n_t, M), n_opt)
    for n, t in enumerate(types):
        for k, s0 in zip(degrees, np.cumsum([0, *width[:-1]]).tolist(), strict=True):
            x = np.flatnonzero((o_type == t) & (o_tp == k))
            grid[n, s0:s0 + len(x)] = x
    g_tp = np.append(o_tp, 1)[grid]  # (T, M)
    u_vals = np.arange(1, U + 1)
    state_ok = u_vals[None, :] <= caps[:, None]  # (T, U): states that exist

    time = np.concatenate([space.time[opts], np.full((1, L + 1, L + 1), np.inf)])
    base = np.concatenate([batch.base, np.full((1, L + 1, L + 1), np.inf)])
    per_opt = np.concatenate([batch.per_option, np.full((K, 1), np.inf)], axis=1)
    lat, cap = batch.lat, batch.cap
    g_time, g_base, g_per = time[grid], base[grid], per_opt[:, grid]  # (T,M,..), (K,T,M)

    # Tracked resources: flattened counters plus one slot (index R) for "over the limit".
    dims = [limits.cap(r) + 1 for r in tracked]
    R = int(np.prod(dims)) if dims else 1
    shift = np.tile(np.arange(R), (n_opt + 1, 1))
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
    g_shift = shift[grid]  # (T, M, R)

    # Transfer costs per problem into a stage after type t: (K, T, 2, L+1).
    tr = space.trans[types][None]
    tcost = np.where(tr <= cap[:, None, None, None], lat[:, None, None, None] * tr, np.inf)

    # Reach per option: the furthest end it may take from each start (memory, the largest cap).
    allowed = np.isfinite(base[:-1]) & (time[:-1] <= cap.max())
    reach = np.where(allowed.any(axis=2), L - np.argmax(allowed[:, :, ::-1], axis=2), -1)
    blocks = _blocks(degrees, width, np.append(reach, np.full((1, L + 1), -1), axis=0)[grid],
                     K * n_t * R, U, L)

    # Continuing a node: state (t, u) with an option of tp k moves to u + k (if it fits);
    # what cannot continue points at G's last slot, never written (inf).
    tgt = u_vals[None, :, None] + g_tp[:, None, :]  # (T, U, M)
    cont_ok = (tgt <= caps[:, None, None]) & state_ok[:, :, None] & (grid[:, None, :] < n_opt)
    tgt_idx = np.where(cont_ok, tgt - 1, U)
    ti = np.arange(n_t)[:, None, None]
    mi = np.arange(M)[None, None, :]
    # A fresh node of the previous stage's own type needs a second node of that type.
    multi = np.array([len(space.types[t].nodes) > 1 for t in types])
    may_follow = ~np.eye(n_t, dtype=bool) | np.diag(multi)  # [previous type, next type]

    inf = np.inf
    # F[k, t, u, r, i]: the least cost from layer i on, after a stage of type t that left its
    # node holding u devices (tracked counters r); the layer runs along the last axis.
    F = np.full((K, n_t, U, R + 1, L + 1), inf)
    F[:, :, :, :R, L] = np.where(state_ok, 0.0, inf)[None, :, :, None]
    arg_j = np.zeros((K, L, n_t, M, U, R), dtype=np.int32)
    # a fresh node at layer i after a stage of type t: the next type (at i = 0: the first
    # type, in [.., 0, ..]), and per type its best slot
    arg_pt = np.zeros((K, L, n_t, R), dtype=np.int32)
    arg_fm = np.zeros((K, L, n_t, R), dtype=np.int32)
    arg_cont = np.full((K, L, n_t, U, R), -1, dtype=np.int32)
    start = np.full((K, R), inf)
    rows = [np.arange(K * n_t * (b.s1 - b.s0) * (U - b.tp + 1) * R) for b in blocks]
    last = np.max([b.reach for b in blocks], axis=0)

    # G[k, t, m, u', r]: the least cost of a stage of slot (t, m) from layer i on that leaves
    # its node holding u' (inf below the slot's degree: never written)
    G = np.full((K, n_t, M, U + 1, R), inf)
    lat4, cap4 = lat[:, None, None, None], cap[:, None, None, None]
    per_blk = [g_per[:, :, b.s0:b.s1, None] for b in blocks]
    # Tracked counters: the rows of F (flattened over type, node state, counters) each block's
    # stage reads, [t, s, u', r] -> (t, u0 + u', shift of r by the slot's devices)
    F_rows = F.reshape(K, n_t * U * (R + 1), L + 1)
    t_rows = np.arange(n_t)[:, None, None, None] * U
    shifted = [((t_rows + np.arange(b.tp - 1, U)[None, None, :, None]) * (R + 1)
                + g_shift[:, b.s0:b.s1, None, :]).ravel() for b in blocks]
    ar_t, ar_m, tp_1 = np.arange(n_t)[:, None], np.arange(M)[None, :], g_tp - 1
    t_net, t_intra = tcost[:, :, NET, :, None], tcost[:, :, INTRA, :, None, None, None]

    for i in range(L - 1, -1, -1):
        if int(last[i]) <= i:
            continue
        for blk, flat, per, shift_rows in zip(blocks, rows, per_blk, shifted, strict=True):
            jhi = int(blk.reach[i])
            if jhi <= i:
                G[:, :, blk.s0:blk.s1] = inf
                continue
            # The stages of the block's options from layer i, ending at j (the last axis).
            ms, u0, sl = slice(blk.s0, blk.s1), blk.tp - 1, slice(i + 1, jhi + 1)
            tau = g_time[:, ms, i, sl]  # (T, S, J)
            C = np.where(tau <= cap4, g_base[:, ms, i, sl] + lat4 * tau + per, inf)  # (K,T,S,J)
            if i == 0:  # a request's first pass on an idle device; an LLM pipeline's
                # tokens back to its first stage (ends j < L)
                C += (lat[:, None] * space.arrival[types][None, :])[:, :, None, None]
                back = lat[:, None] * space.feedback[types, INTRA][None, :]  # (K, T)
                C[..., : L - 1] += back[:, :, None, None]
            # The stage's end j runs along the last (contiguous) axis: the argmin over it is
            # one pass over memory in order. A stage of tp k leaves its node holding u >= k.
            Fs = F[:, :, u0:, :, sl]  # (K, T, U', R+1, J)
            if dims:
                sh = np.take(F_rows[:, :, sl], shift_rows, axis=1).reshape(
                    K, n_t, blk.s1 - blk.s0, U - u0, R, jhi - i)  # (K, T, S, U', R, J)
                tot = C[:, :, :, None, None, :] + sh
            else:
                tot = C[:, :, :, None, None, :] + Fs[:, :, None, :, :1]  # (K, T, S, U', 1, J)
            a = np.argmin(tot, axis=-1)  # (K, T, S, U', R)
            v = tot.reshape(-1, tot.shape[-1])[flat, a.ravel()].reshape(a.shape)
            G[:, :, ms, u0:U] = v  # inf where the slot or the state does not exist (F is)
            np.add(a, i + 1, out=arg_j[:, i, :, ms, u0:], casting="unsafe")
        # A stage on a fresh node, leaving u' = k: any option after no stage or another
        # type; after a stage of type t only where t has another node.
        fresh = G[:, ar_t, ar_m, tp_1]  # (K, T, M, R)
        fm = np.argmin(fresh, axis=2)  # (K, T, R): best option per type
        fv = fresh.min(axis=2)  # (K, T, R)
        if i == 0:
            ft = np.argmin(fv, axis=1)  # (K, R)
            start = np.take_along_axis(fv, ft[:, None, :], axis=1)[:, 0]
            arg_pt[:, i, 0] = ft
            arg_fm[:, i] = fm
            break
        pv = np.where(may_follow[None, :, :, None], fv[:, None, :, :], inf)  # (K,Tp,T,R)
        pt = np.argmin(pv, axis=2)  # (K, Tp, R)
        fbest = pv.min(axis=2)  # (K, Tp, R)
        arg_pt[:, i] = pt
        arg_fm[:, i] = fm
        net = fbest + t_net[:, :, i]  # (K, T, R)
        cand = G[:, ti, mi, tgt_idx] + t_intra[:, :, i]  # (K, T, U, M, R)
        cm = np.argmin(cand, axis=3)  # (K, T, U, R)
        cv = cand.min(axis=3)
        use = cv < net[:, :, None, :]
        # (at states that do not exist F holds numbers no chain reads: see G)
        np.minimum(cv, net[:, :, None, :], out=F[:, :, :, :R, i])
        arg_cont[:, i] = np.where(use, cm, -1)

    return _paths(start[:, 0], arg_j, arg_pt, arg_fm, arg_cont, grid, g_tp,
                  g_shift if dims else None, opts, L)


@dataclass(frozen=True)
class _Block:
    """Grid slots [s0, s1) of tensor-parallel degrees >= tp, and how far their stages reach
    from each first layer."""

    tp: int
    s0: int
    s1: int
    reach: np.ndarray  # (L+1,)


STEP_COST = 20000  # one block's numpy calls at one layer, in element sums (measured, roughly)


def _blocks(degrees: list[int], width: list[int], reach: np.ndarray, per_state: int, U: int,
            L: int) -> list[_Block]:
    """The grid's slots, by degree, cut into blocks of consecutive degrees, each summed over its
    own reach: a stage of a small degree reaches fewer layers (memory) and leaves its node
    holding at least its degree, so blocks save work on large batches, while each block costs
    its own numpy calls per layer, so small batches take one block. `reach[t, m, i]`: each
    slot's furthest end; `per_state`: the problems x types x tracked states. The cut with the
    least modeled work wins (at most 4 degrees: 8 cuts)."""
    offs = np.cumsum([0, *width]).tolist()
    starts = np.arange(L + 1)
    n = len(degrees)
    best: tuple[float, list[_Block]] | None = None
    for mask in range(1 << (n - 1)):
        cuts = [0, *[c + 1 for c in range(n - 1) if mask >> c & 1], n]
        out, cost = [], 0.0
        for lo, hi in pairwise(cuts):
            r = reach[:, offs[lo]:offs[hi]].max(axis=(0, 1))
            span = np.maximum(r - starts, 0)
            cost += float(span.sum()) * (offs[hi] - offs[lo]) * per_state * (U - degrees[lo] + 1)
            cost += STEP_COST * int((span > 0).sum())
            out.append(_Block(degrees[lo], offs[lo], offs[hi], r))
        if best is None or cost < best[0]:
            best = (cost, out)
    assert best is not None
    return best[1]


def _paths(start: np.ndarray, arg_j: np.ndarray, arg_pt: np.ndarray, arg_fm: np.ndarray,
           arg_cont: np.ndarray, grid: np.ndarray, g_tp: np.ndarray,
           g_shift: np.ndarray | None, opts: list[int], L: int) -> list[Path | None]:
    """Every problem's chain, read back from the DP's choices (flat indices: one `item` per
    choice instead of an index tuple)."""
    _, _, T, M, U, R = arg_j.shape
    aj, pt, fm, ac = arg_j.item, arg_pt.item, arg_fm.item, arg_cont.item
    opt_of = [[opts[n] if n < len(opts) else -1 for n in row] for row in grid.tolist()]
    tps = g_tp.tolist()
    shift = g_shift.tolist() if g_shift is not None else None
    out: list[Path | None] = []
    for k, ok in enumerate(np.isfinite(start).tolist()):
        if not ok:
            out.append(None)
            continue
        stages: list[tuple[int, int, int]] = []
        links: list[int] = []
        i, r = 0, 0
        t = pt(k * L * T * R)
        m = fm((k * L * T + t) * R)
        u = tps[t][m]
        while True:
            j = aj(((((k * L + i) * T + t) * M + m) * U + u - 1) * R + r)
            stages.append((opt_of[t][m], i, j))
            if shift is not None:
                r = shift[t][m][r]
            if j == L:
                break
            i = j
            c = ac((((k * L + i) * T + t) * U + u - 1) * R + r)
            if c >= 0:
                m, u = c, u + tps[t][c]
                links.append(INTRA)
            else:
                t = pt(((k * L + i) * T + t) * R + r)
                m = fm(((k * L + i) * T + t) * R + r)
                u = tps[t][m]
                links.append(NET)
        out.append(Path(tuple(stages), tuple(links)))
    return out


def make_batch(space: StageSpace, options: Sequence[int], base: np.ndarray,
               lat: np.ndarray | float, per_option: np.ndarray | None,
               cap: np.ndarray | float) -> Batch:
    """A Batch with scalars broadcast to the batch size."""
    lat_a = np.atleast_1d(np.asarray(lat, dtype=float))
    cap_a = np.atleast_1d(np.asarray(cap, dtype=float))
    K = max(len(lat_a), len(cap_a), 1 if per_option is None else per_option.shape[0])
    lat_a = np.broadcast_to(lat_a, (K,)).copy()
    cap_a = np.broadcast_to(cap_a, (K,)).copy()
    po = (np.zeros((K, len(options))) if per_option is None
          else np.broadcast_to(per_option, (K, len(options))).copy())
    return Batch(list(options), base, lat_a, po, cap_a)
