"""A configurable transformer: LLaMA, GPT-J and BERT are instances of it.

Attention uses F.scaled_dot_product_attention. For one decode step the module is built with a
KV cache per layer (non-persistent buffers `k_cache`, `v_cache` of kv_len past tokens); the new
token's K/V are appended and attention runs over kv_len + 1 positions. Weights are the same
for every phase, so a state_dict moves between a prefill and a decode module.

Eager generation (not traced) sets a `KVCache` on each Attention and on the Embeddings of a
prefill-phase module: every call then appends the new tokens' K/V and attends over all tokens
cached so far, positions continuing from the cached length. With no cache set (the default,
and always while tracing) the modules compute exactly what they did before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TransformerConfig:
    n_layers: int
    hidden: int
    heads: int
    ffn: int
    vocab: int
    max_seq_len: int
    kv_heads: int | None = None  # None: as many as heads (no grouped-query attention)
    norm: Literal["rms", "layer"] = "rms"
    norm_eps: float = 1e-5
    mlp: Literal["swiglu", "gelu", "gelu_tanh"] = "swiglu"
    rotary_dim: int | None = None  # rotary on the first rotary_dim dims of a head; None: learned
    rope_theta: float = 10000.0
    parallel_block: bool = False  # GPT-J: x + attn(ln(x)) + mlp(ln(x))
    post_norm: bool = False  # BERT: norm after each residual add
    causal: bool = True
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    head_bias: bool = False
    type_vocab: int = 0  # BERT token types
    embed_norm: bool = False
    head: Literal["lm", "qa"] = "lm"  # next-token logits, or span start/end logits

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads or self.heads

    @property
    def kv_elems_per_token(self) -> int:
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim


class KVCache:
    """Keys and values of the tokens one sequence has seen, growing call by call (eager
    generation). Set on an Embeddings it only counts tokens: the position of the next one."""

    def __init__(self) -> None:
        # Buffers of room for `capacity` tokens, of which the first `length` are filled; the
        # room doubles when full, so a generation copies its cache O(log n) times, not per token.
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.length = 0  # tokens seen so far

    def advance(self, n: int) -> int:
        """Count `n` new tokens; the position of the first of them."""
        past = self.length
        self.length += n
        return past

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the new tokens' K/V ([batch, kv_heads, new, head_dim]); all of them so far."""
        past, new = (0 if self.k is None else self.length), k.size(2)
        need = past + new
        if self.k is None or self.v is None or need > self.k.size(2):
            room = max(need, 2 * (self.k.size(2) if self.k is not None else 0), 16)
            grown_k = k.new_empty(*k.shape[:2], room, k.shape[3])
            grown_v = v.new_empty(*v.shape[:2], room, v.shape[3])
            if self.k is not None and self.v is not None and past:
                grown_k[:, :, :past] = self.k[:, :, :past]
                grown_v[:, :, :past] = self.v[:, :, :past]
            self.k, self.v = grown_k, grown_v
        self.k[:, :, past:need] = k
        self.v[:, :, past:need] = v
        self.length = need
        return self.k[:, :, :need], self.v[:, :, :need]


@dataclass
class StepLayout:
    """Where the tokens of one engine step sit: every sequence's new tokens packed into one row
    ([1, tokens, hidden]), their positions, and their slots in a `PagedKV` pool (block * size +
    offset). `decode`: the sequences with one new token over a cache that holds the rest, in
    groups of similar contexts (`kcloud.planner.scheduling.decode_groups`), each attended as
    one batch over its blocks: (packed indices [n], block tables [n, blocks] padded, the
    longest context, mask [n, 1, 1, longest] or None when no row is padded);
    `chunks`: the others (prompt chunks), each (first token, tokens, block table of its
    whole context, context length), attended one by one. Built once per step by the worker
    (`kcloud.runtime`); the same for every layer of a stage."""

    positions: torch.Tensor  # [tokens] int64
    slots: torch.Tensor  # [tokens] int64
    decode: tuple[tuple[torch.Tensor, torch.Tensor, int, torch.Tensor | None], ...]
    chunks: tuple[tuple[int, int, torch.Tensor], ...]


class PagedKV:
    """The KV blocks of one attention module: pools of [blocks * block_size, kv_heads,
    head_dim] for keys and values, written at a step's slots and read by gathering each
    sequence's slots (its block table, expanded), as paged attention keeps them."""

    def __init__(self, blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        shape = (blocks * block_size, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.step: StepLayout | None = None

    def gather(self, pool: torch.Tensor, tables: torch.Tensor, length: int) -> torch.Tensor:
        """The first `length` slots of the blocks in `tables` ([..., blocks]) of `pool` (`k`
        or `v`): [..., length, kv_heads, head_dim]. Whole blocks are copied (one index each,
        not one a token), then cut to the context."""
        _, kv, hd = pool.shape
        got = pool.view(-1, self.block_size, kv, hd).index_select(0, tables.reshape(-1))
        return got.view(*tables.shape[:-1], -1, kv, hd)[..., :length, :, :]


def _norm(cfg: TransformerConfig) -> nn.Module:
    if cfg.norm == "rms":
        return nn.RMSNorm(cfg.hidden, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)


class Embeddings(nn.Module):
    def __init__(self, cfg: TransformerConfig, offset: int = 0) -> None:
        super().__init__()
        self.offset = offset
        self.tok = nn.Embedding(cfg.vocab, cfg.hidden)
        self.pos = nn.Embedding(cfg.max_seq_len, cfg.hidden) if cfg.rotary_dim is None else None
        self.typ = nn.Embedding(cfg.type_vocab, cfg.hidden) if cfg.type_vocab else None
        self.norm = _norm(cfg) if cfg.embed_norm else None
        self.kv: KVCache | None = None  # eager generation: positions continue from its count
        self.paged: PagedKV | None = None  # an engine step: positions from its layout

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        offset = self.offset
        if self.kv is not None:
            offset += self.kv.advance(int(input_ids.size(1)))
        h = self.tok(input_ids)
        if self.pos is not None or self.typ is not None:
            if self.paged is not None and self.paged.step is not None:
                positions = self.paged.step.positions
            else:
                positions = torch.arange(input_ids.size(1), device=input_ids.device) + offset
            if self.pos is not None:
                h = h + self.pos(positions)
            if self.typ is not None:
                h = h + self.typ(torch.zeros_like(positions))
        if self.norm is not None:
            h = self.norm(h)
        return h


def attend_cached(cache: KVCache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  past: int, causal: bool) -> torch.Tensor:
    """Attention of new tokens (q, k, v: [batch, heads, new, head_dim]) over `cache` plus
    themselves, the new K/V appended to it: new token i sits at position past + i and sees
    every key up to it (a single new token sees them all). Where the attention runs beside
    the rest of its layer (`Attention`) or in a worker of its own (an offload to PIM)."""
    gqa = q.size(1) != k.size(1)
    k, v = cache.append(k, v)
    new = q.size(2)
    if not causal or new == 1:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    if past == 0:  # the prompt: the same causal attention as the traced prefill
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    mask = torch.ones(new, past + new, dtype=torch.bool, device=q.device).tril(past)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


class Attention(nn.Module):
    def __init__(
        self, cfg: TransformerConfig, *, offset: int = 0, cache: tuple[int, int] | None = None
    ) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden, self.heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden, self.kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden, self.kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden, bias=cfg.out_bias)
        self.offset = offset
        self.rotary_dim = cfg.rotary_dim or 0
        if self.rotary_dim:
            exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.float32) / self.rotary_dim
            self.register_buffer("inv_freq", 1.0 / cfg.rope_theta**exponents, persistent=False)
        self.has_cache = cache is not None
        # One query per sequence attends to the whole cache: no mask needed then.
        self.causal = cfg.causal and not self.has_cache
        self.gqa = self.kv_heads != self.heads
        if cache is not None:
            batch, kv_len = cache
            shape = (batch, self.kv_heads, kv_len, self.head_dim)
            self.register_buffer("k_cache", torch.zeros(shape), persistent=False)
            self.register_buffer("v_cache", torch.zeros(shape), persistent=False)
        self.kv: KVCache | None = None  # eager generation (prefill-phase modules only)
        self.paged: PagedKV | None = None  # an engine step over KV blocks
        # Eager generation with the attention elsewhere (a stage that offloads it to PIM):
        # called as remote(self, q, k, v, past), it returns the attention output; the cache
        # then lives with the remote side and `kv` only counts tokens.
        self.remote: Any = None

    def _rotate(self, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = self.rotary_dim // 2
        t1, t2 = t[..., :half], t[..., half : self.rotary_dim]
        rotated = torch.cat([t1 * cos - t2 * sin, t1 * sin + t2 * cos], dim=-1)
        if self.rotary_dim == self.head_dim:
            return rotated
        return torch.cat([rotated, t[..., self.rotary_dim :]], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q_proj(x).unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)
        k = self.k_proj(x).unflatten(-1, (self.kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).unflatten(-1, (self.kv_heads, self.head_dim)).transpose(1, 2)
        past = 0 if self.kv is None else self.kv.length
        step = self.paged.step if self.paged is not None else None
        if self.rotary_dim:
            if step is not None:
                positions = step.positions
            else:
                positions = torch.arange(x.size(1), device=x.device) + (self.offset + past)
            angles = positions.unsqueeze(-1).float() * self.inv_freq
            cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        if step is not None:
            return self.o_proj(self._attend_paged(q, k, v, step).transpose(1, 2).flatten(2))
        if self.kv is not None and self.remote is not None:
            y = self.remote(self, q, k, v, past)
            self.kv.advance(q.size(2))
            return self.o_proj(y.to(q.dtype).transpose(1, 2).flatten(2))
        if self.kv is not None:
            return self.o_proj(self._attend_cached(q, k, v, past).transpose(1, 2).flatten(2))
        if self.has_cache:
            k = torch.cat([self.k_cache, k], dim=2)
            v = torch.cat([self.v_cache, v], dim=2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, enable_gqa=self.gqa)
        return self.o_proj(y.transpose(1, 2).flatten(2))

    def _attend_cached(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       past: int) -> torch.Tensor:
        """Attention of the new tokens over the cache plus themselves: new token i sits at
        position past + i and sees every key up to it (a single new token sees them all)."""
        assert self.kv is not None
        return attend_cached(self.kv, q, k, v, past, self.causal)


    def _attend_paged(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      step: StepLayout) -> torch.Tensor:
        """Attention of an engine step's packed tokens ([1, heads, tokens, head_dim]) over the
        KV blocks: the new K/V are written at their slots first; one-token sequences attend as
        batch per group over their gathered slots (padding masked), prompt chunks one by one,
        causally from their first position."""
        assert self.paged is not None
        pool_k, pool_v = self.paged.k, self.paged.v
        pool_k[step.slots] = k[0].transpose(0, 1).to(pool_k.dtype)
        pool_v[step.slots] = v[0].transpose(0, 1).to(pool_v.dtype)
        out = torch.empty_like(q)
        gather = self.paged.gather
        for rows, tables, longest, mask in step.decode:
            qd = q[0][:, rows].unsqueeze(2).transpose(0, 1)  # [n, heads, 1, hd]
            kd = gather(pool_k, tables, longest).transpose(1, 2).to(q.dtype)  # [n, kv, L, hd]
            vd = gather(pool_v, tables, longest).transpose(1, 2).to(q.dtype)
            yd = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, enable_gqa=self.gqa)
            out[0][:, rows] = yd.squeeze(2).transpose(0, 1)
        for first, n, table, length in step.chunks:
            qc = q[:, :, first:first + n]
            kc = gather(pool_k, table, length).transpose(0, 1).unsqueeze(0).to(q.dtype)
            vc = gather(pool_v, table, length).transpose(0, 1).unsqueeze(0).to(q.dtype)
            past = length - n  # kc, vc: [1, kv, length, hd]
            if not self.causal:
                yc = F.scaled_dot_product_attention(qc, kc, vc, enable_gqa=self.gqa)
            elif past == 0:
                yc = F.scaled_dot_product_attention(qc, kc, vc, is_causal=True,
                                                    enable_gqa=self.gqa)
            else:
                mask = torch.ones(n, past + n, dtype=torch.bool, device=q.device).tril(past)
                yc = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask,
                                                    enable_gqa=self.gqa)
            out[:, :, first:first + n] = yc
        return out


class GatedMLP(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden, cfg.ffn, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden, cfg.ffn, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.ffn, cfg.hidden, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.fc_in = nn.Linear(cfg.hidden, cfg.ffn, bias=cfg.mlp_bias)
        self.act = nn.GELU(approximate="tanh" if cfg.mlp == "gelu_tanh" else "none")
        self.fc_out = nn.Linear(cfg.ffn, cfg.hidden, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.act(self.fc_in(x)))


class Block(nn.Module):
    def __init__(
        self, cfg: TransformerConfig, *, offset: int = 0, cache: tuple[int, int] | None = None
    ) -> None:
        super().__init__()
        self.parallel = cfg.parallel_block
        self.post_norm = cfg.post_norm
        self.attn_norm = _norm(cfg)
        self.mlp_norm = None if cfg.parallel_block else _norm(cfg)
        self.attn = Attention(cfg, offset=offset, cache=cache)
        self.mlp = GatedMLP(cfg) if cfg.mlp == "swiglu" else MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mlp_norm is None:  # parallel attention and MLP on one norm
            h = self.attn_norm(x)
            return x + self.attn(h) + self.mlp(h)
        if self.post_norm:
            x = self.attn_norm(x + self.attn(x))
            return self.mlp_norm(x + self.mlp(x))
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """Token ids [batch, seq] -> logits [batch, seq, vocab] (or [batch, seq, 2] for QA)."""

    def __init__(
        self, cfg: TransformerConfig, *, phase: str = "prefill", batch: int = 1, kv_len: int = 0
    ) -> None:
        super().__init__()
        self.cfg = cfg
        decode = phase == "decode"
        offset = kv_len if decode else 0
        cache = (batch, kv_len) if decode else None
        self.embed = Embeddings(cfg, offset=offset)
        self.layers = nn.ModuleList(
            Block(cfg, offset=offset, cache=cache) for _ in range(cfg.n_layers)
        )
        self.norm = None if cfg.post_norm else _norm(cfg)
        out = cfg.vocab if cfg.head == "lm" else 2
        self.head = nn.Linear(cfg.hidden, out, bias=cfg.head_bias)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h)
        if self.norm is not None:
            h = self.norm(h)
        return self.head(h)
