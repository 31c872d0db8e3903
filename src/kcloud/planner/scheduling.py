"""The scheduling policy a replica of a plan runs, torch-free: iteration-level (continuous)
batching of LLM sequences over fixed-size KV blocks, and dynamic batching of other models'
requests. The engine (`kcloud.runtime.engine`) and the fleet simulator (`kcloud.sim.fleet`)
both run this one module, so that a simulated replica schedules as a served one does.

Every step the `Scheduler` picks what each running sequence computes next (as Orca and vLLM
schedule): the running sequences first, oldest first, each its next chunk of uncomputed tokens
(one token for a decode), within a token budget per step, so that a long prompt is prefilled
in chunks and does not stall the running decodes; then waiting sequences are admitted, first
come first served, while the budget, the batch limit and the free KV blocks allow. A sequence
whose next tokens find no free block preempts the newest running sequence not yet given work
(which loses its blocks and is recomputed later: its prompt and the tokens it already
generated are prefilled again), never failing the step. A sequence samples a token when a step
computes its last known token; the sampled token is the next one to compute.

A sequence is anything with the fields the policy reads (`computed`, `length`, `blocks`, `cap`,
`preemptions`, `remaining`, `stop_at`, `finished`) and an `accept(token, max_len)` that takes a
sampled token and says whether the sequence ended: the engine's `Sequence` (token ids, block
ids for its KV slots, sampling parameters, in `kcloud.runtime.scheduler`) and the simulator's
`CountedSeq` (token counts alone, `BlockCounter`'s block counts). The simulator also advances a
run of steps with the same rows in one go (`steady_run`, `cut_run`, `advance_run`: decode
steps, and a prompt's full chunks beside them): the same steps, fewer events.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import deque
from dataclasses import dataclass
from typing import Any, NamedTuple

from kcloud.errors import KCloudError

# Decode rows are attended in groups of similar contexts, each padded to its longest
# (`decode_groups`): a row joins the group of the longer ones while it is within this factor of
# the group's longest, or this many tokens of it.
DECODE_SPREAD = 1.5
DECODE_PAD_TOKENS = 64


def decode_groups(contexts: list[int]) -> list[list[int]]:
    """The decode rows of a step (their contexts, in tokens) in the groups they are attended
    in: indices, longest context first. Padding every row to the step's longest context would
    make a step's KV reads the batch times its longest context (a long conversation beside
    short ones triples them on the Azure trace); grouping bounds each row's padding at
    `DECODE_SPREAD` (or `DECODE_PAD_TOKENS`) at the price of one more attention call a group.
    The engine's workers attend in these groups and its step costs are priced on them."""
    order = sorted(range(len(contexts)), key=contexts.__getitem__, reverse=True)
    groups: list[list[int]] = []
    top = 0
    for i in order:
        c = contexts[i]
        if groups and top - c <= max(DECODE_PAD_TOKENS, (DECODE_SPREAD - 1.0) * c):
            groups[-1].append(i)
        else:
            groups.append([i])
            top = c
    return groups


class BlockManager:
    """Fixed-size KV blocks of one replica: a free list, and each sequence's block table
    (`seq.blocks`, a list of block ids: the engine's KV slots)."""

    def __init__(self, n_blocks: int, block_size: int) -> None:
        if n_blocks < 1 or block_size < 1:
            raise KCloudError(f"a KV cache of {n_blocks} blocks of {block_size} tokens is empty",
                              "give at least one block of at least one token")
        self.n_blocks = n_blocks
        self.block_size = block_size
        self.free: deque[int] = self._free_list()

    def _free_list(self) -> deque[int]:
        return deque(range(self.n_blocks))

    @property
    def n_free(self) -> int:
        return len(self.free)

    @property
    def used(self) -> int:
        return self.n_blocks - len(self.free)

    def held(self, seq: Any) -> int:
        return len(seq.blocks)

    def needed(self, seq: Any, n_new: int) -> int:
        """Blocks `seq` must add to hold `n_new` more tokens."""
        return max(0, -(-(seq.computed + n_new) // self.block_size) - self.held(seq))

    def can_hold(self, seq: Any, n_new: int) -> bool:
        return self.needed(seq, n_new) <= self.n_free

    def grow(self, seq: Any, n_new: int) -> None:
        for _ in range(self.needed(seq, n_new)):
            seq.blocks.append(self.free.popleft())
        seq.cap = len(seq.blocks) * self.block_size

    def release(self, seq: Any) -> None:
        self.free.extend(seq.blocks)
        seq.blocks = []
        seq.cap = 0

    def slot(self, seq: Any, position: int) -> int:
        """The flat slot (block * size + offset) of the token at `position`."""
        return seq.blocks[position // self.block_size] * self.block_size + \
            position % self.block_size


class BlockCounter(BlockManager):
    """The same blocks counted, not named (`seq.blocks` is a count): what the simulator keeps,
    where no KV slot is ever written."""

    def _free_list(self) -> deque[int]:
        self.n_free_blocks = self.n_blocks
        return deque()  # no names

    @property
    def n_free(self) -> int:
        return self.n_free_blocks

    @property
    def used(self) -> int:
        return self.n_blocks - self.n_free_blocks

    def held(self, seq: Any) -> int:
        return int(seq.blocks)

    def grow(self, seq: Any, n_new: int) -> None:
        need = self.needed(seq, n_new)
        self.n_free_blocks -= need
        seq.blocks += need
        seq.cap = seq.blocks * self.block_size

    def release(self, seq: Any) -> None:
        self.n_free_blocks += seq.blocks
        seq.blocks = 0
        seq.cap = 0


class CountedSeq:
    """A sequence known by its token counts alone (the simulator's requests): `prompt0` prompt
    tokens, `out` tokens to generate (it never stops early)."""

    __slots__ = ("arrival", "blocks", "cap", "computed", "first_token", "gen", "length", "out",
                 "preemptions", "prompt0", "rid", "service", "started", "stop_at")
    finished = False  # it ends when its last token is computed, never aborted
    size = 1  # one sample, where a dynamic batcher takes it (a non-LLM request)

    def __init__(self, rid: int, service: int, arrival: float, prompt: int, out: int) -> None:
        self.rid, self.service, self.arrival = rid, service, arrival
        self.prompt0 = prompt
        self.out = max(1, out)
        self.length = prompt  # known tokens: the prompt and what it generated
        self.stop_at = prompt + self.out  # its length when it ends
        self.computed = 0  # tokens whose keys and values are in the cache
        self.gen = 0
        self.blocks = 0
        self.cap = 0  # tokens its blocks hold
        self.preemptions = 0
        self.first_token = -1.0
        self.started = -1.0  # first admission (queueing delay ends)

    @property
    def remaining(self) -> int:
        return self.stop_at - self.length

    def accept(self, token: Any, max_len: int) -> bool:
        self.gen += 1
        self.length += 1
        return self.gen >= self.out or self.length >= max_len


class Scheduled(NamedTuple):
    """A sequence's work in one step: tokens [start, start + n) of it; `sample`: the step
    computes its last known token, so it samples the next."""

    seq: Any
    start: int
    n: int
    sample: bool

    @property
    def decode(self) -> bool:
        """One new token over a cache that holds the rest: a decode step's row."""
        return self.n == 1 and self.start > 0


@dataclass
class StepPlan:
    rows: list[Scheduled]
    preempted: list[Any]
    # what the step's cost depends on (`kcloud.hardware.steps.step_cost`): decode rows, the
    # KV tokens they attend over (their new token included), prompt-chunk tokens, and the
    # chunks' (query, key) pairs (new tokens x the context they reach,
    # `kcloud.hardware.steps.prefill_pairs`); a decode row is one new token over a cache that
    # holds the rest (`Scheduled.decode`)
    batch: int = 0
    kv_tokens: float = 0.0
    prefill_tokens: int = 0
    prefill_pairs: float = 0.0

    @property
    def tokens(self) -> int:
        return sum(r.n for r in self.rows)

    def shape(self) -> tuple[int, float, int, float]:
        return self.batch, self.kv_tokens, self.prefill_tokens, self.prefill_pairs

    def decode_padding(self) -> tuple[int, int]:
        """The decode rows' attention groups (`decode_groups`) and the KV tokens they read
        padded: what the engine's CPU workers gather."""
        ctx = [r.start + 1 for r in self.rows if r.n == 1 and r.start > 0]
        groups = decode_groups(ctx)
        return len(groups), sum(len(g) * ctx[g[0]] for g in groups)


class Scheduler:
    """Continuous batching over one replica's KV blocks (see the module's docstring)."""

    def __init__(self, blocks: BlockManager, *, max_batch: int, token_budget: int,
                 max_len: int) -> None:
        if max_batch < 1 or token_budget < 1:
            raise KCloudError("the batch limit and the token budget must be at least 1",
                              "pass --max-batch 1 or more")
        self.blocks = blocks
        self.max_batch = max_batch
        self.token_budget = token_budget
        self.max_len = max_len
        self.waiting: deque[Any] = deque()
        self.running: list[Any] = []  # in admission order: the newest last
        self.preemptions = 0

    def fits(self, prompt_len: int, max_tokens: int) -> str | None:
        """Why a request can never run on this replica (None when it can)."""
        total = prompt_len + max_tokens
        if total > self.max_len:
            return (f"the prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) is "
                    f"{total} tokens, past the model's context of {self.max_len}")
        need = -(-total // self.blocks.block_size)
        if need > self.blocks.n_blocks:
            return (f"the prompt plus max_tokens needs {need} KV blocks, but the replica "
                    f"holds {self.blocks.n_blocks}")
        return None

    def add(self, seq: Any) -> None:
        self.waiting.append(seq)

    @property
    def outstanding(self) -> int:
        return len(self.waiting) + len(self.running)

    @property
    def load(self) -> int:
        """Outstanding tokens: what routing balances."""
        return sum(s.length - s.computed + s.remaining for s in (*self.running, *self.waiting))

    @property
    def busy(self) -> bool:
        return bool(self.running or self.waiting)

    def remove(self, seq: Any) -> None:
        """Take a sequence out (finished, aborted or failed) and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq)

    def _preempt(self, seq: Any) -> None:
        running = self.running
        if running and running[-1] is seq:
            running.pop()
        else:
            running.remove(seq)
        self.blocks.release(seq)
        seq.computed = 0
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def admissible(self, budget: int) -> bool:
        """Whether the waiting queue's head would be admitted with `budget` tokens left."""
        if not self.waiting or budget <= 0 or len(self.running) >= self.max_batch:
            return False
        seq = self.waiting[0]
        return self.blocks.can_hold(seq, min(seq.length - seq.computed, budget))

    def schedule(self) -> StepPlan:
        blocks = self.blocks
        running = self.running
        budget = self.token_budget
        rows: list[Scheduled] = []
        preempted: list[Any] = []
        batch = prefill = 0
        kv = pairs = 0.0
        i = 0
        # every sequence before `i` has been given work: the newest one not yet given work,
        # the preemption victim, is the last one running; past the running ones, waiting ones
        # are admitted (none once a sequence was preempted this step)
        while budget > 0:
            if i == len(running):
                if preempted or not self.admissible(budget):
                    break
                running.append(self.waiting.popleft())
            seq = running[i]
            start = seq.computed
            n = seq.length - start
            if n > budget:
                n = budget
            if start + n > seq.cap:  # it needs more blocks
                if blocks.needed(seq, n) > blocks.n_free:
                    while blocks.needed(seq, n) > blocks.n_free:
                        victim = running[-1]
                        self._preempt(victim)
                        preempted.append(victim)
                        if victim is seq:
                            break
                    if preempted and preempted[-1] is seq:
                        break  # it was the newest: nothing after it to schedule
                blocks.grow(seq, n)
            rows.append(Scheduled(seq, start, n, start + n == seq.length))
            if n == 1 and start > 0:
                batch += 1
                kv += start + 1
            else:
                prefill += n
                pairs += float(n) * (start + n)
            budget -= n
            i += 1
        return StepPlan(rows, preempted, batch, kv, prefill, pairs)

    def update(self, plan: StepPlan, sampled: dict[int, Any] | None = None) -> list[Any]:
        """Apply a step's results (`sampled`: the token each sampling row drew, by sequence
        id; None where tokens are only counted); the sequences that finished, already
        removed."""
        done: list[Any] = []
        max_len = self.max_len
        for seq, start, n, sample in plan.rows:
            if seq.finished:
                continue  # aborted while its step ran
            seq.computed = start + n
            if sample and seq.accept(None if sampled is None else sampled[seq.id], max_len):
                self.remove(seq)
                done.append(seq)
        return done

    # -- a run of steps with the same rows (the simulator's fast path) ---------------------------
    def steady_run(self) -> Run | None:
        """The steps that can run with no scheduling decision changing (at least 2; None when
        there are fewer): every running sequence decodes, and, when the newest one has prompt
        tokens left (or the waiting queue's head would be admitted and its prompt computed
        while the others decode), it takes the rest of the budget each step: full chunks, then
        its last chunk, which samples its first token, when no waiting sequence could be
        admitted with the budget that chunk leaves; then it decodes beside the others, while no
        waiting sequence could be admitted. A run ends at the step where a sequence ends, or
        before a step whose blocks the free ones would not cover (no preemption within a
        run). A run that begins with an admission has made it: the head is running (its
        blocks, as every run's, are taken by `advance_run`)."""
        running = self.running
        budget = self.token_budget
        waiting = self.waiting
        max_len = self.max_len
        n = len(running)
        pre = None
        admitted = False
        if n and running[-1].length - running[-1].computed != 1:
            pre = running[-1]
            b = n - 1
        else:
            b = n
            if waiting and self.admissible(budget - b):
                pre = waiting[0]
                admitted = True
            elif not n:
                return None
        c = budget - b
        if c < (2 if pre is not None else 0):
            return None  # a chunk of one token would be a decode-shaped row
        least = max_len
        kv0 = longest = 0
        for s in running if b == n else running[:b]:
            length = s.length
            if length - s.computed != 1:
                return None
            kv0 += length
            if s.stop_at - length < least:  # steps until it has all its tokens
                least = s.stop_at - length
            if length > longest:
                longest = length
        if max_len - longest < least:
            least = max_len - longest
        if pre is None:
            full = steps = least
            tail = 0
        else:
            rem = pre.length - pre.computed
            full = (rem - 1) // c  # chunks that leave prompt tokens
            tail = rem - full * c
            if tail < 2:
                tail = 0  # the last token alone would be a decode-shaped row: a step of its own
            after = 0  # decode steps after the last chunk
            if admitted:
                running.append(waiting.popleft())  # so that the checks below see it running
            if tail and tail < c and self.admissible(c - tail):
                tail = 0  # a waiting one would take the budget its last chunk leaves
            elif tail and not (b + 1 > budget or self.admissible(budget - b - 1)):
                length = pre.length + 1  # once its last chunk sampled a token
                after = max(0, min(pre.stop_at - length, max_len - length))
            if admitted:
                waiting.appendleft(running.pop())
            if full >= least:
                full, tail, after = least, 0, 0  # a decode ends first
            elif tail:
                after = min(after, least - full - 1)
            steps = full + (1 if tail else 0) + after
        if steps < 2:
            return None
        if pre is None:
            run = Run(steps, b, kv0, 0, 0, steps)
        else:
            run = Run(steps, b, kv0, c, pre.computed, full, tail, admitted)
        steps = self._blocks_bound(run, pre)
        if steps < 2:
            return None
        if admitted:
            running.append(waiting.popleft())
        return run if steps == run.steps else run.first(steps)

    def _blocks_bound(self, run: Run, pre: Any) -> int:
        """The most of `run`'s steps whose new blocks the free ones cover (`pre`: its chunked
        sequence, None in a decode-only run)."""
        bs = self.blocks.block_size
        free = self.blocks.n_free
        b = run.batch
        if run.tokens(run.steps) // bs + b + 1 <= free:  # at most a block more a sequence
            return run.steps

        def need(k: int) -> int:
            total = 0
            for i in range(b):
                s = self.running[i]
                over = s.computed + k - s.cap
                if over > 0:
                    total += -(-over // bs)
            if pre is not None:
                over = pre.computed + run.chunked(k) - pre.cap
                if over > 0:
                    total += -(-over // bs)
            return total

        if need(run.steps) <= free:
            return run.steps
        return bisect_right(range(run.steps + 1), free, key=need) - 1  # need grows with k

    def cut_run(self, run: Run, done: int) -> Run | None:
        """The first steps of `run` to keep when a sequence arrives while step `done` (from 0)
        of it is computed: the run ends before its first later step whose budget would admit
        the waiting queue's head. None: it runs whole."""
        if run.chunk == 0:
            at = done + 1
            spare = self.token_budget - run.batch
        else:
            if not run.tail:
                return None  # its chunks leave no budget
            if run.full > done and run.tail < run.chunk and \
                    self.admissible(run.chunk - run.tail):
                return run.first(run.full)  # before its last chunk
            at = max(done + 1, run.full + 1)  # a step that it decodes in
            spare = self.token_budget - run.batch - 1
        if at >= run.steps or not self.admissible(spare):
            return None
        return run.first(at)

    def advance_run(self, run: Run, first_s: float, tail_s: float) -> list[Any]:
        """Apply `run`'s steps to its sequences of counted tokens (blocks as they grow); those
        that ended, removed. A sequence that samples its first token in the run records when
        (`CountedSeq.first_token`): `first_s`, where the run's first step ends (a decode row
        that a prompt's last chunk left one token), or `tail_s`, where its last chunk's
        does."""
        blocks = self.blocks
        bs = blocks.block_size
        max_len = self.max_len
        k = run.steps
        done: list[Any] = []
        running = self.running
        b = run.batch
        for s in running if b == len(running) else running[:b]:
            if not s.gen:
                s.first_token = first_s
            s.computed += k
            s.gen += k
            s.length += k
            if s.computed > s.cap:
                held = -(-s.computed // bs)
                blocks.n_free_blocks -= held - s.blocks  # type: ignore[attr-defined]
                s.blocks = held
                s.cap = held * bs
            if s.gen >= s.out or s.length >= max_len:
                done.append(s)
        if run.chunk:
            s = running[b]
            s.computed += run.full * run.chunk + run.tail
            if run.tail:
                if not s.gen:
                    s.first_token = tail_s
                ended = s.accept(None, max_len)
                after = k - run.full - 1
                if after:
                    s.computed += after
                    s.gen += after
                    s.length += after
                    ended = s.gen >= s.out or s.length >= max_len
                if ended:
                    done.append(s)
            if s.computed > s.cap:
                held = -(-s.computed // bs)
                blocks.n_free_blocks -= held - s.blocks  # type: ignore[attr-defined]
                s.blocks = held
                s.cap = held * bs
        for s in done:
            self.remove(s)
        return done


class Run(NamedTuple):
    """`steps` scheduler steps that no scheduling decision changes (`Scheduler.steady_run`):
    `batch` decode rows (the first running sequences), over `kv0` KV tokens in all at the
    first step (their new ones included), `batch` more each step. When `chunk` > 0, the next
    running sequence's prompt beside them, from token `start`: `chunk` tokens a step for the
    first `full` steps, then its last `tail` tokens (0: none), which sample its next token,
    then it decodes beside the others for the `after` steps left. `admitted`: its first step
    admitted that sequence. A decode-only run's steps are all `full`."""

    steps: int
    batch: int
    kv0: int
    chunk: int
    start: int
    full: int
    tail: int = 0
    admitted: bool = False

    @property
    def after(self) -> int:
        """Its steps after the last chunk."""
        return self.steps - self.full - 1 if self.tail else 0

    def first(self, k: int) -> Run:
        """Its first `k` steps."""
        full = self.full
        return Run(k, self.batch, self.kv0, self.chunk, self.start, min(k, full),
                   self.tail if k > full else 0, self.admitted)

    def chunked(self, k: int) -> int:
        """Tokens its chunked sequence computes in its first `k` steps (0 in a decode-only
        run): chunks, its last chunk, then a token a step."""
        if k <= self.full:
            return k * self.chunk
        return self.full * self.chunk + (self.tail + k - self.full - 1 if self.tail else 0)

    def tokens(self, k: int) -> int:
        """Tokens its first `k` steps compute."""
        return self.batch * k + self.chunked(k)

    def totals(self) -> tuple[float, float]:
        """KV tokens and prompt pairs of its `full` steps, summed."""
        k = self.full
        tri = k * (k - 1) / 2
        c = self.chunk
        return (k * self.kv0 + self.batch * tri,
                float(c) * (k * (self.start + c) + c * tri))

    def after_kv(self) -> tuple[int, int]:
        """The KV tokens of its first step after the last chunk (`batch` + 1 decode rows), and
        their growth a step."""
        b = self.batch
        known = self.start + self.full * self.chunk + self.tail  # its prompt (and tokens)
        return self.kv0 + (self.full + 1) * b + known + 1, b + 1

    def shape(self, j: int) -> tuple[int, float, int, float]:
        """Step `j`'s shape (as `StepPlan.shape`)."""
        b = self.batch
        if not self.chunk:
            return b, float(self.kv0 + j * b), 0, 0.0
        if j > self.full:  # it decodes beside the others
            kv, grow = self.after_kv()
            return b + 1, float(kv + (j - self.full - 1) * grow), 0, 0.0
        n = self.tail if j == self.full else self.chunk
        at = self.start + j * self.chunk
        return b, float(self.kv0 + j * b), n, float(n) * (at + n)


@dataclass(frozen=True)
class SchedulerConfig:
    """A replica's scheduling limits (the engine's `--max-batch`, token budget, KV blocks and
    context), to build its `Scheduler` over counted blocks (`counted`: the simulator)."""

    token_budget: int = 512  # tokens of one step: decode tokens and prompt chunks
    max_batch: int = 128  # sequences running at once
    block_size: int = 16  # tokens per KV block
    num_blocks: int = 1 << 20  # KV blocks of the replica (from its plan's memory)
    max_len: int = 1 << 30  # the model's context

    def __post_init__(self) -> None:
        for name in ("token_budget", "max_batch", "block_size", "num_blocks", "max_len"):
            if getattr(self, name) < 1:
                raise KCloudError(f"{name} must be 1 or more, got {getattr(self, name)}",
                                  f"pass a positive {name}")

    def scheduler(self, *, counted: bool = True, num_blocks: int | None = None) -> Scheduler:
        pool = BlockCounter if counted else BlockManager
        return Scheduler(pool(num_blocks or self.num_blocks, self.block_size),
                         max_batch=self.max_batch, token_budget=self.token_budget,
                         max_len=self.max_len)


@dataclass(eq=False)
class Item:
    """One request to a non-LLM model: its input (a sample, or a few along the batch axis)."""

    id: int
    value: Any
    size: int
    arrival: float


class Batcher:
    """Dynamic batching: a batch goes when it holds `max_batch` samples or its oldest request
    has waited `max_wait_s`."""

    def __init__(self, max_batch: int, max_wait_s: float) -> None:
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.waiting: deque[Any] = deque()
        self.load = 0  # samples waiting: what routing balances

    @property
    def busy(self) -> bool:
        return bool(self.waiting)

    def add(self, item: Any) -> None:
        self.waiting.append(item)
        self.load += item.size

    def remove(self, item: Any) -> None:
        if item in self.waiting:
            self.waiting.remove(item)
            self.load -= item.size

    def due(self, now: float) -> float | None:
        """When the next batch goes (now or later), None when nothing waits."""
        if not self.waiting:
            return None
        if self.load >= self.max_batch:
            return now
        return self.waiting[0].arrival + self.max_wait_s

    def take(self, now: float) -> list[Any]:
        due = self.due(now)
        if due is None or due > now:
            return []
        out: list[Any] = []
        size = 0
        while self.waiting and (not out or size + self.waiting[0].size <= self.max_batch):
            item = self.waiting.popleft()
            out.append(item)
            size += item.size
        self.load -= size
        return out
