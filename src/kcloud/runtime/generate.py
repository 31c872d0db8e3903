"""Generation of zoo LLMs through a plan's stages: the prompt (prefill), then greedy decode
steps, each stage keeping a growing KV cache per micro-batch.

The plan's layers are those of the captured (traced) graph. For a zoo transformer they run
whole submodules in forward order (embedding, `layers.i`, final norm, head), so a stage for
layers [start, end) runs those submodules eagerly (`GenStage`), with `KVCache`s set on its
attention and embedding modules; the traced graph itself cannot grow a cache. Its weights are
the full module's, taken by submodule prefix, so state names match across processes.

Tensor-parallel stages shard the eager modules Megatron-style: q/k/v by heads and KV heads,
the MLP's gate/up by output features (columns), o_proj and down by input features (rows,
summed over the group), the token embedding by vocabulary rows and the head by vocabulary
columns, reusing the shards of `tensor_parallel`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kcloud.errors import KCloudError
from kcloud.graph import zoo
from kcloud.graph.layering import analyze
from kcloud.graph.models.transformer import (
    MLP,
    Attention,
    Embeddings,
    GatedMLP,
    KVCache,
    Transformer,
)
from kcloud.runtime.tensor_parallel import ShardError, ShardLayout, swap_shards

# ---- which plans generate ------------------------------------------------------------------


def generates(model: str, output_tokens: int | None, prompt_only: bool = False) -> bool:
    """Whether a plan runs its decode steps for real: zoo LLMs with output tokens, unless
    the prompt only is asked for."""
    return bool(output_tokens) and not prompt_only and zoo.is_zoo_model(model) and \
        zoo.model_info(model).is_llm


def check_length(module: nn.Module, model: str, prompt: int, output_tokens: int) -> None:
    """A one-line error when prompt + generated tokens exceed the model's context."""
    limit = module.cfg.max_seq_len if isinstance(module, Transformer) else None
    if limit is not None and prompt + output_tokens > limit:
        raise KCloudError(
            f"{model} holds {limit} tokens of context, but a prompt of {prompt} plus "
            f"{output_tokens} output tokens needs {prompt + output_tokens}",
            f"pass --output-tokens {max(1, limit - prompt)} or less (or a shorter "
            "--input-tokens), or run the prompt only with --prompt-only")


# ---- layers -> submodules ------------------------------------------------------------------


def _forward_units(module: Transformer) -> list[str]:
    """The submodules `Transformer.forward` runs, in order."""
    units = ["embed", *(f"layers.{i}" for i in range(len(module.layers)))]
    if module.norm is not None:
        units.append("norm")
    return [*units, "head"]


def layer_units(module: nn.Module, example: tuple[Any, ...], model: str) -> list[list[str]]:
    """The submodules each layer of the captured graph runs, in order; raises a one-line
    error when the layers are not whole submodules in forward order."""
    hint = "run the prompt only with --prompt-only"
    if not isinstance(module, Transformer):
        raise KCloudError(f"{model} is not a zoo transformer, so its layers cannot be run "
                          "step by step with a KV cache", hint)
    layers = [list(spec.units) for spec in analyze(module, len(example)).layers]
    flat = [u for units in layers for u in units]
    if any(not units for units in layers) or flat != _forward_units(module):
        raise KCloudError(f"the layers of {model} ({', '.join('+'.join(u) for u in layers)}) "
                          "do not map to its submodules in forward order", hint)
    return layers


def stage_units(layers: Sequence[Sequence[str]], start: int, end: int) -> tuple[str, ...]:
    return tuple(u for units in layers[start:end] for u in units)


def stage_state(state: dict[str, torch.Tensor], units: Sequence[str]) -> dict[str, torch.Tensor]:
    """The entries of the full module's state dict that belong to `units`."""
    return {k: v for k, v in state.items() if any(k.startswith(u + ".") for u in units)}


# ---- an eager stage ------------------------------------------------------------------------


class GenStage(nn.Module):
    """Submodules of a zoo transformer run in order, eagerly; state names are the full
    module's (e.g. `layers.2.attn.q_proj.weight`)."""

    def __init__(self, root: nn.Module, units: Sequence[str]) -> None:
        super().__init__()
        self.units = tuple(units)
        for unit in self.units:
            parent: nn.Module = self
            *path, leaf = unit.split(".")
            for part in path:
                if part not in parent._modules:
                    parent.add_module(part, nn.ModuleDict())
                parent = parent._modules[part]  # type: ignore[assignment]
            parent.add_module(leaf, root.get_submodule(unit))
        self._cached = [(name, m) for name, m in self.named_modules()
                        if isinstance(m, (Attention, Embeddings))]

    @property
    def last(self) -> bool:
        """It ends with the vocabulary head (its outputs are logits)."""
        return bool(self.units) and self.units[-1] == "head"

    def new_caches(self) -> dict[str, KVCache]:
        """An empty KV cache (token count for the embedding) for one sequence batch."""
        return {name: KVCache() for name, _ in self._cached}

    def forward(self, x: torch.Tensor, caches: dict[str, KVCache]) -> torch.Tensor:
        for name, m in self._cached:
            m.kv = caches[name]
        try:
            for unit in self.units:
                x = self.get_submodule(unit)(x)
        finally:
            for _, m in self._cached:
                m.kv = None
        return x


def greedy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The last position's logits [batch, vocab] and the next token ids [batch, 1]."""
    last = logits[:, -1]
    return last, last.argmax(-1, keepdim=True)


def reference_generate(module: nn.Module, ids: torch.Tensor,
                       steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy generation of `steps` tokens by the whole model in this process, with the same
    eager cache code as the stages: (token ids [batch, steps], last-position logits
    [steps, batch, vocab])."""
    assert isinstance(module, Transformer)
    whole = GenStage(module, _forward_units(module))
    caches = whole.new_caches()
    tokens: list[torch.Tensor] = []
    logits: list[torch.Tensor] = []
    x = ids
    with torch.inference_mode():
        for _ in range(steps):
            last, x = greedy(whole(x, caches))
            logits.append(last)
            tokens.append(x)
    return torch.cat(tokens, 1), torch.stack(logits)


# ---- tensor parallelism of an eager stage ----------------------------------------------------


def eager_layout(stage: GenStage, tp: int) -> ShardLayout:
    """How `stage` splits over `tp` ranks; ShardError when a size does not divide."""
    columns: list[str] = []
    rows: list[str] = []
    gathers: list[str] = []
    vocab: list[str] = []
    labels: list[str] = []

    def need(what: str, n: int) -> None:
        if n % tp:
            raise ShardError(f"{what} is {n}, not divisible by {tp}")

    for name, m in stage.named_modules():
        if isinstance(m, Attention):
            need(f"{name} heads", m.heads)
            need(f"{name} KV heads", m.kv_heads)
            columns += [f"{name}.q_proj", f"{name}.k_proj", f"{name}.v_proj"]
            rows.append(f"{name}.o_proj")
            labels.append(f"heads {name}.o_proj")
        elif isinstance(m, (GatedMLP, MLP)):
            col, row = (("gate_proj", "up_proj"), "down_proj") if isinstance(m, GatedMLP) \
                else (("fc_in",), "fc_out")
            need(f"{name} hidden features", getattr(m, row).in_features)
            columns += [f"{name}.{c}" for c in col]
            rows.append(f"{name}.{row}")
            labels.append(f"mlp {name}.{row}")
        elif isinstance(m, Embeddings):
            if m.tok.max_norm is not None:
                raise ShardError(f"{name}.tok renormalizes its rows (max_norm)")
            need(f"{name}.tok vocabulary", m.tok.num_embeddings)
            vocab.append(f"{name}.tok")
            labels.append(f"vocab {name}.tok")
    if stage.last:
        head = stage.get_submodule("head")
        assert isinstance(head, nn.Linear)
        need("head vocabulary", head.out_features)
        gathers.append("head")
        labels.append("vocab head")
    return ShardLayout(tp=tp, columns=tuple(columns), rows=tuple(rows), rewrites=(),
                       groups=tuple(labels), gathers=tuple(gathers), vocab=tuple(vocab))


def apply_eager_layout(stage: GenStage, layout: ShardLayout, group: Any,
                       log: list[tuple[int, int]]) -> None:
    """Replace the sharded modules of `stage` with their shards (weights are loaded
    afterwards from `tensor_parallel.shard_state(..., prefix="")`); attention modules then
    hold their local heads."""
    swap_shards(stage, layout, group, log)
    for m in stage.modules():
        if isinstance(m, Attention):
            m.heads = m.q_proj.out_features // m.head_dim
            m.kv_heads = m.k_proj.out_features // m.head_dim


# ---- the order of work -----------------------------------------------------------------------

# An item: (kind, micro-batch, step, slot). kind "W" warm-up, "L" latency probe, "F" the timed
# stream, "B" a barrier of all workers; step 0 is the prefill, steps 1.. decode one token each;
# slot: the micro-batch's place among those generated together (its KV cache).
Item = tuple[str, int, int, int]
WARMUP_STEPS = 3  # steps of a warm-up generation


def gen_schedule(n_micro: int, n_warmup: int, n_probe: int, per_request: int,
                 steps: int) -> list[Item]:
    """What every worker of a generation run does, in order. Micro-batches generated
    together go step-major (step 0 of each, then step 1, ...), so that they fill the
    pipeline while each waits for its previous token: the warm-up micro-batches (untimed),
    then each probe request alone in the pipeline (its latency), then the stream."""

    def together(kind: str, ms: list[int], n_steps: int = steps) -> list[Item]:
        return [(kind, m, t, j) for t in range(n_steps) for j, m in enumerate(ms)]

    out: list[Item] = []
    if n_warmup:  # the prefill and a few decode steps warm both kinds of kernels
        out += together("W", [i % n_micro for i in range(n_warmup)], min(steps, WARMUP_STEPS))
        out.append(("B", 0, 0, 0))
    per = max(1, min(per_request, n_micro))
    for r in range(n_probe):
        out += together("L", [(r * per + i) % n_micro for i in range(per)])
        out.append(("B", 0, 0, 0))
    return out + together("F", list(range(n_micro)))


@dataclass(frozen=True)
class GenSpec:
    """What a worker needs to generate (plain data: it travels to the workers)."""

    steps: int  # tokens generated per sequence (the plan's output tokens)
    units: tuple[str, ...]  # submodules of the stage, in order
    layout: ShardLayout | None = None  # eager tensor-parallel sharding over the group
    feedback: int | None = None  # the token hop's peer: last stage's lead (first stage) or
    # first stage's lead (last stage); None in a one-stage pipeline
