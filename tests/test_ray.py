"""Faults on Ray: a worker actor that raises stops the run with one line, and nothing stays."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from kcloud.errors import KCloudError
from kcloud.runtime import execute
from tests.test_runtime import _CRASH, _plan


def test_ray_worker_fault_stops_run(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'kcloud[ray]')")
    assert not ray.is_initialized()
    f = tmp_path / "crash.py"
    f.write_text(_CRASH)
    t0 = time.monotonic()
    with pytest.raises(KCloudError) as info:
        execute(_plan(f"{f}:raises", 2, [1]), n_micro=4, trace_path=None, ray_address="local")
    msg = info.value.message
    assert "\n" not in msg and "stage 1 of replica 0 on local/host-cpu:1core/1 (" in msg
    assert "RuntimeError: device fault" in msg
    assert time.monotonic() - t0 < 90  # Ray's own start included
    assert not ray.is_initialized()  # the local instance it started is stopped


def test_ray_pipeline_generates_the_reference_tokens() -> None:
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'kcloud[ray]')")
    import torch

    from tests.test_generate import _plan as gen_plan
    from tests.test_generate import _reference

    plan = gen_plan([(0, 1), (3, 1)])
    r = execute(plan, mode="real", n_micro=2, trace_path=None, warmup=1, probes=1,
                ray_address="local")
    assert r.executor == "ray" and r.reference_ok and r.measured["tokens_match"]
    for got, ref in zip(r.outputs, _reference(plan, 2), strict=True):
        assert torch.equal(got, ref)
    assert not ray.is_initialized()
