"""Rebuilding the model a plan names, with real weights on the host CPU, the same in every
process (seeded), and making its micro-batches."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kcloud.errors import CaptureError, KCloudError
from kcloud.graph import loaders, zoo
from kcloud.graph.layergraph import LayerGraph


def load_runnable(
    spec: str, *, batch: int, seq_len: int | None = None, phase: str | None = None,
    seed: int = 0,
) -> tuple[nn.Module, tuple[Any, ...]]:
    """The module and example inputs (leading axis `batch`) of a zoo name or file.py:factory."""
    if phase == "decode":
        raise KCloudError("the runtime does not run decode-phase plans yet",
                          "plan the prefill phase (--phase prefill) to run it")
    if zoo.is_zoo_model(spec):
        ph = phase if phase in ("prefill", "forward") else None
        if ph == "forward" and zoo.model_info(spec).is_llm:
            ph = None
        module, inputs = zoo.build(spec, device="cpu", batch=batch, seq_len=seq_len, phase=ph,
                                   seed=seed)
        return module.eval(), inputs
    if spec.lower().endswith(".onnx"):
        raise KCloudError(f"the runtime cannot run ONNX models ({spec})",
                          "give a zoo name or path/to/file.py:factory")
    file_part, colon, factory = spec.rpartition(":")
    if not (colon and file_part.endswith(".py")):
        raise CaptureError(f"cannot load '{spec}' to run it",
                           "give a zoo name or path/to/file.py:factory")
    path = Path(file_part)
    fn = loaders._factory(path, factory)
    params = inspect.signature(fn).parameters
    kwargs: dict[str, Any] = {}
    if "batch" in params:
        kwargs["batch"] = batch
    if seq_len is not None and "seq_len" in params:
        kwargs["seq_len"] = seq_len
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module, inputs = loaders._call(fn, f"{path.name}:{factory}", kwargs, on_meta=False)
    if "batch" not in kwargs:
        inputs = loaders._with_batch(inputs, batch)
    return module.eval(), inputs


def load_checkpoint(module: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load a local checkpoint into `module`: a state dict saved with `torch.save` (.pt, .pth,
    .bin; also nested under "state_dict" or "model", with a "module." prefix from data-parallel
    training) or a .safetensors file. Every parameter and buffer must match by name and shape;
    tensors of another dtype are cast."""
    p = Path(path)
    if not p.is_file():
        raise KCloudError(f"checkpoint {p} does not exist", "pass the path of a local file")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(p), device="cpu")
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = " ".join(str(exc).split())[:160]
        raise KCloudError(f"cannot read checkpoint {p.name}: {text}",
                          "save the weights with torch.save(model.state_dict(), path)") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise KCloudError(f"checkpoint {p.name} holds no state dict of tensors",
                          "save the weights with torch.save(model.state_dict(), path)")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    wrong = [f"{k} {list(state[k].shape)} (model: {list(v.shape)})" for k, v in own.items()
             if k in state and state[k].shape != v.shape]

    def few(names: list[str]) -> str:
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    if missing or extra or wrong:
        what = "; ".join(part for part in (
            f"missing {few(missing)}" if missing else "",
            f"unexpected {few(extra)}" if extra else "",
            f"shape {few(wrong)}" if wrong else "") if part)
        raise KCloudError(f"checkpoint {p.name} does not fit the model: {what}",
                          "give the checkpoint of this model (same config and layer names)")
    module.load_state_dict(state)


def layer_graph(spec: str, *, batch: int, seq_len: int | None, phase: str | None,
                kv_len: int | None = None) -> LayerGraph:
    """The LayerGraph the cost model prices (the same cut as the runtime's stages); an LLM's
    decode step (phase "decode", one token over `kv_len` cached) prices generation."""
    ph = phase if phase in ("prefill", "decode") else None
    return loaders.load_model_spec(spec, batch=batch, seq_len=seq_len, phase=ph,
                                   kv_len=kv_len if ph == "decode" else None)


def micro_batches(example: tuple[Any, ...], n: int, seed: int = 1) -> list[tuple[Any, ...]]:
    """`n` micro-batches shaped like `example`: floats ~ N(0, 1), integers (token ids) drawn
    from the example's range; the first is the example itself."""
    g = torch.Generator().manual_seed(seed)
    out: list[tuple[Any, ...]] = [tuple(example)]
    for _ in range(n - 1):
        mb: list[Any] = []
        for t in example:
            if not isinstance(t, torch.Tensor):
                mb.append(t)
            elif t.is_floating_point():
                mb.append(torch.randn(t.shape, generator=g, dtype=t.dtype))
            elif t.dtype == torch.bool or t.numel() == 0:
                mb.append(t.clone())
            else:
                lo, hi = int(t.min()), int(t.max())
                mb.append(torch.randint(lo, hi + 1, t.shape, generator=g, dtype=t.dtype))
        out.append(tuple(mb))
    return out
