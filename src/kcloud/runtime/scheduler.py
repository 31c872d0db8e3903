"""The engine's scheduling policy, torch-free: iteration-level (continuous) batching of LLM
sequences over fixed-size KV blocks, and dynamic batching of other models' requests.

Every step the `Scheduler` picks what each running sequence computes next (as Orca and vLLM
schedule): the running sequences first, oldest first, each its next chunk of uncomputed tokens
(one token for a decode), within a token budget per step, so that a long prompt is prefilled
in chunks and does not stall the running decodes; then waiting sequences are admitted, first
come first served, while the budget, the batch limit and the free KV blocks allow. A sequence
whose next tokens find no free block preempts the newest running sequence (which loses its
blocks and is recomputed later: its prompt and the tokens it already generated are prefilled
again), never failing the step. A sequence samples a token when a step computes its last known
token; the sampled token is the next one to compute.

The simulator (`kcloud.sim`) schedules replicas with these same rules.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from kcloud.errors import KCloudError


@dataclass(frozen=True)
class SamplingParams:
    """How a sequence picks its tokens and when it ends."""

    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0  # the sampler's seed: a token's draw depends on (seed, its index) alone
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise KCloudError(f"max_tokens must be at least 1, got {self.max_tokens}",
                              "ask for 1 or more tokens")
        if not 0.0 <= self.temperature <= 100.0 or self.temperature != self.temperature:
            raise KCloudError(f"temperature must be in [0, 100], got {self.temperature}",
                              "pass 0 for greedy decoding")
        if not 0.0 < self.top_p <= 1.0:
            raise KCloudError(f"top_p must be in (0, 1], got {self.top_p}", "pass 1.0 for none")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise KCloudError(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}",
                              "pass min_tokens no larger than max_tokens")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(eq=False)
class Sequence:
    """One request's tokens and its place in the KV cache."""

    id: int
    prompt: list[int]
    params: SamplingParams
    eos: int | None = None
    arrival: float = 0.0
    output: list[int] = field(default_factory=list)
    computed: int = 0  # tokens whose keys and values are in the cache
    blocks: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "length" | "stop" | "abort" | "error"
    preemptions: int = 0
    restartable: bool = False  # nothing of it reached the client: a fault may start it over

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class BlockManager:
    """Fixed-size KV blocks of one replica: a free list, and each sequence's block table."""

    def __init__(self, n_blocks: int, block_size: int) -> None:
        if n_blocks < 1 or block_size < 1:
            raise KCloudError(f"a KV cache of {n_blocks} blocks of {block_size} tokens is empty",
                              "give at least one block of at least one token")
        self.n_blocks = n_blocks
        self.block_size = block_size
        self.free: deque[int] = deque(range(n_blocks))

    @property
    def used(self) -> int:
        return self.n_blocks - len(self.free)

    def needed(self, seq: Sequence, n_new: int) -> int:
        """Blocks `seq` must add to hold `n_new` more tokens."""
        return max(0, math.ceil((seq.computed + n_new) / self.block_size) - len(seq.blocks))

    def can_hold(self, seq: Sequence, n_new: int) -> bool:
        return self.needed(seq, n_new) <= len(self.free)

    def grow(self, seq: Sequence, n_new: int) -> None:
        for _ in range(self.needed(seq, n_new)):
            seq.blocks.append(self.free.popleft())

    def release(self, seq: Sequence) -> None:
        self.free.extend(seq.blocks)
        seq.blocks = []

    def slot(self, seq: Sequence, position: int) -> int:
        """The flat slot (block * size + offset) of the token at `position`."""
        return seq.blocks[position // self.block_size] * self.block_size + \
            position % self.block_size


@dataclass(frozen=True)
class Scheduled:
    """A sequence's work in one step: tokens [start, start + n) of it; `sample`: the step
    computes its last known token, so it samples the next."""

    seq: Sequence
    start: int
    n: int
    sample: bool


@dataclass
class StepPlan:
    rows: list[Scheduled]
    preempted: list[Sequence]

    @property
    def tokens(self) -> int:
        return sum(r.n for r in self.rows)


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
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the newest last
        self.preemptions = 0

    def fits(self, prompt_len: int, max_tokens: int) -> str | None:
        """Why a request can never run on this replica (None when it can)."""
        total = prompt_len + max_tokens
        if total > self.max_len:
            return (f"the prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) is "
                    f"{total} tokens, past the model's context of {self.max_len}")
        need = math.ceil(total / self.blocks.block_size)
        if need > self.blocks.n_blocks:
            return (f"the prompt plus max_tokens needs {need} KV blocks, but the replica "
                    f"holds {self.blocks.n_blocks}")
        return None

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def load(self) -> int:
        """Outstanding tokens: what routing balances."""
        return sum(s.length - s.computed + s.params.max_tokens - len(s.output)
                   for s in (*self.running, *self.waiting))

    @property
    def busy(self) -> bool:
        return bool(self.running or self.waiting)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out (finished, aborted or failed) and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.computed = 0
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> StepPlan:
        budget = self.token_budget
        rows: list[Scheduled] = []
        preempted: list[Sequence] = []
        scheduled: set[int] = set()
        for seq in list(self.running):
            if seq not in self.running or budget == 0:
                continue
            n = min(seq.length - seq.computed, budget)
            while not self.blocks.can_hold(seq, n):
                victims = [s for s in reversed(self.running) if id(s) not in scheduled]
                victim = victims[0]  # the newest not yet given work (possibly seq itself)
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq not in self.running:
                continue
            self.blocks.grow(seq, n)
            rows.append(Scheduled(seq, seq.computed, n, seq.computed + n == seq.length))
            scheduled.add(id(seq))
            budget -= n
        while self.waiting and budget > 0 and not preempted and \
                len(self.running) < self.max_batch:
            seq = self.waiting[0]
            n = min(seq.length - seq.computed, budget)
            if not self.blocks.can_hold(seq, n):
                break
            self.waiting.popleft()
            self.running.append(seq)
            self.blocks.grow(seq, n)
            rows.append(Scheduled(seq, seq.computed, n, seq.computed + n == seq.length))
            budget -= n
        return StepPlan(rows, preempted)

    def update(self, plan: StepPlan, sampled: dict[int, int]) -> list[Sequence]:
        """Apply a step's results (the token each sampling row drew); the sequences that
        finished, already removed."""
        done: list[Sequence] = []
        for row in plan.rows:
            seq = row.seq
            if seq.finished or seq not in self.running:
                continue  # aborted while its step ran
            seq.computed = row.start + row.n
            if not row.sample:
                continue
            tok = sampled[seq.id]
            seq.output.append(tok)
            p = seq.params
            if len(seq.output) >= p.max_tokens or seq.length >= self.max_len:
                seq.finish_reason = "length"
            elif len(seq.output) >= p.min_tokens and (
                    tok in p.stop_token_ids or (tok == seq.eos and not p.ignore_eos)):
                seq.finish_reason = "stop"
            if seq.finished:
                self.remove(seq)
                done.append(seq)
        return done


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
        self.waiting: deque[Item] = deque()

    @property
    def load(self) -> int:
        return sum(i.size for i in self.waiting)

    @property
    def busy(self) -> bool:
        return bool(self.waiting)

    def add(self, item: Item) -> None:
        self.waiting.append(item)

    def remove(self, item: Item) -> None:
        if item in self.waiting:
            self.waiting.remove(item)

    def due(self, now: float) -> float | None:
        """When the next batch goes (now or later), None when nothing waits."""
        if not self.waiting:
            return None
        if self.load >= self.max_batch:
            return now
        return self.waiting[0].arrival + self.max_wait_s

    def take(self, now: float) -> list[Item]:
        due = self.due(now)
        if due is None or due > now:
            return []
        out: list[Item] = []
        size = 0
        while self.waiting and (not out or size + self.waiting[0].size <= self.max_batch):
            item = self.waiting.popleft()
            out.append(item)
            size += item.size
        return out
