"""Executes a Plan with real tensors: stage split, worker processes over torch.distributed,
backends `cpu`, `cuda` and `emulated`."""

from __future__ import annotations

from kcloud.runtime.backends import Backend, choose
from kcloud.runtime.executor import RunReport, StageReport, execute
from kcloud.runtime.split import SplitModel, split_model

__all__ = ["Backend", "RunReport", "SplitModel", "StageReport", "choose", "execute",
           "split_model"]
