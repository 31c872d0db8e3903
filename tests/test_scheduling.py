"""The one scheduling policy (`kcloud.planner.scheduling`) that the engine and the simulator run:
the engine's token sequences and the simulator's counted ones get the same steps."""

from __future__ import annotations

import random

import pytest

from kcloud.errors import KCloudError
from kcloud.planner.scheduling import (
    Batcher,
    BlockCounter,
    BlockManager,
    CountedSeq,
    Item,
    Scheduler,
    SchedulerConfig,
)
from kcloud.runtime.scheduler import SamplingParams, Sequence


def _pair(n_blocks: int, *, max_batch: int = 8, budget: int = 32, max_len: int = 4096):
    return (Scheduler(BlockManager(n_blocks, 4), max_batch=max_batch, token_budget=budget,
                      max_len=max_len),
            Scheduler(BlockCounter(n_blocks, 4), max_batch=max_batch, token_budget=budget,
                      max_len=max_len))


def _requests(n: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randint(1, 40), rng.randint(1, 20)) for _ in range(n)]


def _signature(plan) -> list[tuple[int, int, int, bool]]:
    return [(getattr(r.seq, "id", None) or r.seq.rid, r.start, r.n, r.sample)
            for r in plan.rows]


@pytest.mark.parametrize("n_blocks", [6, 12, 400])
def test_engine_and_simulator_sequences_get_the_same_steps(n_blocks):
    """Under chunked prefill, tight KV blocks (preemption) and arrivals mid-run, the engine's
    sequences (token ids, block ids) and the simulator's counted ones are scheduled alike, step
    by step, and every request ends with all its tokens."""
    eng, sim = _pair(n_blocks)
    reqs = [r for r in _requests(40, seed=n_blocks) if eng.fits(*r) is None][:30]
    assert len(reqs) >= 10
    seqs = {}
    done_e: list[int] = []
    done_s: list[int] = []
    steps = 0
    preempted = 0
    while len(done_e) < len(reqs):
        if steps < len(reqs):  # one arrival a step
            prompt, out = reqs[steps]
            i = steps + 1
            e = Sequence(i, [7] * prompt, SamplingParams(max_tokens=out, ignore_eos=True))
            seqs[i] = e
            eng.add(e)
            sim.add(CountedSeq(i, 0, 0.0, prompt, out))
        pe, ps = eng.schedule(), sim.schedule()
        assert _signature(pe) == _signature(ps)
        assert pe.shape() == ps.shape()
        assert eng.blocks.used == sim.blocks.used
        preempted += len(pe.preempted)
        done_e += [s.id for s in eng.update(pe, {r.seq.id: 9 for r in pe.rows if r.sample})]
        done_s += [s.rid for s in sim.update(ps)]
        steps += 1
        assert steps < 5000
    assert sorted(done_e) == sorted(done_s) == list(range(1, len(reqs) + 1))
    assert all(len(seqs[i].output) == out for i, (_, out) in enumerate(reqs, start=1))
    assert eng.blocks.used == sim.blocks.used == 0
    if n_blocks == 6:
        assert preempted > 0


def test_a_long_prompt_is_chunked_and_the_decodes_keep_running():
    s = Scheduler(BlockCounter(100, 16), max_batch=8, token_budget=16, max_len=4096)
    a = CountedSeq(1, 0, 0.0, 4, 10)
    s.add(a)
    s.update(s.schedule())  # a's prompt: it samples its first token
    b = CountedSeq(2, 0, 0.0, 40, 5)
    s.add(b)
    plan = s.schedule()
    assert [(r.seq.rid, r.n, r.sample) for r in plan.rows] == [(1, 1, True), (2, 15, False)]
    assert plan.shape() == (1, 5.0, 15, 15.0 * 15)


def test_steady_decode_run_equals_its_steps():
    """The simulator's run of k decode steps leaves the state that k single steps leave."""
    def fresh():
        s = Scheduler(BlockCounter(64, 4), max_batch=8, token_budget=64, max_len=4096)
        for i, (p, o) in enumerate([(5, 30), (9, 12), (3, 40)]):
            s.add(CountedSeq(i, 0, 0.0, p, o))
        s.update(s.schedule())
        return s

    a, b = fresh(), fresh()
    k = a.steady_decode_steps()
    assert 2 <= k <= 11  # the second one ends after 11 more tokens
    done_a = a.advance_decode(k)
    done_b = []
    for _ in range(k):
        done_b += b.update(b.schedule())
    assert [s.rid for s in done_a] == [s.rid for s in done_b]
    assert [(s.computed, s.length, s.blocks) for s in a.running] == \
        [(s.computed, s.length, s.blocks) for s in b.running]
    assert a.blocks.n_free == b.blocks.n_free


def test_no_steady_run_while_an_admissible_request_waits():
    s = Scheduler(BlockCounter(64, 4), max_batch=8, token_budget=64, max_len=4096)
    s.add(CountedSeq(0, 0, 0.0, 5, 30))
    s.update(s.schedule())
    assert s.steady_decode_steps() > 1
    s.add(CountedSeq(1, 0, 0.0, 5, 30))
    assert s.steady_decode_steps() == 0


def test_fits_and_bad_limits():
    s = SchedulerConfig(token_budget=8, max_batch=2, block_size=4, num_blocks=3,
                        max_len=20).scheduler()
    assert s.fits(6, 6) is None
    assert "KV blocks" in (s.fits(10, 6) or "")
    assert "context" in (s.fits(15, 6) or "")
    with pytest.raises(KCloudError):
        SchedulerConfig(max_batch=0)


def test_batcher_waits_for_a_full_batch_or_its_oldest_request():
    b = Batcher(max_batch=4, max_wait_s=0.5)
    b.add(Item(1, None, 1, 0.0))
    b.add(Item(2, None, 2, 0.1))
    assert b.take(0.2) == [] and b.due(0.2) == 0.5
    assert [i.id for i in b.take(0.5)] == [1, 2] and b.load == 0
    b.add(Item(3, None, 3, 1.0))
    b.add(Item(4, None, 2, 1.0))
    assert [i.id for i in b.take(1.0)] == [3]  # full: 3 + 2 samples exceed the batch
    assert b.load == 2
