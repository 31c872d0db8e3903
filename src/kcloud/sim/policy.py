"""The per-replica scheduling policy of an LLM engine, as data and small functions.

One iteration of an engine (vLLM's v1 scheduler with chunked prefill, the Sarathi-Serve
policy) is planned from the state of its sequences:

1. every running sequence whose prompt is in its KV cache decodes one token;
2. a KV-cache block (`block_size` tokens) is allocated to a decoding sequence whose cache is
   full; when none is free, the most recently admitted running sequence is preempted
   (recompute: its blocks are freed, it returns to the head of the waiting queue and later
   prefills its prompt plus what it generated);
3. what is left of the iteration's token budget (`chunk_tokens`) goes to prompt chunks: first
   to admitted sequences whose prompt is partly in the cache, then to waiting sequences,
   admitted first come first served while the batch holds fewer than `max_seqs` sequences and
   the free blocks cover the whole prompt plus a watermark.

The simulator (`kcloud.sim.fleet`) runs this policy; a serving engine can run the same
`plan_iteration` / `finish_iteration` pair over its own sequences (anything with the `Seq`
fields), so that both schedule alike.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class SchedulerConfig:
    chunk_tokens: int = 512  # token budget of one iteration (decode tokens + prompt chunks)
    max_seqs: int = 128  # sequences in one batch
    block_size: int = 16  # tokens per KV-cache block
    num_blocks: int = 1 << 20  # KV-cache blocks of the replica (from its plan's memory)
    watermark: float = 0.01  # share of the blocks kept free when admitting

    def __post_init__(self) -> None:
        for name in ("chunk_tokens", "max_seqs", "block_size", "num_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be 1 or more")

    @property
    def watermark_blocks(self) -> int:
        return int(self.watermark * self.num_blocks)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def fits(self, tokens: int) -> bool:
        """Whether a sequence of `tokens` (prompt + output) can ever be held."""
        return self.blocks_for(tokens) <= self.num_blocks - self.watermark_blocks


class Seq:
    """A request's sequence inside a replica."""

    __slots__ = ("arrival", "blocks", "ctx", "first_token", "gen", "out", "prompt",
                 "prompt0", "queued", "rid", "service", "started")

    def __init__(self, rid: int, service: int, arrival: float, prompt: int, out: int) -> None:
        self.rid, self.service, self.arrival = rid, service, arrival
        self.prompt0 = prompt  # the request's prompt
        self.prompt = prompt  # tokens to prefill (prompt + generated after a preemption)
        self.out = max(1, out)  # tokens to generate
        self.ctx = 0  # tokens in its KV cache
        self.gen = 0  # tokens generated
        self.blocks = 0  # KV blocks held
        self.first_token = -1.0
        self.started = -1.0  # first admission (queueing delay ends)
        self.queued = arrival

    @property
    def prefilled(self) -> bool:
        return self.ctx >= self.prompt


@dataclass
class Iteration:
    """What one iteration runs: decoding sequences, prompt chunks (sequence, tokens)."""

    decode: list[Seq]
    chunks: list[tuple[Seq, int]]
    kv_tokens: int  # KV tokens the decode steps attend over (their new token included)
    prefill_tokens: int
    prefill_pairs: float  # (query, key) pairs of the prompt chunks
    preempted: int


class SchedulerState:
    """Waiting and running sequences of one replica and its free KV blocks."""

    def __init__(self, cfg: SchedulerConfig) -> None:
        self.cfg = cfg
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []
        self.free = cfg.num_blocks
        self.preemptions = 0

    @property
    def outstanding(self) -> int:
        return len(self.waiting) + len(self.running)

    def admissible(self, s: Seq) -> bool:
        c = self.cfg
        return (len(self.running) < c.max_seqs
                and self.free - c.blocks_for(s.prompt + 1) >= c.watermark_blocks)

    def _preempt(self, victim: Seq) -> None:
        if self.running and self.running[-1] is victim:
            self.running.pop()
        else:
            self.running.remove(victim)
        self.free += victim.blocks
        victim.blocks = 0
        victim.ctx = 0
        victim.prompt = victim.prompt0 + victim.gen
        self.waiting.appendleft(victim)
        self.preemptions += 1

    def plan_iteration(self, now: float) -> Iteration:
        """Choose this iteration's work (steps 1-3 above); blocks are allocated here."""
        c = self.cfg
        bs = c.block_size
        running = self.running
        decode: list[Seq] = []
        preempted = 0
        i = 0
        while i < len(running):
            s = running[i]
            i += 1
            if s.ctx < s.prompt:
                continue
            need = -(-(s.ctx + 1) // bs) - s.blocks
            if need > 0:
                # victims come from the end: sequences before `s` are never preempted here
                while need > self.free and running[-1] is not s:
                    self._preempt(running[-1])
                    preempted += 1
                if need > self.free:  # `s` is the most recent one itself
                    self._preempt(s)
                    preempted += 1
                    break
                self.free -= need
                s.blocks += need
            decode.append(s)
        budget = c.chunk_tokens - len(decode)
        chunks: list[tuple[Seq, int]] = []
        pairs = 0.0
        for s in self.running:
            if budget <= 0:
                break
            if s.ctx < s.prompt:
                q = min(s.prompt - s.ctx, budget)
                chunks.append((s, q))
                pairs += q * (s.ctx + q)
                budget -= q
        while budget > 0 and self.waiting and self.admissible(self.waiting[0]):
            s = self.waiting.popleft()
            blocks = c.blocks_for(s.prompt + 1)
            self.free -= blocks
            s.blocks = blocks
            if s.started < 0:
                s.started = now
            self.running.append(s)
            q = min(s.prompt, budget)
            chunks.append((s, q))
            pairs += q * float(q)
            budget -= q
        kv = sum(s.ctx + 1 for s in decode)
        return Iteration(decode, chunks, kv, sum(q for _, q in chunks), pairs, preempted)

    def finish_iteration(self, it: Iteration, now: float) -> list[Seq]:
        """Apply an iteration's effects at its end; returns the sequences that finished."""
        done: list[Seq] = []
        for s in it.decode:
            s.ctx += 1
            s.gen += 1
            if s.gen >= s.out:
                done.append(s)
        for s, q in it.chunks:
            s.ctx += q
            if s.ctx >= s.prompt:  # the prompt's last position gives the next token
                s.gen += 1
                if s.first_token < 0:
                    s.first_token = now
                if s.gen >= s.out:
                    done.append(s)
        for s in done:
            self.release(s)
        return done

    def release(self, s: Seq) -> None:
        self.running.remove(s)
        self.free += s.blocks
        s.blocks = 0

    # -- a run of decode-only iterations (the simulator's fast path) --------------------------
    def steady_decode_steps(self) -> int:
        """How many decode-only iterations can run without any scheduling decision changing:
        0 when prompt work is pending (a partial prefill, or an admissible waiting sequence);
        else until the first sequence finishes or a sequence would need a block that the free
        ones might not cover."""
        if not self.running:
            return 0
        bs = self.cfg.block_size
        least = 1 << 62
        for s in self.running:
            if s.ctx < s.prompt:
                return 0
            left = s.out - s.gen
            if left < least:
                least = left
        if self.waiting and self.admissible(self.waiting[0]):
            return 0
        per_seq = self.free // len(self.running)
        safe = per_seq * bs
        return max(0, min(least, safe))

    def advance_decode(self, k: int) -> list[Seq]:
        """Apply `k` decode-only iterations to every running sequence (blocks as they grow)."""
        bs = self.cfg.block_size
        done: list[Seq] = []
        for s in self.running:
            s.ctx += k
            s.gen += k
            blocks = -(-s.ctx // bs)
            if blocks > s.blocks:
                self.free -= blocks - s.blocks
                s.blocks = blocks
            if s.gen >= s.out:
                done.append(s)
        for s in done:
            self.release(s)
        return done
