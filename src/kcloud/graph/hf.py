"""Local Hugging Face model directories of the Llama family, offline.

A directory with `config.json` (`model_type: llama`), `*.safetensors` weights and a
`tokenizer.json` is a model K-Cloud captures, plans, splits and serves: its config maps onto the
zoo's own `Transformer` (RMSNorm, rotary, SwiGLU, grouped-query attention), and its weights onto
that module's parameter names, so every layer above treats it as a zoo model whose name is the
directory's path. Nothing here reaches a hub, and nothing in the directory runs as code:
`config.json` and the weights are read as data (safetensors), and `trust_remote_code` is never set.

`write_tiny_llama` makes such a directory with random weights and a byte-pair tokenizer trained
on a short built-in text, for trying K-Cloud (and testing it) on a machine with no weights.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from kcloud.errors import CaptureError
from kcloud.graph.models.transformer import TransformerConfig

# Hugging Face Llama parameter names -> the zoo Transformer's (per layer: `layers.{i}.`).
_LAYER_NAMES = {
    "self_attn.q_proj.weight": "attn.q_proj.weight",
    "self_attn.k_proj.weight": "attn.k_proj.weight",
    "self_attn.v_proj.weight": "attn.v_proj.weight",
    "self_attn.o_proj.weight": "attn.o_proj.weight",
    "self_attn.q_proj.bias": "attn.q_proj.bias",
    "self_attn.k_proj.bias": "attn.k_proj.bias",
    "self_attn.v_proj.bias": "attn.v_proj.bias",
    "self_attn.o_proj.bias": "attn.o_proj.bias",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
    "mlp.gate_proj.bias": "mlp.gate_proj.bias",
    "mlp.up_proj.bias": "mlp.up_proj.bias",
    "mlp.down_proj.bias": "mlp.down_proj.bias",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "mlp_norm.weight",
}


def is_hf_dir(spec: str) -> bool:
    """Whether `spec` names a local directory holding a `config.json`."""
    try:
        return (Path(spec) / "config.json").is_file()
    except (OSError, ValueError):
        return False


def _read_config(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CaptureError(f"cannot read {path / 'config.json'}: {exc}",
                           "give a Hugging Face model directory saved with save_pretrained"
                           ) from None
    if not isinstance(cfg, dict):
        raise CaptureError(f"{path / 'config.json'} is not a JSON object",
                           "give a Hugging Face model directory saved with save_pretrained")
    return cfg


@functools.cache
def _config(path: str, mtime: float) -> tuple[TransformerConfig, dict[str, Any]]:
    raw = _read_config(Path(path))
    kind = raw.get("model_type")
    if kind != "llama":
        raise CaptureError(f"{path} holds a '{kind}' model; K-Cloud loads the Llama family",
                           "give a directory whose config.json has model_type 'llama'")
    try:
        hidden, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
        head_dim = int(raw.get("head_dim") or hidden // heads)
        if head_dim * heads != hidden:
            raise CaptureError(f"{path}: head_dim {head_dim} x {heads} heads is not the hidden "
                               f"size {hidden}", "give a Llama config with hidden = heads x "
                               "head_dim")
        rope = raw.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default" or raw.get("rope_scaling"):
            raise CaptureError(f"{path}: rope scaling '{rope.get('rope_type')}' is not "
                               "supported", "give a Llama config with default rotary "
                               "embeddings")
        theta = float(rope.get("rope_theta") or raw.get("rope_theta") or 10000.0)
        bias = bool(raw.get("attention_bias", False))
        cfg = TransformerConfig(
            n_layers=int(raw["num_hidden_layers"]), hidden=hidden, heads=heads,
            kv_heads=int(raw.get("num_key_value_heads") or heads),
            ffn=int(raw["intermediate_size"]), vocab=int(raw["vocab_size"]),
            max_seq_len=int(raw.get("max_position_embeddings", 2048)), norm="rms",
            norm_eps=float(raw.get("rms_norm_eps", 1e-6)), mlp="swiglu", rotary_dim=head_dim,
            rope_theta=theta, qkv_bias=bias, out_bias=bias,
            mlp_bias=bool(raw.get("mlp_bias", False)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CaptureError(f"{path}/config.json lacks or mistypes {exc}",
                           "give a Llama config saved with save_pretrained") from None
    if raw.get("hidden_act", "silu") != "silu":
        raise CaptureError(f"{path}: activation '{raw.get('hidden_act')}' is not supported",
                           "give a Llama config with hidden_act 'silu'")
    return cfg, raw


def hf_config(spec: str) -> tuple[TransformerConfig, dict[str, Any]]:
    """The zoo TransformerConfig of a Llama directory, and its raw config.json."""
    path = Path(spec).resolve()
    return _config(str(path), (path / "config.json").stat().st_mtime)


def hf_state_dict(spec: str, n_layers: int, tied: bool) -> dict[str, Any]:
    """The directory's weights (every `*.safetensors` file), under the zoo Transformer's names."""
    from safetensors.torch import load_file

    files = sorted(Path(spec).glob("*.safetensors"))
    if not files:
        raise CaptureError(f"{spec} holds no *.safetensors weights",
                           "save the model with save_pretrained(safe_serialization=True)")
    out: dict[str, Any] = {}
    for f in files:
        for name, t in load_file(str(f), device="cpu").items():
            out[_zoo_name(name, n_layers)] = t
    if tied and "head.weight" not in out and "embed.tok.weight" in out:
        out["head.weight"] = out["embed.tok.weight"]
    return out


def _zoo_name(name: str, n_layers: int) -> str:
    if name.startswith("model."):
        name = name[len("model."):]
    if name == "embed_tokens.weight":
        return "embed.tok.weight"
    if name == "norm.weight":
        return "norm.weight"
    if name == "lm_head.weight":
        return "head.weight"
    if name.startswith("layers."):
        _, idx, rest = name.split(".", 2)
        if rest in _LAYER_NAMES and 0 <= int(idx) < n_layers:
            return f"layers.{idx}.{_LAYER_NAMES[rest]}"
    raise CaptureError(f"weight '{name}' is not part of a Llama model",
                       "give a LlamaForCausalLM directory")


# ---- a small directory for trying K-Cloud offline --------------------------------------------

_CORPUS = (
    "K-Cloud runs AI models on heterogeneous accelerators: neural processing units, "
    "processing in memory, graphics processors and CPUs. A plan splits a model into stages, "
    "each stage on a group of devices, and the engine serves requests step by step. "
    "Public safety, health, education and defence services answer questions, find objects in "
    "images and read documents. The quick brown fox jumps over the lazy dog. "
    "0123456789 + - * / = ( ) [ ] { } < > , . ; : ! ? ' \" "
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def write_tiny_llama(
    path: str | Path, *, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
    ffn: int = 172, vocab: int = 384, context: int = 512, seed: int = 0,
) -> Path:
    """A small random-weight `LlamaForCausalLM` directory with a trained byte-pair tokenizer and
    a chat template, saved with `save_pretrained` (safetensors). Takes about a second."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    cfg = LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=hidden, intermediate_size=ffn,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=context, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=tok.token_to_id("<s>"), eos_token_id=tok.token_to_id("</s>"),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
        # Wider weights than the default init (std 0.02), so that greedy tokens vary with the
        # prompt instead of repeating one token.
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 0.2)
    model.save_pretrained(out, safe_serialization=True)
    return out
