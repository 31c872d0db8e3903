"""Shared test fixtures: small synthetic graphs and devices, and an isolated cache."""

from __future__ import annotations

import os

import pytest

from kcloud.graph.layergraph import Layer, LayerGraph, Op, OpClass, TPGroup, TPStyle
from kcloud.hardware.device import Device, DeviceKind, Figure
from kcloud.precision import Precision

# Ray reads its authentication mode once per process: the two-node tests must connect without a
# token, so every Ray instance the suite starts (local ones included) runs with it disabled.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    # Keep the host micro-benchmark cache in one temp dir for the whole session.
    cache = tmp_path_factory.getbasetemp() / "kcloud-cache"
    monkeypatch.setenv("KCLOUD_CACHE_DIR", str(cache))


def fig(v: float, est: bool = False) -> Figure:
    return Figure(v, "test", est)


def make_device(
    id: str = "test-npu",
    kind: DeviceKind = DeviceKind.NPU,
    peak: float = 100e12,
    bw: float = 1e12,
    mem: float = 16e9,
    sram: float | None = None,
    precisions: tuple[Precision, ...] = (Precision.INT8, Precision.FP16),
    max_w: float = 100.0,
    idle_w: float = 20.0,
    domestic: bool = True,
    price: float | None = 1.0,
    est_bw: bool = False,
) -> Device:
    peaks = {p: fig(peak * (2.0 if p.bytes <= 1 else 1.0)) for p in precisions}
    return Device(
        id=id, name=id, vendor="test", kind=kind, year=2025, domestic=domestic,
        peak_flops=peaks, memory_bytes=fig(mem), memory_bw=fig(bw, est_bw),
        max_power_w=fig(max_w), idle_power_w=fig(idle_w),
        sram_bytes=fig(sram) if sram else None, host_link_bw=fig(32e9),
        price_per_hour=fig(price) if price else None,
    )


def mlp_graph(n_layers: int = 4, hidden: int = 1024, batch: int = 1, tokens: int = 1) -> LayerGraph:
    """n transformer-MLP-like layers: hidden -> 4h -> hidden, column/row pair each."""
    layers = []
    for i in range(n_layers):
        w1, w2 = hidden * 4 * hidden, 4 * hidden * hidden
        t = batch * tokens
        ops = (
            Op(OpClass.MATMUL, 2.0 * t * w1, w1, t * hidden, t * 4 * hidden, name="up"),
            Op(OpClass.ELEMENTWISE, 8.0 * t * 4 * hidden, 0, t * 4 * hidden, t * 4 * hidden),
            Op(OpClass.MATMUL, 2.0 * t * w2, w2, t * 4 * hidden, t * hidden, name="down"),
        )
        layers.append(Layer(
            index=i, name=f"layers.{i}", kind="MLP", ops=ops, params=w1 + w2,
            cut_elems=t * hidden,
            tp=(TPGroup(TPStyle.MLP, (f"layers.{i}.up",), (f"layers.{i}.down",), 8, w1 + w2,
                        t * hidden),),
        ))
    return LayerGraph(model="synthetic-mlp", layers=tuple(layers), batch=batch,
                      seq_len=tokens, input_elems=batch * tokens * hidden,
                      output_elems=batch * tokens * hidden, meta={"is_llm": False})
