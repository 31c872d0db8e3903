"""Capture time and memory of Llama-2-70B on the meta device (measured on this host).

    python benchmarks/bench_capture.py [--model llama-2-70b] [--seq-len 2048] [--phase prefill]

Builds the model on the meta device and captures it, twice: once timed (wall clock and the
growth of the process's peak resident set), once under tracemalloc (peak Python heap). No
weight is allocated, so both memory figures stay small while the model holds ~69e9 parameters.
"""

from __future__ import annotations

import argparse
import gc
import platform
import resource
import sys
import time
import tracemalloc

from kcloud.graph.layergraph import LayerGraph
from kcloud.graph.zoo import capture_model


def _maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def main() -> None:
    p = argparse.ArgumentParser(description="Capture time and memory of a zoo model.")
    p.add_argument("--model", default="llama-2-70b")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--phase", default="prefill", choices=("prefill", "decode"))
    p.add_argument("--kv-len", type=int, default=None)
    p.add_argument("--batch", type=int, default=1)
    a = p.parse_args()
    seq = None if a.phase == "decode" else a.seq_len

    def run() -> LayerGraph:
        return capture_model(a.model, batch=a.batch, seq_len=seq, phase=a.phase,
                             kv_len=a.kv_len, cached=False)

    capture_model("tiny-gpt", cached=False)  # imports and first-call costs out of the way
    gc.collect()
    rss0 = _maxrss_bytes()
    t0 = time.perf_counter()
    graph = run()
    wall = time.perf_counter() - t0
    rss_delta = _maxrss_bytes() - rss0
    del graph
    gc.collect()
    tracemalloc.start()
    graph = run()
    _, heap_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    kv = f", KV cache {graph.kv_len}" if graph.kv_len is not None else ""
    print(f"host: {platform.machine()}, Python {platform.python_version()}")
    print(f"model: {a.model} ({graph.phase}, batch {graph.batch}, seq {graph.seq_len}{kv})")
    print(f"graph: {len(graph.layers)} layers, {graph.total_params / 1e9:.2f}e9 params, "
          f"{graph.total_flops / 1e12:.1f} TFLOPs, {graph.total_weight_bytes() / 1e9:.0f} GB "
          "of weights described, none allocated")
    print(f"measured: capture (build on meta + trace + shape propagation) {wall:.2f} s wall")
    print(f"measured: peak RSS growth {rss_delta / 2**20:.1f} MiB, "
          f"peak Python heap (tracemalloc) {heap_peak / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
