"""Data-set shapes of the published benchmarks K-Cloud calibrates against.

Where a benchmark's result depends on its data set's lengths (and the published row leaves them
blank), these are the lengths used. Each says where it comes from and whether it is estimated.

The same workloads shape what `kcloud predict` and `kcloud plan` cost: a zoo model that is
published on a benchmark runs that benchmark's workload by default, so the figure a user gets
is the one calibrated against the published result; `--workload none` gives the raw default
lengths, and explicit lengths (`--input-tokens`, ...) override a workload's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from kcloud.errors import KCloudError

NONE = "none"  # the workload name that asks for no workload: the raw default lengths


@dataclass(frozen=True)
class Workload:
    name: str
    input_tokens: int
    output_tokens: int | None
    source: str
    estimated: bool
    beams: int = 1  # beam-search width of the benchmark's generation


# Keyed by zoo model name (the benchmark that model is published on).
BENCHMARK_WORKLOADS: dict[str, Workload] = {
    "llama-2-70b": Workload(
        name="openorca",
        input_tokens=600,
        output_tokens=294,
        source=(
            "MLPerf Inference llama2-70b (OpenOrca, 24,576 samples, inputs <= 1,024 tokens): "
            "output 294 tokens/sample is the reference TOKENS_PER_SAMPLE (294.45); the mean "
            "input length is not published with the results and is taken as 600 (estimated)"
        ),
        estimated=True,
    ),
    "gpt-j-6b": Workload(
        name="cnn-dailymail",
        input_tokens=900,
        output_tokens=65,
        source=(
            "MLPerf Inference gpt-j (CNN-DailyMail v3.0.0, 13,368 samples, inputs <= 1,919 "
            "tokens, outputs <= 128): articles average ~780 words (~900 tokens with the "
            "instruction); the reference GEN_LEN of 4,016,878 characters is ~300 characters "
            "(~65 tokens) per summary (both estimated); generation is beam search with 4 "
            "beams (benchmark rules)"
        ),
        estimated=True,
        beams=4,
    ),
    "bert-large": Workload(
        name="squad-v1.1",
        input_tokens=175,
        output_tokens=None,
        source=(
            "MLPerf Inference BERT-99 (SQuAD v1.1, 10,833 features padded to 384): optimized "
            "harnesses skip the padding, so compute follows the mean unpadded length, ~175 "
            "tokens (question + context window, estimated)"
        ),
        estimated=True,
    ),
}

WORKLOADS: dict[str, Workload] = {w.name: w for w in BENCHMARK_WORKLOADS.values()}


@dataclass(frozen=True)
class Shape:
    """The lengths a prediction or plan runs with, and the workload they come from."""

    workload: str  # a workload name, or "none"
    input_tokens: int | None  # None: the model's own default
    output_tokens: int | None
    beams: int = 1
    source: str = ""
    estimated: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        lengths = "/".join("default" if v is None else str(v)
                           for v in (self.input_tokens, self.output_tokens)
                           if v is not None or self.output_tokens is not None)
        if self.workload == NONE:
            return f"none (raw lengths{': ' + lengths if lengths else ''})"
        beams = f", beam search x{self.beams}" if self.beams > 1 else ""
        est = ", estimated" if self.estimated else ""
        return f"{self.workload} ({lengths} tokens{beams}{est})"


def default_workload(model: str) -> str:
    """The workload a model runs by default: its benchmark's, else none."""
    wl = BENCHMARK_WORKLOADS.get(model)
    return wl.name if wl else NONE


def resolve(model: str, workload: str | None = None, *, input_tokens: int | None = None,
            output_tokens: int | None = None, is_llm: bool = True) -> Shape:
    """The lengths `model` runs with under `workload` (None: the model's default workload).

    Explicit lengths override the workload's; an encoder takes only the input length.
    """
    name = default_workload(model) if workload is None else workload.strip().lower()
    if name == NONE:
        return Shape(NONE, input_tokens, output_tokens if is_llm else None)
    wl = WORKLOADS.get(name)
    if wl is None:
        raise KCloudError(f"unknown workload '{workload}'",
                          f"use one of: {', '.join([*WORKLOADS, NONE])}")
    out = (output_tokens or wl.output_tokens) if is_llm else None
    if is_llm and out is None:
        raise KCloudError(f"workload {wl.name} has no output length, {model} generates",
                          "give --output-tokens or another --workload")
    return Shape(wl.name, input_tokens or wl.input_tokens, out,
                 beams=wl.beams if is_llm else 1, source=wl.source, estimated=wl.estimated)
