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
    StepPlan,
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


def _state(s: Scheduler) -> list[tuple[int, int, int, int, int]]:
    return [(q.rid, q.computed, q.length, q.gen, q.blocks) for q in s.running]


def test_steady_decode_run_equals_its_steps():
    """The simulator's run of k decode steps leaves the state that k single steps leave."""
    def fresh():
        s = Scheduler(BlockCounter(64, 4), max_batch=8, token_budget=64, max_len=4096)
        for i, (p, o) in enumerate([(5, 30), (9, 12), (3, 40)]):
            s.add(CountedSeq(i, 0, 0.0, p, o))
        s.update(s.schedule())
        return s

    a, b = fresh(), fresh()
    run = a.steady_run()
    assert run is not None and run.chunk == 0
    assert run.steps == 11  # the second one ends after 11 more tokens
    done_a = a.advance_run(run, 1.0, 2.0)
    done_b = []
    for j in range(run.steps):
        plan = b.schedule()
        assert plan.shape() == run.shape(j)
        done_b += b.update(plan)
    assert [s.rid for s in done_a] == [s.rid for s in done_b] == [1]
    assert _state(a) == _state(b)
    assert a.blocks.n_free == b.blocks.n_free


def test_a_long_prompt_runs_its_chunks_beside_the_decodes():
    """A prompt of 100 tokens beside 2 decodes, budget 16: one run of its 7 chunks of 14, its
    last 2 tokens (which sample its first token), and its 4 decode steps to its end, whose
    step shapes are the steps'."""
    def fresh():
        s = Scheduler(BlockCounter(200, 4), max_batch=8, token_budget=16, max_len=4096)
        for i, (p, o) in enumerate([(5, 30), (9, 40)]):
            s.add(CountedSeq(i, 0, 0.0, p, o))
        s.update(s.schedule())
        s.add(CountedSeq(2, 0, 0.0, 100, 5))
        return s

    a, b = fresh(), fresh()
    late = a.waiting[0]
    run = a.steady_run()
    assert run is not None and run.admitted
    assert (run.steps, run.batch, run.chunk, run.full, run.tail, run.after) == \
        (12, 2, 14, 7, 2, 4)
    assert [q.rid for q in a.running] == [0, 1, 2] and not a.waiting
    assert [q.rid for q in a.advance_run(run, 1.0, 2.0)] == [2]
    done = []
    for j in range(run.steps):
        plan = b.schedule()
        assert plan.shape() == run.shape(j)
        done += b.update(plan)
    assert [q.rid for q in done] == [2]
    assert _state(a) == _state(b)
    assert late.first_token == 2.0 and late.gen == 5
    assert a.running[0].first_token == -1.0  # it sampled before the run


def test_no_last_chunk_in_a_run_when_a_waiting_request_could_take_its_budget():
    s = Scheduler(BlockCounter(200, 4), max_batch=8, token_budget=16, max_len=4096)
    s.add(CountedSeq(0, 0, 0.0, 5, 30))
    s.update(s.schedule())
    s.add(CountedSeq(1, 0, 0.0, 40, 5))  # 15 a step: 2 full chunks, then 10 leave 5
    s.add(CountedSeq(2, 0, 0.0, 3, 5))
    run = s.steady_run()
    assert run is not None and (run.full, run.tail, run.steps) == (2, 0, 2)


@pytest.mark.parametrize("seed", range(10))
def test_runs_equal_stepping_one_by_one(seed):
    """Random requests arriving mid-run, tight or loose KV blocks, small budgets: advancing
    by runs (cut when an arrival could join, as the simulator cuts them) gives, step for
    step, the shapes of single steps, and the same state after each run (tokens, blocks,
    queue), the same steps where each request ends and samples its first token."""
    rng = random.Random(seed)
    budget = rng.choice([6, 16, 40])
    n_blocks = rng.choice([12, 30, 500])
    max_batch = rng.choice([3, 8])

    def fresh() -> Scheduler:
        return Scheduler(BlockCounter(n_blocks, 4), max_batch=max_batch, token_budget=budget,
                         max_len=4096)

    a, b = fresh(), fresh()
    reqs = [(rng.randint(1, 90), rng.randint(1, 30)) for _ in range(30)]
    reqs = [r for r in reqs if a.fits(*r) is None]
    arrive = sorted(rng.randrange(0, 300) for _ in reqs)  # the step each is added before
    seqs = {k: [CountedSeq(i, 0, 0.0, *r) for i, r in enumerate(reqs)] for k in "ab"}
    nxt = {"a": 0, "b": 0}

    def add_due(s: Scheduler, key: str, step: int) -> None:
        while nxt[key] < len(reqs) and arrive[nxt[key]] <= step:
            s.add(seqs[key][nxt[key]])
            nxt[key] += 1

    def one_step(s: Scheduler, step: int, done: dict[int, int]) -> StepPlan:
        plan = s.schedule()
        for r in plan.rows:
            if r.sample and r.seq.first_token < 0:
                r.seq.first_token = float(step)
        for q in s.update(plan):
            done[q.rid] = step
        return plan

    step = runs = 0
    done_a: dict[int, int] = {}
    done_b: dict[int, int] = {}
    while len(done_b) < len(reqs):
        add_due(a, "a", step)
        run = a.steady_run()
        if run is None:
            add_due(b, "b", step)
            pa, pb = one_step(a, step, done_a), one_step(b, step, done_b)
            assert pa.shape() == pb.shape() and _signature(pa) == _signature(pb)
            step += 1
            continue
        runs += 1
        # one arriving while step `d` of the run is computed is added before step d + 1
        while nxt["a"] < len(reqs) and arrive[nxt["a"]] < step + run.steps:
            d = arrive[nxt["a"]] - step - 1
            add_due(a, "a", arrive[nxt["a"]])
            run = a.cut_run(run, d) or run
        for q in a.advance_run(run, float(step), float(step + run.full)):
            done_a[q.rid] = step + run.steps - 1
        for j in range(run.steps):
            add_due(b, "b", step)
            pb = one_step(b, step, done_b)
            assert pb.shape() == run.shape(j) and not pb.preempted
            step += 1
        assert _state(a) == _state(b)
        add_due(a, "a", step)  # both with what arrived before the next step
        add_due(b, "b", step)
        assert [q.rid for q in a.waiting] == [q.rid for q in b.waiting]
        assert a.blocks.n_free == b.blocks.n_free
        assert step < 20000
    assert done_a == done_b
    assert [q.first_token for q in seqs["a"]] == [q.first_token for q in seqs["b"]]
    assert runs > 0


def test_no_steady_run_while_a_step_would_admit_more_than_one():
    s = Scheduler(BlockCounter(64, 4), max_batch=8, token_budget=64, max_len=4096)
    s.add(CountedSeq(0, 0, 0.0, 5, 30))
    s.update(s.schedule())
    run = s.steady_run()
    assert run is not None and run.steps == 29 and run.chunk == 0
    s.add(CountedSeq(1, 0, 0.0, 5, 30))
    s.add(CountedSeq(2, 0, 0.0, 5, 30))  # the budget 1's prompt leaves admits it too
    assert s.steady_run() is None
    assert len(s.waiting) == 2  # nothing admitted


def test_a_short_prompt_admitted_then_decoding_is_one_run():
    s = Scheduler(BlockCounter(64, 4), max_batch=8, token_budget=64, max_len=4096)
    s.add(CountedSeq(0, 0, 0.0, 5, 30))
    s.update(s.schedule())
    s.add(CountedSeq(1, 0, 0.0, 5, 10))
    run = s.steady_run()
    assert run is not None and run.admitted
    assert (run.full, run.tail, run.after, run.steps) == (0, 5, 9, 10)  # to its end
    assert run.shape(0) == (1, 6.0, 5, 25.0) and run.shape(1) == (2, 7.0 + 6.0, 0, 0.0)


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
