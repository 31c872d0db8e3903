"""Data-set shapes of the published benchmarks K-Cloud calibrates against.

Where a benchmark's result depends on its data set's lengths (and the published row leaves them
blank), these are the lengths used. Each says where it comes from and whether it is estimated.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Workload:
    input_tokens: int
    output_tokens: int | None
    source: str
    estimated: bool
    beams: int = 1  # beam-search width of the benchmark's generation


# Keyed by zoo model name (the benchmark that model is published on).
BENCHMARK_WORKLOADS: dict[str, Workload] = {
    "llama-2-70b": Workload(
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
