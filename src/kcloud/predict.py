"""How fast, at what power and energy, does model M run on device D?

Scenarios (MLPerf's names):
- `offline`: the best throughput at any batch that fits in the device's memory.
- `single-stream`: one request at a time (batch 1): its latency.

LLMs are costed as prefill (the prompt, compute-bound) plus one decode step per generated token
(memory-bound, over a KV cache whose mean length is prompt + half the output); with continuous
batching, prefill chunks fill the compute that memory-bound decode steps leave idle. The KV cache
bounds the batch. Throughput of an LLM is generated tokens per second.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from kcloud.errors import FitError, KCloudError, PrecisionError
from kcloud.graph.layergraph import LayerGraph
from kcloud.hardware.cost import (
    Calibration,
    DeviceParams,
    ForwardCost,
    activation_bytes_per_sample,
    default_calibration,
    tp_max_degree,
    usable_memory,
    weight_bytes,
)
from kcloud.hardware.device import Device, DeviceKind
from kcloud.hardware.steps import StageTables, StepTables, decode_steps, generation_cost
from kcloud.precision import Precision
from kcloud.workloads import Shape
from kcloud.workloads import resolve as resolve_workload

Scenario = Literal["offline", "single-stream"]
SCENARIOS: tuple[str, ...] = ("offline", "single-stream")

# Prefill is processed in chunks of at most this many tokens (as serving engines do), which
# bounds the activation workspace of a large batch.
PREFILL_CHUNK_TOKENS = 8192
DEFAULT_LLM_INPUT = 128
DEFAULT_LLM_OUTPUT = 128


@dataclass(frozen=True)
class Prediction:
    model: str
    device: str
    scenario: str
    precision: str  # what was asked
    precision_used: str  # what the device runs (after a visible fallback)
    batch: int
    throughput: float
    unit: str
    latency_s: float
    power_w: float
    energy_per_item_j: float
    bound: str
    memory_bytes: float  # what the model needs on the device at this batch
    estimated: bool  # a catalog number used is estimated
    estimated_fields: tuple[str, ...]
    calibrated: tuple[str, ...]  # parameters fitted to published results (else class priors)
    notes: tuple[str, ...] = ()
    tp: int = 1  # tensor-parallel degree (figures are per device)
    figures: str = "modeled"
    llm: dict[str, Any] = field(default_factory=dict)  # ttft_s, tpot_s, tokens
    workload: dict[str, Any] | None = None  # the workload and lengths it ran with (Shape)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("estimated_fields", "calibrated", "notes"):
            d[k] = list(d[k])
        if not self.llm:
            d.pop("llm")
        return d


def default_precision(device: Device, is_llm: bool) -> Precision:
    """The inference precision a deployment would pick: 8-bit where the device has it.

    A CPU runs K-Cloud's own runtime, which computes in fp32.
    """
    if device.kind is DeviceKind.CPU and device.supports(Precision.FP32):
        return Precision.FP32
    order = (
        (Precision.FP8, Precision.INT8, Precision.BF16, Precision.FP16, Precision.FP32)
        if is_llm
        else (Precision.INT8, Precision.FP8, Precision.FP16, Precision.BF16, Precision.FP32)
    )
    for p in order:
        if device.supports(p):
            return p
    return next(iter(device.peak_flops))


def resolve_precision(device: Device, asked: Precision) -> tuple[Precision, list[str]]:
    used = device.resolve_precision(asked)
    if used is None:
        have = ", ".join(p.value for p in device.peak_flops)
        raise PrecisionError(
            f"{device.id} cannot run {asked.value} and has no wider precision to fall back to",
            f"use --precision with one of: {have}",
        )
    notes = [] if used == asked else [f"{device.id} has no {asked.value}: runs at {used.value}"]
    return used, notes


def _estimated(device: Device, precision: Precision) -> tuple[str, ...]:
    used = [f"peak_{precision.value}", "memory_bytes", "memory_bw", "max_power_w",
            "idle_power_w", "sram_bytes"]
    figs = device.figures
    return tuple(k for k in used if k in figs and (figs[k].estimated or device.projected))


def batch_candidates(max_batch: int) -> list[int]:
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    out.append(max_batch)
    return out


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Ctx:
    device: Device
    params: DeviceParams
    precision: Precision
    capacity: float


def _check_tp(graph: LayerGraph, tp: int) -> None:
    if tp < 1:
        raise KCloudError(f"tensor-parallel degree {tp} is not positive", "use --tp 1 or more")
    most = tp_max_degree(graph)
    if tp > 1 and (most < tp or most % tp):
        raise KCloudError(
            f"{graph.model} cannot be split {tp}-way tensor-parallel (its layers allow "
            f"degrees dividing {most})",
            "use a --tp that divides it",
        )


def _setup(
    device: Device, scenario: str, precision: Precision | None, is_llm: bool,
    calibration: Calibration | None,
) -> tuple[Precision, Precision, list[str], DeviceParams]:
    """Check the scenario, resolve the precision (visibly), pick the device's parameters."""
    if scenario not in SCENARIOS:
        raise KCloudError(f"unknown scenario '{scenario}'", "use offline or single-stream")
    asked = precision or default_precision(device, is_llm=is_llm)
    used, notes = resolve_precision(device, asked)
    return asked, used, notes, (calibration or default_calibration()).params(device)


def _batches(scenario: str, batch: int | None, max_batch: int, what: str) -> list[int]:
    """Batches to try: 1 for single-stream, the given one, or powers of two up to the limit."""
    if scenario == "single-stream":
        return [1]
    if batch is None:
        return batch_candidates(max_batch)
    if batch > max_batch:
        raise FitError(f"batch {batch} of {what} (at most {max_batch})",
                       f"use --batch {max_batch} or less")
    return [batch]


def _fit_message(model: str, device: Device, need: float, have: float) -> FitError:
    return FitError(
        f"{model} does not fit on {device.id}: needs {need / 1e9:.1f} GB at batch 1, "
        f"the device has {device.memory_bytes.value / 1e9:.1f} GB "
        f"({have / 1e9:.1f} GB usable)",
        "use a lower --precision, a device with more memory, or `kcloud plan` to split it "
        "across devices",
    )


def predict_graph(
    graph: LayerGraph,
    device: Device,
    scenario: str,
    *,
    precision: Precision | None = None,
    batch: int | None = None,
    calibration: Calibration | None = None,
    tp: int = 1,
) -> Prediction:
    """Predict a non-LLM model (one forward pass per item) on one device.

    With `tp` > 1 the model is split tensor-parallel over `tp` such devices; throughput,
    power and energy are then per device (as MLPerf reports multi-accelerator systems).
    """
    asked, used, notes, params = _setup(device, scenario, precision, False, calibration)
    _check_tp(graph, tp)
    w = weight_bytes(graph, used) / tp
    per_sample = activation_bytes_per_sample(graph, used) / tp
    cap = usable_memory(device)
    if w + per_sample > cap:
        raise _fit_message(graph.model, device, w + per_sample, cap)
    max_batch = max(1, min(4096, int((cap - w) // max(per_sample, 1.0))))
    candidates = _batches(scenario, batch, max_batch, f"{graph.model} does not fit on {device.id}")
    best: tuple[float, int, ForwardCost] | None = None
    st = StageTables(StepTables(graph, None, device, used, params, tp))
    for b in candidates:
        cost = st.stage(st.tables.forward_table(b))
        thr = b / cost.time_s / tp
        if best is None or thr > best[0] * 1.0001:
            best = (thr, b, cost)
    assert best is not None
    thr, b, cost = best
    power = cost.power_w(device)
    est = _estimated(device, used)
    return Prediction(
        model=graph.model,
        device=device.id,
        scenario=scenario,
        precision=asked.value,
        precision_used=used.value,
        batch=b,
        throughput=thr,
        unit="samples/s",
        latency_s=cost.time_s,
        power_w=power,
        energy_per_item_j=power / thr,
        bound=cost.bound,
        memory_bytes=w + b * per_sample,
        tp=tp,
        estimated=bool(est),
        estimated_fields=est,
        calibrated=params.fitted,
        notes=tuple(notes),
    )


@dataclass(frozen=True)
class LLMStep:
    batch: int
    prefill: ForwardCost
    decode: ForwardCost
    total_s: float
    tokens_per_s: float


def llm_kv_bytes_per_token(graph: LayerGraph, precision: Precision) -> float:
    per_token = graph.meta.get("kv_elems_per_token")
    if not per_token:
        raise KCloudError(f"{graph.model} has no KV-cache size in its graph metadata",
                          "capture it from the zoo or give an LLM factory that sets it")
    return float(per_token) * max(precision.bytes, 1.0)


def llm_max_batch(
    prefill: LayerGraph, precision: Precision, device: Device, context: int, tp: int = 1
) -> tuple[int, float, float]:
    # `context`: KV-cache tokens held per sequence (all beams included).
    """Largest batch whose weights + KV cache + workspace fit on each of `tp` devices.

    Returns the batch, the weight bytes per device and the KV bytes per sequence per device.
    """
    w = weight_bytes(prefill, precision) / tp
    kv_seq = llm_kv_bytes_per_token(prefill, precision) * context / tp
    seq_len = prefill.seq_len or 1
    work_tok = activation_bytes_per_sample(prefill, precision) / seq_len / tp
    cap = usable_memory(device)

    def need(b: int) -> float:
        return w + b * kv_seq + work_tok * min(b * seq_len, PREFILL_CHUNK_TOKENS)

    if need(1) > cap:
        raise _fit_message(prefill.model, device, need(1), cap)
    lo, hi = 1, 1
    while need(hi * 2) <= cap and hi < 1 << 16:
        hi *= 2
    lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if need(mid) <= cap:
            lo = mid
        else:
            hi = mid
    return lo, w, kv_seq


def llm_step(
    prefill: LayerGraph,
    decode: LayerGraph,
    device: Device,
    precision: Precision,
    params: DeviceParams,
    batch: int,
    output_tokens: int,
    tp: int = 1,
    beams: int = 1,
    overlap: bool = True,
) -> LLMStep:
    """Serve `batch` sequences: prefill them, then decode the rest of `output_tokens`.

    Each decode step advances `beams` hypotheses per sequence (beam search); the output counts
    one sequence of tokens. Tokens/s are per device when `tp` devices share the work. The
    tables and the request's composition are `kcloud.hardware.steps`' (as the planner's).
    """
    st = StageTables(StepTables(prefill, decode, device, precision, params, tp))
    pre = st.stage(st.tables.forward_table(batch))
    dec = st.stage(st.tables.decode_table(batch * beams))
    # Continuous batching with chunked prefill (`overlap`): prompt chunks ride along the
    # decode steps and use the compute those memory-bound steps leave idle.
    idle = max(0.0, dec.time_s - dec.overhead_s - dec.comm_s - dec.busy_s)
    g = generation_cost(pre.time_s, 0.0, dec.time_s, 0.0, output_tokens,
                        overlap_idle_s=idle if overlap else None)
    return LLMStep(batch, pre, dec, float(g.time_s), batch * output_tokens / g.time_s / tp)


def predict_llm(
    prefill: LayerGraph,
    decode: LayerGraph,
    device: Device,
    scenario: str,
    *,
    output_tokens: int,
    precision: Precision | None = None,
    batch: int | None = None,
    calibration: Calibration | None = None,
    tp: int = 1,
    beams: int = 1,
) -> Prediction:
    """Predict an LLM: prefill of the prompt, then one decode step per generated token."""
    asked, used, notes, params = _setup(device, scenario, precision, True, calibration)
    input_tokens = prefill.seq_len or 1
    context = input_tokens + beams * output_tokens
    _check_tp(prefill, tp)
    max_batch, w, kv_seq = llm_max_batch(prefill, used, device, context, tp)
    candidates = _batches(
        scenario, batch, max_batch,
        f"{prefill.model} with {context} tokens of context does not fit on {device.id}",
    )
    best: LLMStep | None = None
    for b in candidates:
        step = llm_step(prefill, decode, device, used, params, b, output_tokens, tp, beams,
                        overlap=scenario != "single-stream")
        if best is None or step.tokens_per_s > best.tokens_per_s * 1.0001:
            best = step
    assert best is not None
    # Energy: the decode steps at their power, the prefill's dynamic power on top (it runs in
    # the decode steps' idle compute), idle power for any time prefill adds beyond them.
    t_pre, t_dec = best.prefill.time_s, decode_steps(output_tokens) * best.decode.time_s
    idle_w = device.idle_power_w.value
    energy = (best.decode.power_w(device) * t_dec
              + (best.prefill.power_w(device) - idle_w) * t_pre
              + idle_w * max(0.0, best.total_s - t_dec))
    power = min(device.max_power_w.value, energy / best.total_s)
    bound = best.decode.bound if t_dec >= t_pre else best.prefill.bound
    est = _estimated(device, used)
    return Prediction(
        model=prefill.model,
        device=device.id,
        scenario=scenario,
        precision=asked.value,
        precision_used=used.value,
        batch=best.batch,
        throughput=best.tokens_per_s,
        unit="tokens/s",
        latency_s=best.total_s,
        power_w=power,
        energy_per_item_j=power / best.tokens_per_s,
        bound=bound,
        memory_bytes=w + best.batch * kv_seq,
        tp=tp,
        estimated=bool(est),
        estimated_fields=est,
        calibrated=params.fitted,
        notes=tuple(notes),
        llm={
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "ttft_s": best.prefill.time_s,
            "tpot_s": best.decode.time_s,
            "prefill_bound": best.prefill.bound,
            "decode_bound": best.decode.bound,
            "max_batch": max_batch,
            "beams": beams,
        },
    )


@dataclass(frozen=True)
class ModelInputs:
    """What a prediction of a model runs on: its graphs at the lengths of its workload."""

    shape: Shape
    graphs: tuple[LayerGraph, ...]  # (forward,) or an LLM's (prefill, decode)

    @property
    def is_llm(self) -> bool:
        return len(self.graphs) == 2


def model_inputs(model: str, workload: str | None = None, *, seq_len: int | None = None,
                 input_tokens: int | None = None,
                 output_tokens: int | None = None) -> ModelInputs:
    """The graphs of `model` (zoo name, file.py:factory or .onnx) at the lengths `workload`
    gives (None: the model's benchmark workload, "none": the raw defaults), explicit lengths
    overriding them. `kcloud predict` and `kcloud calibrate` both start here."""
    from kcloud.graph.loaders import check_generation, load_model_spec

    asked = input_tokens or seq_len
    probe = load_model_spec(model, batch=1, seq_len=asked, phase=None, kv_len=None)
    is_llm = bool(probe.meta.get("is_llm"))
    shape = resolve_workload(model, workload, input_tokens=asked, output_tokens=output_tokens,
                             is_llm=is_llm)
    if not is_llm:
        if shape.input_tokens != asked:
            probe = load_model_spec(model, batch=1, seq_len=shape.input_tokens, phase=None,
                                    kv_len=None)
        return ModelInputs(shape, (probe,))
    prompt = shape.input_tokens or DEFAULT_LLM_INPUT
    out = shape.output_tokens or DEFAULT_LLM_OUTPUT
    shape = replace(shape, input_tokens=prompt, output_tokens=out)
    check_generation(probe, prompt, out)
    prefill = load_model_spec(model, batch=1, seq_len=prompt, phase="prefill", kv_len=None)
    # A decode step (of each beam) attends over the prompt and, on average, half its output.
    decode = load_model_spec(model, batch=1, seq_len=1, phase="decode",
                             kv_len=prompt + out // 2)
    return ModelInputs(shape, (prefill, decode))


def predict(
    model: str,
    device: Device | str,
    scenario: str = "offline",
    *,
    precision: Precision | str | None = None,
    batch: int | None = None,
    seq_len: int | None = None,
    input_tokens: int | None = None,
    output_tokens: int | None = None,
    calibration: Calibration | None = None,
    tp: int = 1,
    workload: str | None = None,
) -> Prediction:
    """Predict `model` (zoo name, file.py:factory or .onnx) on one device (or `tp` of them),
    on `workload`'s lengths (see `model_inputs`)."""
    from kcloud.hardware.catalog import get_device

    dev = get_device(device) if isinstance(device, str) else device
    prec = Precision.parse(precision) if isinstance(precision, str) else precision
    inputs = model_inputs(model, workload, seq_len=seq_len, input_tokens=input_tokens,
                          output_tokens=output_tokens)
    shape = inputs.shape
    if not inputs.is_llm:
        p = predict_graph(inputs.graphs[0], dev, scenario, precision=prec, batch=batch,
                          calibration=calibration, tp=tp)
    else:
        p = predict_llm(inputs.graphs[0], inputs.graphs[1], dev, scenario,
                        output_tokens=shape.output_tokens or DEFAULT_LLM_OUTPUT,
                        precision=prec, batch=batch, calibration=calibration, tp=tp,
                        beams=shape.beams)
    return replace(p, workload=shape.to_dict())
