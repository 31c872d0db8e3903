"""The model zoo: well-known models built from their published configs, no weights downloaded.

`build` makes a module and example inputs, on the meta device (shapes only) or, for the small
models, on the CPU with random weights; `capture_model` turns a zoo model into a LayerGraph.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kcloud.errors import CaptureError
from kcloud.graph import hf
from kcloud.graph.capture import capture
from kcloud.graph.layergraph import LayerGraph
from kcloud.graph.models.mlp import MLPNet
from kcloud.graph.models.resnet import resnet50, tiny_resnet
from kcloud.graph.models.transformer import Transformer, TransformerConfig
from kcloud.graph.models.unet import UNet


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str
    params: int
    task: str
    is_llm: bool
    runnable_on_cpu: bool
    description: str
    default_seq_len: int | None = None  # tokens per sample (LLMs: prompt length)


@dataclass(frozen=True)
class _Entry:
    name: str
    family: str
    task: str
    description: str
    runnable_on_cpu: bool
    native_dtype: torch.dtype
    config: TransformerConfig | None = None  # token models
    default_seq_len: int | None = None
    image_shape: tuple[int, ...] | None = None  # per-sample input shape of non-token models
    factory: Callable[[], nn.Module] | None = None  # non-token models
    hf: bool = False  # a local Hugging Face directory: weights from its safetensors

    @property
    def is_llm(self) -> bool:
        return self.config is not None and self.config.head == "lm"


def _llama(n_layers: int, hidden: int, heads: int, kv_heads: int, ffn: int, vocab: int,
           max_seq_len: int, theta: float = 10000.0) -> TransformerConfig:
    return TransformerConfig(
        n_layers=n_layers, hidden=hidden, heads=heads, kv_heads=kv_heads, ffn=ffn, vocab=vocab,
        max_seq_len=max_seq_len, norm="rms", norm_eps=1e-5, mlp="swiglu",
        rotary_dim=hidden // heads, rope_theta=theta,
    )


_ZOO: dict[str, _Entry] = {
    e.name: e
    for e in (
        _Entry(
            "resnet50", "resnet", "image-classification",
            "ResNet-50 v1.5 (torchvision), 224x224 ImageNet classifier",
            True, torch.float32, image_shape=(3, 224, 224), factory=resnet50,
        ),
        _Entry(
            "bert-large", "bert", "question-answering",
            "BERT-Large encoder (24 x 1024, 16 heads) with a SQuAD span head, seq 384",
            True, torch.float32, default_seq_len=384,
            config=TransformerConfig(
                n_layers=24, hidden=1024, heads=16, ffn=4096, vocab=30522, max_seq_len=512,
                norm="layer", norm_eps=1e-12, mlp="gelu", rotary_dim=None, post_norm=True,
                causal=False, qkv_bias=True, out_bias=True, mlp_bias=True, head_bias=True,
                type_vocab=2, embed_norm=True, head="qa",
            ),
        ),
        _Entry(
            "gpt-j-6b", "gpt-j", "text-generation",
            "GPT-J 6B: 28 x 4096, 16 heads, rotary (64 dims), parallel attention + MLP",
            False, torch.float16, default_seq_len=2048,
            config=TransformerConfig(
                n_layers=28, hidden=4096, heads=16, ffn=16384, vocab=50400, max_seq_len=2048,
                norm="layer", norm_eps=1e-5, mlp="gelu_tanh", rotary_dim=64,
                parallel_block=True, mlp_bias=True, head_bias=True,
            ),
        ),
        _Entry(
            "llama-2-7b", "llama", "text-generation",
            "Llama 2 7B: 32 x 4096, 32 heads, SwiGLU 11008, vocab 32000",
            False, torch.float16, default_seq_len=2048,
            config=_llama(32, 4096, 32, 32, 11008, 32000, 4096),
        ),
        _Entry(
            "llama-2-70b", "llama", "text-generation",
            "Llama 2 70B: 80 x 8192, 64 heads, 8 KV heads (GQA), SwiGLU 28672",
            False, torch.float16, default_seq_len=2048,
            config=_llama(80, 8192, 64, 8, 28672, 32000, 4096),
        ),
        _Entry(
            "llama-3.1-8b", "llama", "text-generation",
            "Llama 3.1 8B: 32 x 4096, 32 heads, 8 KV heads (GQA), SwiGLU 14336, vocab 128256",
            False, torch.bfloat16, default_seq_len=2048,
            config=_llama(32, 4096, 32, 8, 14336, 128256, 131072, theta=500000.0),
        ),
        _Entry(
            "mlp", "mlp", "classification",
            "residual MLP: 784 -> 4 blocks of 512 (x4 expansion) -> 10 classes",
            True, torch.float32, image_shape=(784,), factory=MLPNet,
        ),
        _Entry(
            "tiny-gpt", "llama", "text-generation",
            "LLaMA-style decoder: 4 x 128, 4 heads, 2 KV heads, vocab 512",
            True, torch.float32, default_seq_len=64,
            config=_llama(4, 128, 4, 2, 344, 512, 256),
        ),
        _Entry(
            "tiny-resnet", "resnet", "image-classification",
            "ResNet with 3 stages of 2 basic blocks (16/32/64 channels), 32x32 images",
            True, torch.float32, image_shape=(3, 32, 32), factory=tiny_resnet,
        ),
        _Entry(
            "tiny-unet", "unet", "segmentation",
            "U-Net with 3 down and 3 up stages (16..128 channels), skips across, 32x32 images",
            True, torch.float32, image_shape=(3, 32, 32), factory=UNet,
        ),
    )
}


def _entry(name: str) -> _Entry:
    entry = _ZOO.get(name) or _ZOO.get(name.lower())
    if entry is None and hf.is_hf_dir(name):
        return _hf_entry(name)
    if entry is None:
        close = difflib.get_close_matches(name.lower(), list(_ZOO), n=1, cutoff=0.5)
        guess = f" (did you mean '{close[0]}'?)" if close else ""
        raise CaptureError(f"unknown model '{name}'{guess}", "run `kcloud models` to list them")
    return entry


def _hf_entry(path: str) -> _Entry:
    """A local Hugging Face Llama directory as a zoo entry named by its path."""
    cfg, raw = hf.hf_config(path)
    params = cfg.n_layers * (4 * cfg.hidden * cfg.hidden + 3 * cfg.hidden * cfg.ffn)
    return _Entry(
        path, "llama", "text-generation",
        f"Hugging Face Llama directory: {cfg.n_layers} x {cfg.hidden}, {cfg.heads} heads, "
        f"{cfg.n_kv_heads} KV heads, vocab {cfg.vocab}",
        params <= HF_RUNNABLE_PARAMS, _HF_DTYPES.get(str(raw.get("dtype") or
                                                         raw.get("torch_dtype")),
                                                     torch.float32),
        config=cfg, default_seq_len=min(128, cfg.max_seq_len // 2), hf=True,
    )


# A Hugging Face directory runs with real weights on this host up to this size (fp32 on the
# host CPU: 4 bytes a parameter).
HF_RUNNABLE_PARAMS = 2_000_000_000
_HF_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def model_names() -> list[str]:
    return list(_ZOO)


def is_zoo_model(name: str) -> bool:
    """A zoo name, or a local Hugging Face Llama directory (which the zoo builds alike)."""
    return name in _ZOO or name.lower() in _ZOO or hf.is_hf_dir(name)


@functools.cache
def _param_count(name: str) -> int:
    module, _ = build(name, device="meta")
    return sum(p.numel() for p in module.parameters())


def model_info(name: str) -> ModelInfo:
    e = _entry(name)
    return ModelInfo(
        name=e.name, family=e.family, params=_param_count(e.name), task=e.task,
        is_llm=e.is_llm, runnable_on_cpu=e.runnable_on_cpu, description=e.description,
        default_seq_len=e.default_seq_len,
    )


def list_models() -> list[ModelInfo]:
    return [model_info(name) for name in _ZOO]


def resolve_shape(
    name: str, *, seq_len: int | None = None, phase: str | None = None,
    kv_len: int | None = None,
) -> tuple[str, int | None, int | None]:
    """(phase, seq_len, kv_len) a zoo model runs with, defaults filled in and checked."""
    e = _entry(name)
    cfg = e.config
    if cfg is None:
        if phase not in (None, "forward"):
            raise CaptureError(f"{e.name} has no '{phase}' phase", "leave --phase out")
        if seq_len is not None or kv_len is not None:
            raise CaptureError(
                f"{e.name} takes inputs of shape {list(e.image_shape or ())} per sample, "
                "not tokens", "leave --seq-len and --kv-len out",
            )
        return "forward", None, None
    limit = cfg.max_seq_len
    if not e.is_llm:
        if phase not in (None, "forward"):
            raise CaptureError(f"{e.name} is an encoder with no '{phase}' phase",
                               "leave --phase out")
        if kv_len is not None:
            raise CaptureError(f"{e.name} has no KV cache", "leave --kv-len out")
        seq = seq_len or e.default_seq_len or 1
        if not 1 <= seq <= limit:
            raise CaptureError(f"seq_len {seq} is outside 1..{limit} for {e.name}",
                               f"pass --seq-len between 1 and {limit}")
        return "forward", seq, None
    phase = phase or "prefill"
    if phase == "prefill":
        if kv_len is not None:
            raise CaptureError("--kv-len applies to --phase decode",
                               "leave it out for prefill, or pass --phase decode")
        seq = seq_len or e.default_seq_len or 1
        if not 1 <= seq <= limit:
            raise CaptureError(f"prompt of {seq} tokens is outside 1..{limit} for {e.name}",
                               f"pass --seq-len between 1 and {limit}")
        return "prefill", seq, None
    if phase == "decode":
        if seq_len not in (None, 1):
            raise CaptureError(
                f"a decode step takes 1 new token per sequence, not {seq_len}",
                "set the context length with --kv-len instead of --seq-len",
            )
        kv = e.default_seq_len if kv_len is None else kv_len
        if kv is None or not 0 <= kv < limit:
            raise CaptureError(f"KV cache of {kv} tokens is outside 0..{limit - 1} for {e.name}",
                               f"pass --kv-len below {limit}")
        return "decode", 1, kv
    raise CaptureError(f"unknown phase '{phase}' for {e.name}", "use prefill or decode")


def build(
    name: str,
    *,
    device: str | torch.device = "meta",
    batch: int = 1,
    seq_len: int | None = None,
    phase: str | None = None,
    kv_len: int | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """A zoo model and example inputs for it, in eval mode.

    device "meta": shapes only, any model. device "cpu": random weights from `seed` (the same
    weights for every phase), only for models with `runnable_on_cpu`.
    """
    e = _entry(name)
    dev = torch.device(device)
    if batch < 1:
        raise CaptureError(f"batch {batch} is not positive", "pass --batch 1 or more")
    if dev.type != "meta" and not e.runnable_on_cpu:
        raise CaptureError(
            f"{e.name} is too large to build with real weights on this host",
            "build it on the meta device (device='meta') for planning, or pick a model with "
            "runnable_on_cpu",
        )
    phase, seq, kv = resolve_shape(e.name, seq_len=seq_len, phase=phase, kv_len=kv_len)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with dev:
            if e.config is not None:
                module: nn.Module = Transformer(e.config, phase=phase, batch=batch, kv_len=kv or 0)
            else:
                assert e.factory is not None
                module = e.factory()
            module = module.to(dtype=dtype).eval()
            if e.hf and dev.type != "meta":
                assert e.config is not None
                tied = bool(hf.hf_config(e.name)[1].get("tie_word_embeddings", False))
                state = hf.hf_state_dict(e.name, e.config.n_layers, tied)
                missing = sorted(set(module.state_dict()) - set(state))
                if missing:
                    raise CaptureError(f"{e.name} lacks the weights {', '.join(missing[:3])}",
                                       "give a complete LlamaForCausalLM directory")
                module.load_state_dict({k: v.to(dtype) for k, v in state.items()})
            if e.config is not None:
                assert seq is not None
                inputs = torch.randint(0, e.config.vocab, (batch, seq), device=dev)
            else:
                assert e.image_shape is not None
                inputs = torch.randn((batch, *e.image_shape), device=dev, dtype=dtype)
    return module, (inputs,)


def _graph_meta(e: _Entry, module: nn.Module) -> dict[str, Any]:
    meta: dict[str, Any] = {"is_llm": e.is_llm, "family": e.family, "task": e.task}
    cfg = e.config
    if cfg is not None:
        meta.update(
            n_layers=cfg.n_layers, hidden=cfg.hidden, heads=cfg.heads, kv_heads=cfg.n_kv_heads,
            head_dim=cfg.head_dim, ffn=cfg.ffn, vocab=cfg.vocab, max_seq_len=cfg.max_seq_len,
            default_seq_len=e.default_seq_len,
        )
        if e.is_llm:
            meta["kv_elems_per_token"] = cfg.kv_elems_per_token
        else:
            meta["input_shape"] = [e.default_seq_len]
    else:
        meta["input_shape"] = list(e.image_shape or ())
    meta["params"] = sum(p.numel() for p in module.parameters())
    return meta


def capture_model(
    name: str,
    *,
    batch: int = 1,
    seq_len: int | None = None,
    phase: str | None = None,
    kv_len: int | None = None,
    cached: bool = True,
) -> LayerGraph:
    """The LayerGraph of a zoo model, captured on the meta device in its native dtype.

    Graphs are immutable and kept in a small cache; `cached=False` captures afresh.
    """
    e = _entry(name)
    phase, seq, kv = resolve_shape(e.name, seq_len=seq_len, phase=phase, kv_len=kv_len)
    if not cached:
        return _capture(e.name, batch, phase, seq, kv)
    return _capture_cached(e.name, batch, phase, seq, kv)


def _capture(
    name: str, batch: int, phase: str, seq_len: int | None, kv_len: int | None
) -> LayerGraph:
    e = _entry(name)
    module, inputs = build(name, device="meta", batch=batch, seq_len=seq_len, phase=phase,
                           kv_len=kv_len, dtype=e.native_dtype)
    return capture(module, inputs, name=name, batch=batch, seq_len=seq_len, phase=phase,
                   kv_len=kv_len, meta=_graph_meta(e, module))


_capture_cached = functools.lru_cache(maxsize=64)(_capture)
