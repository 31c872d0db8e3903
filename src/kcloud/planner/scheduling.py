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
run of decode-only steps in one go (`steady_decode_steps`, `advance_decode`): the same steps,
fewer events.
"""

from __future__ import annotations

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

    # -- a run of decode-only steps (the simulator's fast path) --------------------------------
    def steady_decode_steps(self) -> int:
        """How many decode-only steps can run with no scheduling decision changing: 0 when
        prompt work is pending (a partial prefill, or a waiting sequence that would be
        admitted); else until the first sequence ends or a sequence might need a block that
        the free ones do not cover."""
        running = self.running
        n = len(running)
        if not n or n > self.token_budget:
            return 0
        if running[-1].length - running[-1].computed != 1 or \
                self.admissible(self.token_budget - n):
            return 0  # prompt work is pending (a partial prefill is the newest one running)
        bs = self.blocks.block_size
        least = slack = 1 << 62
        longest = 0
        for s in running:
            length = s.length
            if length - s.computed != 1:
                return 0
            if s.stop_at - length < least:  # steps until it has all its tokens
                least = s.stop_at - length
            if length > longest:
                longest = length
            if s.cap - s.computed < slack:
                slack = s.cap - s.computed
        least = min(least, self.max_len - longest)
        return max(0, min(least, slack + (self.blocks.n_free // n) * bs))

    def advance_decode(self, k: int) -> list[Any]:
        """Apply `k` decode-only steps to every running sequence of counted tokens (blocks as
        they grow); those that ended, removed."""
        blocks = self.blocks
        bs = blocks.block_size
        done: list[Any] = []
        for s in self.running:
            s.computed += k
            s.gen += k
            s.length += k
            if s.computed > s.cap:
                held = -(-s.computed // bs)
                blocks.n_free_blocks -= held - s.blocks  # type: ignore[attr-defined]
                s.blocks = held
                s.cap = held * bs
            if s.gen >= s.out or s.length >= self.max_len:
                done.append(s)
        for s in done:
            self.remove(s)
        return done


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
