"""The engine's paged attention (`Attention._attend_paged` over the worker's step layout):
prompts prefilled in chunks into scattered KV blocks, then one decode step of sequences whose
contexts differ by orders of magnitude (several attention groups, padded rows masked), equal to
dense causal attention over each whole sequence."""

from __future__ import annotations

import random

import torch

from kcloud.graph.models.transformer import Attention, PagedKV, TransformerConfig
from kcloud.planner.scheduling import decode_groups
from kcloud.runtime.stage_worker import Row, _layout

BLOCK = 16


def _config() -> TransformerConfig:
    return TransformerConfig(n_layers=1, hidden=64, heads=8, ffn=128, vocab=100,
                             max_seq_len=4096, kv_heads=2, norm="rms", mlp="swiglu", rotary_dim=8)


def _step(attn: Attention, x: torch.Tensor, rows: tuple[Row, ...]) -> torch.Tensor:
    assert attn.paged is not None
    attn.paged.step, _ = _layout(rows, BLOCK, torch.device("cpu"))
    try:
        return attn(x)
    finally:
        attn.paged.step = None


def test_decode_groups_bound_padding_and_cover_every_row() -> None:
    ctx = [5, 900, 17, 1000, 30, 2500, 880, 64]
    groups = decode_groups(ctx)
    assert sorted(i for g in groups for i in g) == list(range(len(ctx)))
    for g in groups:
        top = ctx[g[0]]
        assert all(ctx[i] <= top for i in g)
        assert all(top - ctx[i] <= max(64, 0.5 * ctx[i]) for i in g)
    assert len(groups) == 3  # {2500}, {1000, 900, 880}, {64, 30, 17, 5}
    padded = sum(len(g) * ctx[g[0]] for g in groups)
    assert padded < 1.3 * sum(ctx) < len(ctx) * max(ctx)


def test_decode_over_mixed_contexts_equals_dense_attention() -> None:
    torch.manual_seed(0)
    cfg = _config()
    attn = Attention(cfg).eval()
    lengths = [3, 40, 41, 300, 1200]  # contexts before the decoded token
    n_blocks = sum(-(-(n + 1) // BLOCK) for n in lengths) + 8
    attn.paged = PagedKV(n_blocks, BLOCK, cfg.n_kv_heads, cfg.head_dim, torch.float32)
    free = list(range(n_blocks))
    random.Random(1).shuffle(free)  # scattered blocks, as a busy engine leaves them
    tables = []
    for n in lengths:
        k = -(-(n + 1) // BLOCK)
        tables.append(tuple(free[:k]))
        del free[:k]
    seqs = [torch.randn(1, n + 1, cfg.hidden) for n in lengths]
    with torch.no_grad():
        # prefill each prompt in chunks of at most 256 tokens, two sequences a step
        for i in range(0, len(lengths), 2):
            done = [0] * len(lengths)
            while any(done[j] < lengths[j] for j in (i, i + 1) if j < len(lengths)):
                rows, xs = [], []
                for j in (i, i + 1):
                    if j < len(lengths) and done[j] < lengths[j]:
                        n = min(256, lengths[j] - done[j])
                        rows.append(Row(j, done[j], n, tables[j], False))
                        xs.append(seqs[j][:, done[j]:done[j] + n])
                        done[j] += n
                _step(attn, torch.cat(xs, dim=1), tuple(rows))
        rows = tuple(Row(j, n, 1, tables[j], True) for j, n in enumerate(lengths))
        got = _step(attn, torch.cat([s[:, -1:] for s in seqs], dim=1), rows)
        attn.paged = None
        for j, s in enumerate(seqs):
            want = attn(s)[:, -1]
            torch.testing.assert_close(got[:, j], want, rtol=1e-4, atol=1e-5)
