"""Executes a Plan with real tensors: stage split, worker processes over torch.distributed,
backends `cpu`, `cuda` and `emulated`.

The names below load on first use, so that torch-free parts (`kcloud.runtime.lifecycle`)
import without torch."""

from __future__ import annotations

from importlib import import_module
from typing import Any

_WHERE = {"Backend": "backends", "choose": "backends", "RunReport": "executor",
          "StageReport": "executor", "execute": "executor", "SplitModel": "split",
          "split_model": "split"}

__all__ = ["Backend", "RunReport", "SplitModel", "StageReport", "choose", "execute",
           "split_model"]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(f"kcloud.runtime.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'kcloud.runtime' has no attribute '{name}'")
