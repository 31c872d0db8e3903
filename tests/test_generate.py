"""Generation through a plan's stages: KV caches per micro-batch, the token hop back to the
first stage, tensor-parallel stages; tokens and logits against the single-process model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kcloud.errors import KCloudError
from kcloud.graph import zoo
from kcloud.graph.models.transformer import KVCache, Transformer, TransformerConfig
from kcloud.planner.plan import Plan, Predicted, Replica, Stage
from kcloud.runtime import execute
from kcloud.runtime.generate import (
    GenStage,
    gen_schedule,
    layer_units,
    reference_generate,
    stage_units,
)
from kcloud.runtime.model import micro_batches

HOST = "host-cpu:1core"
MODEL = "tiny-gpt"
PROMPT = 8
STEPS = 6


def _plan(groups: list[tuple[int, int]], replicas: int = 1, micro_batch: int = 2,
          output_tokens: int = STEPS, seq_len: int = PROMPT) -> Plan:
    """`replicas` copies of a pipeline; `groups`: (first layer, tensor-parallel degree) of
    each stage. tiny-gpt has 7 layers: embed, 4 blocks, norm, head."""
    n = 7
    reps = []
    k = 0
    for _ in range(replicas):
        cuts = [g[0] for g in groups] + [n]
        stages = []
        for i, (_, tp) in enumerate(groups):
            devices = tuple(f"local/{HOST}/{k + j}" for j in range(tp))
            stages.append(Stage(cuts[i], cuts[i + 1], HOST, devices, "fp32", time_s=1e-3))
            k += tp
        reps.append(Replica(tuple(stages)))
    return Plan(model=MODEL, cluster="local-cpu", objective="throughput",
                batch=micro_batch * 2, micro_batch=micro_batch, seq_len=seq_len,
                phase="prefill", n_layers=n, replicas=tuple(reps),
                predicted=Predicted(2e-2, 500.0, "tokens/s", 10.0, 0.01, 0.0, None, 0.1),
                output_tokens=output_tokens)


def _reference(plan: Plan, n_micro: int) -> list[torch.Tensor]:
    """The generated tokens of every micro-batch, whole model, this process."""
    module, example = zoo.build(MODEL, device="cpu", batch=plan.micro_batch,
                                seq_len=plan.seq_len)
    feeds = micro_batches(example, n_micro * len(plan.replicas))
    return [reference_generate(module.eval(), x[0], plan.output_tokens or 0)[0]
            for x in feeds]


def _check(plan: Plan, n_micro: int, trace: Path | None = None) -> dict:
    r = execute(plan, mode="real", n_micro=n_micro, trace_path=trace, warmup=1, probes=1)
    d = r.to_dict()
    assert r.reference_ok and r.max_abs_error < 1e-4 and r.measured["tokens_match"]
    assert len(r.outputs) == n_micro * len(plan.replicas)
    assert all(t.shape == (plan.micro_batch, STEPS) for t in r.outputs)
    for got, ref in zip(r.outputs, _reference(plan, n_micro), strict=True):
        assert torch.equal(got, ref)
    m = r.measured
    assert m["figures"] == "measured" and m["unit"] == "output tokens/s"
    assert m["generated_tokens"] == plan.micro_batch * n_micro * len(plan.replicas) * STEPS
    assert 0 < m["ttft_s"] < m["latency_s"] and m["tpot_s"] > 0 and m["throughput"] > 0
    assert not any("prompt (prefill) only" in n for n in r.notes)
    for s in r.stages:
        assert s.measured_prefill_s and s.measured_decode_s and s.predicted_decode_s
    assert d["generated_token_ids"] == [t.tolist() for t in r.outputs]
    return d


def test_one_stage_generates_the_reference_tokens() -> None:
    d = _check(_plan([(0, 1)]), n_micro=2)
    (acts,) = d["schedule"].values()
    # step-major: the prompts of both micro-batches, then each decode step of both
    assert acts == ["P0", "P1"] + [f"D{m}.{t}" for t in range(1, STEPS) for m in (0, 1)]


def test_two_stage_pipeline_sends_tokens_back(tmp_path: Path) -> None:
    trace = tmp_path / "trace.json"
    d = _check(_plan([(0, 1), (3, 1)]), n_micro=3, trace=trace)
    first, last = d["schedule"].values()
    assert first[:6] == ["P0", "S0.0", "P1", "S1.0", "P2", "S2.0"]
    assert first[6:9] == ["RT0.1", "D0.1", "S0.1"]
    assert last[:3] == ["R0.0", "P0", "ST0.0"]
    assert last[-2:] == ["R2.5", "D2.5"]  # no token goes back after the last step
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e["ph"] == "X"]
    cats = {e["cat"] for e in events}
    assert {"prefill compute", "decode compute", "send token", "recv token"} <= cats
    d0 = next(e for e in events if e["name"] == "D0.1")
    assert d0["args"]["phase"] == "decode" and d0["args"]["step"] == 1


def test_replicas_generate_their_own_micro_batches() -> None:
    d = _check(_plan([(0, 1)], replicas=2), n_micro=2)
    tokens = d["generated_token_ids"]
    assert len(tokens) == 4 and tokens[0] != tokens[2]


def test_tensor_parallel_stage_generates() -> None:
    """Stage 0 (embedding by vocabulary, blocks by heads and MLP features) over 2 workers,
    its tokens broadcast from its lead; then the last stage whole."""
    d = _check(_plan([(0, 2), (3, 1)]), n_micro=2)
    st0 = d["stages"][0]
    assert st0["sharded"] and st0["tp"] == 2 and st0["measured_allreduce_s"] > 0
    lead, peer, _ = d["schedule"].values()
    assert "P0+AR" in lead and "D0.1+AR" in peer
    assert "RT0.1" in peer and not any(a.startswith("S") for a in peer)  # by broadcast


def test_one_tensor_parallel_stage_keeps_its_tokens_on_every_rank() -> None:
    """A one-stage pipeline over 2 workers: the logits are gathered whole on both ranks, so
    each chooses the same next token itself, and no decode step waits for a broadcast."""
    d = _check(_plan([(0, 2)]), n_micro=2)
    lead, peer = d["schedule"].values()
    assert "D0.1+AR" in lead and "D0.1+AR" in peer
    assert not any(a.startswith("RT") for a in lead + peer)


def test_prompt_only_runs_the_prefill() -> None:
    r = execute(_plan([(0, 1)]), mode="real", n_micro=1, trace_path=None, warmup=0,
                probes=0, prompt_only=True)
    assert r.reference_ok and r.measured["unit"] == "prompt tokens/s"
    assert any("prompt (prefill) only" in n for n in r.notes)


def test_too_many_output_tokens_is_one_line() -> None:
    with pytest.raises(KCloudError, match=r"--output-tokens 248 or less.*--prompt-only"):
        execute(_plan([(0, 1)], output_tokens=250), mode="real", trace_path=None)


def test_eager_cache_matches_the_decode_module() -> None:
    """A prefill through the eager cache, then one step: the same logits as the zoo's
    decode-phase module (fixed-size cache buffers) filled from that prefill."""
    b, p = 2, 5
    module, (ids,) = zoo.build(MODEL, device="cpu", batch=b, seq_len=p)
    module.eval()
    whole = GenStage(module, stage_units(layer_units(module, (ids,), MODEL), 0, 7))
    caches = whole.new_caches()
    with torch.inference_mode():
        ref_prefill = module(ids)
        prefill = whole(ids, caches)
        token = prefill[:, -1].argmax(-1, keepdim=True)
        step = whole(token, caches)
        dec, _ = zoo.build(MODEL, device="cpu", batch=b, phase="decode", kv_len=p)
        dec.load_state_dict(module.state_dict())
        for i, layer in enumerate(dec.eval().layers):
            cache = caches[f"layers.{i}.attn"]
            assert isinstance(cache, KVCache) and cache.length == p + 1
            assert cache.k is not None and cache.v is not None
            layer.attn.k_cache.copy_(cache.k[:, :, :p])
            layer.attn.v_cache.copy_(cache.v[:, :, :p])
        want = dec(token)
    assert caches["embed"].length == p + 1
    assert (prefill - ref_prefill).abs().max() < 1e-5
    assert step.shape == want.shape == (b, 1, 512)
    assert (step - want).abs().max() < 1e-4


def test_layers_must_map_to_submodules() -> None:
    module, example = zoo.build("mlp", device="cpu", batch=2)
    with pytest.raises(KCloudError, match="--prompt-only"):
        layer_units(module, example, "mlp")


def test_schedule_is_step_major() -> None:
    items = gen_schedule(n_micro=2, n_warmup=1, n_probe=1, per_request=2, steps=2)
    assert items == [("W", 0, 0, 0), ("W", 0, 1, 0), ("B", 0, 0, 0),
                     ("L", 0, 0, 0), ("L", 1, 0, 1), ("L", 0, 1, 0), ("L", 1, 1, 1),
                     ("B", 0, 0, 0),
                     ("F", 0, 0, 0), ("F", 1, 0, 1), ("F", 0, 1, 0), ("F", 1, 1, 1)]


def test_cli_run_generates(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "from kcloud.cli import main; main()", "run", "--model", MODEL,
         "--cluster", "local-cpu", "--objective", "latency", "--input-tokens", "16",
         "--output-tokens", "4", "--mode", "real", "--warmup", "1", "--json",
         "--trace", str(tmp_path / "t.json")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    d = json.loads(lines[0])
    m = d["measured"]
    assert d["reference_ok"] is True and m["tokens_match"] is True
    assert m["ttft_s"] > 0 and m["tpot_s"] > 0 and m["output_tokens"] == 4
    assert m["unit"] == "output tokens/s" and d["predicted"]["unit"] == "output tokens/s"
    assert len(d["generated_token_ids"][0][0]) == 4


@pytest.mark.parametrize("rotary", [True, False])
def test_cache_matches_recomputing_the_whole_sequence(rotary: bool) -> None:
    """Rotary (offset by the cached length) or learned positions (the embedding's running
    offset); a prompt fed in two chunks (the later chunk masked causally over the cache),
    then single tokens: each call's logits equal the uncached model's on the whole
    sequence so far."""
    cfg = TransformerConfig(n_layers=2, hidden=32, heads=4, kv_heads=2 if rotary else None,
                            ffn=64, vocab=50, max_seq_len=32, norm="rms" if rotary else "layer",
                            mlp="swiglu" if rotary else "gelu", rotary_dim=8 if rotary else None)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    stage = GenStage(model, ["embed", "layers.0", "layers.1", "norm", "head"])
    caches = stage.new_caches()
    seq = torch.randint(0, cfg.vocab, (2, 9))
    with torch.inference_mode():
        for a, b in ((0, 3), (3, 6), (6, 7), (7, 8), (8, 9)):
            got = stage(seq[:, a:b], caches)
            want = model(seq[:, :b])[:, a:b]
            assert (got - want).abs().max() < 1e-5
    assert caches["embed"].length == 9 and caches["layers.1.attn"].length == 9
