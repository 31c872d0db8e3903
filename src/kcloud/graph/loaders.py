"""Turning a user's model spec into a LayerGraph.

A spec is a zoo name (`llama-2-7b`), a Python file and a factory in it
(`path/to/file.py:factory`, where factory() returns `(module, example_inputs_tuple)`), or an
ONNX file (`model.onnx`). The factory is first called under `torch.device("meta")`, so that no
weight is allocated; if that fails, or the module cannot run on meta tensors, it is called again
and captured with real tensors. Every failure is a one-line CaptureError.

Every graph goes through the on-disk graph cache (`kcloud.graph.cache`): this module imports
torch only when a graph has to be captured, so a command whose graphs are cached never pays for
it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kcloud.errors import CaptureError, one_line
from kcloud.graph.cache import cached_graph
from kcloud.graph.layergraph import LayerGraph

if TYPE_CHECKING:
    from torch import nn

_FORMS = "a zoo name (`kcloud models`), path/to/file.py:factory or model.onnx"


class _FactoryFailed(CaptureError):
    """The user's factory raised."""


def _one_line(exc: BaseException) -> str:
    return one_line(exc)


def runs_code(spec: str) -> bool:
    """Whether loading `spec` runs Python code of the user's (a `file.py:factory`); zoo names
    and ONNX files are data."""
    file_part, colon, _ = spec.rpartition(":")
    if not (colon and file_part.endswith(".py")):
        return False
    from kcloud.graph.zoo import is_zoo_model

    return not is_zoo_model(spec)


def load_model_spec(
    spec: str,
    *,
    batch: int | None = None,
    seq_len: int | None = None,
    phase: str | None = None,
    kv_len: int | None = None,
) -> LayerGraph:
    """The LayerGraph of a zoo model, a `file.py:factory` or an `.onnx` file (cached on disk)."""
    if batch is not None and batch < 1:
        raise CaptureError(f"batch {batch} is not positive", "pass --batch 1 or more")
    return cached_graph(
        spec, lambda: _capture_spec(spec, batch=batch, seq_len=seq_len, phase=phase,
                                    kv_len=kv_len),
        batch=batch, seq_len=seq_len, phase=phase, kv_len=kv_len)


def check_generation(graph: LayerGraph, prompt: int, output_tokens: int) -> None:
    """One-line error when a prompt and the tokens to generate exceed an LLM's context (as its
    graph's `max_seq_len` states it; models without one are checked when captured)."""
    limit = graph.meta.get("max_seq_len")
    if graph.meta.get("is_llm") and limit and prompt + output_tokens > limit:
        raise CaptureError(
            f"a prompt of {prompt} tokens and {output_tokens} output tokens exceed the context "
            f"of {graph.model} ({limit} tokens)",
            f"pass --input-tokens and --output-tokens that sum to {limit} or less")


def _capture_spec(spec: str, *, batch: int | None, seq_len: int | None, phase: str | None,
                  kv_len: int | None) -> LayerGraph:
    from kcloud.graph.onnx_graph import capture_onnx
    from kcloud.graph.zoo import capture_model, is_zoo_model

    if is_zoo_model(spec):
        return capture_model(spec, batch=batch or 1, seq_len=seq_len, phase=phase,
                             kv_len=kv_len)
    if spec.lower().endswith(".onnx"):
        return capture_onnx(spec, batch=batch, seq_len=seq_len, phase=phase, kv_len=kv_len)
    file_part, colon, factory = spec.rpartition(":")
    if colon and file_part.endswith(".py"):
        if not factory.isidentifier():
            raise CaptureError(f"'{factory}' is not a function name",
                               "write the spec as path/to/file.py:factory")
        return capture_file(file_part, factory, batch=batch, seq_len=seq_len, phase=phase,
                            kv_len=kv_len)
    if spec.endswith(".py"):
        raise CaptureError(f"no factory named in '{spec}'",
                           f"write {spec}:factory, with factory() returning "
                           "(module, example_inputs)")
    if "/" in spec or "\\" in spec or Path(spec).suffix:
        raise CaptureError(f"cannot load '{spec}'", f"give {_FORMS}")
    return capture_model(spec)  # raises the zoo's unknown-model error with a did-you-mean


def _import_file(path: Path) -> Any:
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    mod_name = f"kcloud_user_model_{digest}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise CaptureError(f"cannot import {path}: not a Python source file",
                           "fix the file or check the path")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:
        sys.modules.pop(mod_name, None)
        raise CaptureError(f"cannot import {path}: {_one_line(exc)}",
                           "fix the file or check the path") from exc
    finally:
        if folder in sys.path:
            sys.path.remove(folder)
    return module


def _factory(path: Path, name: str) -> Callable[..., Any]:
    if not path.is_file():
        raise CaptureError(f"no such file: {path}", "check the path")
    module = _import_file(path)
    fn = getattr(module, name, None)
    if fn is None or not callable(fn):
        found = sorted(
            k for k, v in vars(module).items()
            if inspect.isfunction(v) and v.__module__ == module.__name__ and not k.startswith("_")
        )
        listed = f"; functions there: {', '.join(found)}" if found else ""
        raise CaptureError(f"{path} has no function '{name}'{listed}",
                           f"define {name}() returning (module, example_inputs) or name another")
    return fn


def _call(fn: Callable[..., Any], label: str, kwargs: dict[str, Any],
          on_meta: bool) -> tuple[nn.Module, tuple[Any, ...]]:
    import torch
    from torch import nn

    try:
        if on_meta:
            with torch.device("meta"):
                result = fn(**kwargs)
        else:
            result = fn(**kwargs)
    except (Exception, SystemExit) as exc:
        raise _FactoryFailed(f"{label}() failed: {_one_line(exc)}", "fix the factory") from exc
    if (
        not isinstance(result, (tuple, list))
        or len(result) != 2
        or not isinstance(result[0], nn.Module)
    ):
        raise CaptureError(
            f"{label}() returned {type(result).__name__}, not (module, example_inputs)",
            "return the model and a tuple of example inputs",
        )
    module, inputs = result
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    elif isinstance(inputs, list):
        inputs = tuple(inputs)
    if not isinstance(inputs, tuple):
        raise CaptureError(
            f"{label}() returned example inputs of type {type(inputs).__name__}",
            "return the example inputs as a tuple of tensors",
        )
    return module, inputs


def _with_batch(inputs: tuple[Any, ...], batch: int) -> tuple[Any, ...]:
    """Example inputs with their leading (batch) axis resized to `batch`."""
    import torch

    tensors = [t for t in inputs if isinstance(t, torch.Tensor) and t.dim() > 0]
    if not tensors:
        return inputs
    b0 = tensors[0].shape[0]
    out = []
    for t in inputs:
        if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == b0 and b0 != batch:
            if t.is_meta:
                t = torch.empty((batch, *t.shape[1:]), dtype=t.dtype, device="meta")
            else:
                t = t[torch.arange(batch) % b0]
        out.append(t)
    return tuple(out)


def capture_file(
    path: str | Path,
    factory: str,
    *,
    batch: int | None = None,
    seq_len: int | None = None,
    phase: str | None = None,
    kv_len: int | None = None,
) -> LayerGraph:
    """Capture the module that `factory()` in a Python file returns.

    The factory may take `batch` and `seq_len` keyword arguments; otherwise the leading axis of
    its example inputs is resized to `batch`.
    """
    import torch


    path = Path(path)
    fn = _factory(path, factory)
    label = f"{path.name}:{factory}"
    params = inspect.signature(fn).parameters
    kwargs: dict[str, Any] = {}
    if batch is not None and "batch" in params:
        kwargs["batch"] = batch
    if seq_len is not None and "seq_len" in params:
        kwargs["seq_len"] = seq_len
    from kcloud.graph.capture import CaptureRunError, capture  # torch: only to capture

    def attempt(on_meta: bool) -> LayerGraph:
        module, inputs = _call(fn, label, kwargs, on_meta)
        if batch is not None and "batch" not in kwargs:
            inputs = _with_batch(inputs, batch)
        module.eval()
        lead = next((t for t in inputs if isinstance(t, torch.Tensor) and t.dim() > 0), None)
        meta = {
            "is_llm": False, "task": "custom", "source": str(path),
            "input_shapes": [list(t.shape) for t in inputs if isinstance(t, torch.Tensor)],
            "params": sum(p.numel() for p in module.parameters()),
        }
        return capture(
            module, inputs, name=label,
            batch=int(lead.shape[0]) if lead is not None else 1,
            seq_len=seq_len, phase=phase or "forward", kv_len=kv_len, meta=meta,
        )

    try:
        return attempt(on_meta=True)
    except (_FactoryFailed, CaptureRunError):
        # The factory or the module needs real tensors (loading data, .item(), nonzero, ...).
        return attempt(on_meta=False)
