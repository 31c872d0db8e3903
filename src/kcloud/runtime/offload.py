"""Decode attention offloaded to a PIM group, executed: the stage's workers run the dense ops
(projections, MLP, norms) and send each attention call's queries and new keys and values to
the PIM group's own worker over torch.distributed; that worker keeps the KV caches (one per
sequence batch and layer, for each rank of the stage) and sends the attention output back.

The attention itself is `attend_cached`, the same function the stage would run locally, so a
plan's outputs do not depend on where its attention ran. In emulated mode the PIM worker
computes on the host; its time is the cost model's (`kcloud.hardware.steps`).

Messages (one `comm` tuple each, both ways in order): (meta, q, k, v) with meta an int64
tensor [kind, layer, cache, past, causal]; kind ATTEND is answered with (y,), BARRIER (the
stage's workers are at a barrier between run phases: the PIM worker joins it once every rank
it serves is there) and STOP (the schedule is over) with nothing.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from kcloud.graph.models.transformer import Attention, KVCache, attend_cached
from kcloud.runtime.comm import TupleReceiver, TupleSender

ATTEND, BARRIER, STOP = 0, 1, 2
_EMPTY = torch.zeros(0)


class RemoteAttention:
    """The stage side: every attention module of the stage sends through one channel pair to
    the PIM worker at rank `peer` (`install`)."""

    def __init__(self, peer: int) -> None:
        self.peer = peer
        self.out = TupleSender(peer)
        self.back = TupleReceiver(peer)
        self.index: dict[int, int] = {}  # id(module) -> its layer number in the stage
        self.calls = 0

    def __call__(self, module: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 past: int) -> torch.Tensor:
        assert module.kv is not None
        meta = torch.tensor([ATTEND, self.index[id(module)], id(module.kv), past,
                             int(module.causal)], dtype=torch.int64)
        self.out.send((meta, q, k, v))
        self.calls += 1
        (y,) = self.back.recv()
        return y.to(q.device)

    def _signal(self, kind: int) -> None:
        self.out.send((torch.tensor([kind, 0, 0, 0, 0], dtype=torch.int64), _EMPTY, _EMPTY,
                       _EMPTY))

    def barrier(self) -> None:
        self._signal(BARRIER)

    def stop(self) -> None:
        self._signal(STOP)
        self.out.wait()


def install(stage: torch.nn.Module, peer: int) -> RemoteAttention:
    """Send the attention of every `Attention` module of `stage` to rank `peer`."""
    remote = RemoteAttention(peer)
    for n, m in enumerate(x for x in stage.modules() if isinstance(x, Attention)):
        remote.index[id(m)] = n
        m.remote = remote
    return remote


def serve(ranks: tuple[int, ...], where: Any = None) -> int:
    """The PIM worker's loop: attention for the stage workers at `ranks` (a tensor-parallel
    group's ranks in turn: each sends its calls in the same order, its own heads), until every
    one says STOP. Returns how many attention calls it answered."""
    ins = {r: TupleReceiver(r) for r in ranks}
    outs = {r: TupleSender(r) for r in ranks}
    caches: dict[tuple[int, int, int], KVCache] = {}
    live = set(ranks)
    at_barrier: set[int] = set()
    calls = 0
    with torch.inference_mode():
        while live:
            for r in ranks:
                if r not in live or r in at_barrier:
                    continue
                if where is not None:
                    where.step = f"receive of an attention call from rank {r}"
                meta, q, k, v = ins[r].recv()
                kind, layer, cache, past, causal = (int(x) for x in meta)
                if kind == STOP:
                    live.discard(r)
                    continue
                if kind == BARRIER:
                    at_barrier.add(r)
                    if at_barrier == live:
                        if where is not None:
                            where.step = "barrier between run phases"
                        dist.barrier()
                        at_barrier.clear()
                        caches.clear()  # the next phase starts with new sequences
                    continue
                key = (r, layer, cache)
                if past == 0 or key not in caches:  # a new sequence batch
                    caches[key] = KVCache()
                y = attend_cached(caches[key], q, k, v, past, bool(causal))
                outs[r].send((y,))
                calls += 1
    for s in outs.values():
        s.wait()
    return calls
