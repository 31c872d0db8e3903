"""The engine's requests: an LLM sequence's token ids and sampling parameters, on the one
scheduling policy of `kcloud.planner.scheduling` (continuous batching over KV blocks, chunked
prefill, preemption; dynamic batching of other models' requests), which the fleet simulator
runs too."""

from __future__ import annotations

from dataclasses import dataclass, field

from kcloud.errors import KCloudError
from kcloud.planner.scheduling import (
    Batcher,
    BlockManager,
    Item,
    Scheduled,
    Scheduler,
    StepPlan,
)

__all__ = ["Batcher", "BlockManager", "Item", "SamplingParams", "Scheduled", "Scheduler",
           "Sequence", "StepPlan"]


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
    """One request's tokens and its place in the KV cache (a sequence of the policy's)."""

    id: int
    prompt: list[int]
    params: SamplingParams
    eos: int | None = None
    arrival: float = 0.0
    output: list[int] = field(default_factory=list)
    computed: int = 0  # tokens whose keys and values are in the cache
    blocks: list[int] = field(default_factory=list)
    cap: int = 0  # tokens its blocks hold
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
    def remaining(self) -> int:
        """Tokens it may still generate (fewer if it stops)."""
        return self.params.max_tokens - len(self.output)

    @property
    def stop_at(self) -> int:
        """Its length at max_tokens (it may stop before)."""
        return len(self.prompt) + self.params.max_tokens

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def accept(self, tok: int, max_len: int) -> bool:
        """Take a sampled token; whether the sequence ended (its reason set)."""
        self.output.append(tok)
        p = self.params
        if len(self.output) >= p.max_tokens or self.length >= max_len:
            self.finish_reason = "length"
        elif len(self.output) >= p.min_tokens and (
                tok in p.stop_token_ids or (tok == self.eos and not p.ignore_eos)):
            self.finish_reason = "stop"
        return self.finished
