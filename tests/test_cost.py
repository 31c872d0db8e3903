"""The cost model's physics on synthetic graphs (no zoo, no catalog needed)."""

from __future__ import annotations

import pytest

from kcloud.errors import FitError, PrecisionError
from kcloud.hardware.cost import CLASS_PRIORS, Calibration, forward_cost, layer_table
from kcloud.hardware.device import DeviceKind
from kcloud.precision import Precision
from kcloud.predict import predict_graph
from tests.conftest import make_device, mlp_graph

PARAMS = CLASS_PRIORS[DeviceKind.NPU]


def test_large_batch_is_compute_bound_at_calibrated_efficiency():
    g = mlp_graph()
    dev = make_device(bw=10e12)
    c = forward_cost(g, dev, Precision.INT8, 4096, PARAMS)
    assert c.bound == "compute"
    achieved = c.flops / (c.time_s - c.overhead_s)
    # matmuls dominate: achieved rate is the calibrated share of peak (elementwise adds a bit)
    assert achieved == pytest.approx(dev.peak(Precision.INT8) * PARAMS.matrix_eff, rel=0.1)


def test_batch_one_is_memory_bound_and_weights_dominate():
    g = mlp_graph(hidden=4096)
    dev = make_device(bw=100e9)
    c = forward_cost(g, dev, Precision.FP16, 1, PARAMS)
    assert c.bound == "memory"
    # all weights are read once from DRAM at fp16
    assert c.dram_bytes == pytest.approx(g.total_params * 2, rel=0.05)


def test_weights_resident_in_sram_are_not_read_from_dram():
    g = mlp_graph(n_layers=2, hidden=512)  # 4 M params = 4 MB at int8
    small = make_device(sram=None)
    big = make_device(sram=64e6)
    c_small = forward_cost(g, small, Precision.INT8, 1, PARAMS)
    c_big = forward_cost(g, big, Precision.INT8, 1, PARAMS)
    assert c_big.dram_bytes < 0.05 * c_small.dram_bytes
    assert c_big.time_s < c_small.time_s


def test_throughput_rises_with_batch_then_saturates():
    g = mlp_graph(hidden=2048)
    dev = make_device()
    thr = [b / forward_cost(g, dev, Precision.INT8, b, PARAMS).time_s for b in (1, 16, 256, 4096)]
    assert thr == sorted(thr)
    assert thr[-1] / thr[-2] < 1.3  # saturated near the compute roof


def test_power_is_between_idle_and_max_and_grows_with_load():
    g = mlp_graph()
    dev = make_device()
    light = forward_cost(g, dev, Precision.INT8, 1, PARAMS).power_w(dev)
    heavy = forward_cost(g, dev, Precision.INT8, 2048, PARAMS).power_w(dev)
    assert dev.idle_power_w.value <= light < heavy <= dev.max_power_w.value


def test_tensor_parallel_splits_work_and_adds_communication():
    g = mlp_graph(hidden=4096)
    dev = make_device()
    one = forward_cost(g, dev, Precision.INT8, 64, PARAMS)
    four = forward_cost(g, dev, Precision.INT8, 64, PARAMS, tp=4)
    assert four.comm_s > 0
    assert four.weight_bytes == pytest.approx(one.weight_bytes / 4)
    assert four.time_s < one.time_s


def test_stage_costs_add_up_to_the_whole_graph():
    g = mlp_graph(n_layers=6)
    dev = make_device()
    t = layer_table(g, dev, Precision.INT8, 8, PARAMS)
    whole = t.stage(0, 6).time_s
    parts = t.stage(0, 3).time_s + t.stage(3, 6).time_s
    # splitting adds one more fixed per-inference overhead, nothing else
    assert parts - whole == pytest.approx(PARAMS.inference_overhead_s, rel=1e-6)


def test_precision_falls_back_visibly_or_is_refused():
    g = mlp_graph()
    dev = make_device(precisions=(Precision.FP16,))
    p = predict_graph(g, dev, "offline", precision=Precision.FP8, calibration=Calibration())
    assert p.precision_used == "fp16" and p.notes
    int8_only = make_device(precisions=(Precision.INT8,))
    with pytest.raises(PrecisionError):
        predict_graph(g, int8_only, "offline", precision=Precision.FP32, calibration=Calibration())


def test_offline_picks_best_batch_and_single_stream_uses_one():
    g = mlp_graph()
    dev = make_device()
    off = predict_graph(g, dev, "offline", calibration=Calibration())
    ss = predict_graph(g, dev, "single-stream", calibration=Calibration())
    assert ss.batch == 1 and off.batch > 1
    assert off.throughput > ss.throughput
    assert off.figures == "modeled"
    assert off.energy_per_item_j == pytest.approx(off.power_w / off.throughput)


def test_model_too_big_for_memory_is_a_clear_error():
    g = mlp_graph(hidden=8192, n_layers=8)  # 4.3 G params
    dev = make_device(mem=1e9)
    with pytest.raises(FitError, match="does not fit"):
        predict_graph(g, dev, "offline", precision=Precision.INT8, calibration=Calibration())


def test_estimated_catalog_figure_marks_the_prediction():
    g = mlp_graph()
    p = predict_graph(g, make_device(est_bw=True), "offline", calibration=Calibration())
    assert p.estimated and "memory_bw" in p.estimated_fields
    q = predict_graph(g, make_device(), "offline", calibration=Calibration())
    assert not q.estimated


def test_serial_share_adds_memory_to_compute_instead_of_hiding_it():
    from dataclasses import replace

    g = mlp_graph(hidden=1024)
    dev = make_device(bw=100e9, sram=None)
    overlap = replace(PARAMS, serial_share=0.0)
    serial = replace(PARAMS, serial_share=1.0)
    t = layer_table(g, dev, Precision.FP16, 16, overlap)
    compute, memory = float(t.compute.sum()), float(t.mem_str.sum())
    both = compute + memory
    a = forward_cost(g, dev, Precision.FP16, 16, overlap)
    b = forward_cost(g, dev, Precision.FP16, 16, serial)
    # with overlap an op takes the longer of its two times; without, their sum
    assert a.time_s - a.overhead_s < both * 0.999
    assert b.time_s - b.overhead_s == pytest.approx(both, rel=1e-9)


def test_eager_elementwise_ops_cost_a_kernel_each():
    from dataclasses import replace

    g = mlp_graph(n_layers=3)
    dev = make_device()
    fused = replace(PARAMS, elementwise_kernels=0.0)
    eager = replace(PARAMS, elementwise_kernels=1.0)
    a = forward_cost(g, dev, Precision.FP16, 1, fused)
    b = forward_cost(g, dev, Precision.FP16, 1, eager)
    # one elementwise op per layer: 3 more kernels
    assert b.overhead_s - a.overhead_s == pytest.approx(3 * PARAMS.kernel_overhead_s)
