"""Time of 1,000 `predict` calls in-process (measured), after the models are captured once.

Run: python benchmarks/bench_predict.py
"""

from __future__ import annotations

import time

from kcloud.predict import predict

CASES = [
    ("resnet50", "nvidia-a100-sxm-80gb", "offline"),
    ("resnet50", "rebellions-atom", "single-stream"),
    ("bert-large", "nvidia-h100-sxm", "offline"),
    ("llama-3.1-8b", "furiosa-rngd", "offline"),
    ("llama-2-7b", "nvidia-l40s", "single-stream"),
]
CALLS = 1000


def main() -> None:
    t0 = time.perf_counter()
    for model, device, scenario in CASES:  # warm: capture each graph once (cached)
        predict(model, device, scenario)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(CALLS):
        model, device, scenario = CASES[i % len(CASES)]
        predict(model, device, scenario)
    total = time.perf_counter() - t0
    print(f"first calls (capture + predict, {len(CASES)} models): {warm:.2f} s (measured)")
    print(f"{CALLS} predict calls in-process: {total:.3f} s total, "
          f"{total / CALLS * 1e3:.3f} ms per call (measured)")


if __name__ == "__main__":
    main()
