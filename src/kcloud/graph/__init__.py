"""Capture of models into LayerGraphs, and the model zoo.

`kcloud.graph.layergraph` (the vocabulary) imports nothing heavy; the rest needs torch and is
loaded on first use, so that `from kcloud.graph import capture_model` works without making
`import kcloud.graph.layergraph` pay for torch. The capture function itself is
`kcloud.graph.capture.capture` (the name `kcloud.graph.capture` is its module).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kcloud.graph.layergraph import Layer, LayerGraph, Op, OpClass, TPGroup, TPStyle

if TYPE_CHECKING:
    from kcloud.graph.layering import trace_layers
    from kcloud.graph.loaders import capture_file, load_model_spec
    from kcloud.graph.onnx_graph import capture_onnx
    from kcloud.graph.zoo import ModelInfo, build, capture_model, list_models, model_info

_LAZY = {
    "trace_layers": "kcloud.graph.layering",
    "load_model_spec": "kcloud.graph.loaders",
    "capture_file": "kcloud.graph.loaders",
    "capture_onnx": "kcloud.graph.onnx_graph",
    "ModelInfo": "kcloud.graph.zoo",
    "build": "kcloud.graph.zoo",
    "capture_model": "kcloud.graph.zoo",
    "list_models": "kcloud.graph.zoo",
    "model_info": "kcloud.graph.zoo",
}

__all__ = [
    "Layer", "LayerGraph", "ModelInfo", "Op", "OpClass", "TPGroup", "TPStyle", "build",
    "capture_file", "capture_model", "capture_onnx", "list_models",
    "load_model_spec", "model_info", "trace_layers",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kcloud.graph' has no attribute '{name}'")
    return getattr(importlib.import_module(module), name)
