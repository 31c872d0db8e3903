"""Emulation at fleet scale: `kcloud run --mode emulated` of plans with many replicas, as whole
commands.

    python benchmarks/bench_emulation.py [--model mlp] [--runs 1]

- the 56-replica plan of a small model on `k-cloud-rack` (every device of the rack one replica:
  `kcloud plan --slo-ms 10000`, a latency bound loose enough that the slower types join);
  target < 20 s of wall time (was about 3 minutes with one worker process per device, 34 s
  loaded after replicas of one configuration computed once).
- the 1,024-device plan of the same model on the 4-type cluster of `bench_planner.py` (32 nodes
  x 8 each of H100, A100, RNGD, ATOM); target < 60 s (it could not run before).

Each run is a fresh process: torch's import, the model's build and the reference check are in
the figure. The plan is made first and timed apart. Wall times are measured; the run's own
figures are modeled for the emulated devices (the report says which replicas computed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_planner import big_cluster_doc

TARGETS = {"k-cloud-rack": 20.0, "hetero-1024": 60.0}
BASELINES = {"k-cloud-rack": "about 180 s with a process per device; 34 s loaded before",
             "hetero-1024": "could not run (a process per device)"}


def _kcloud(args: list[str], cwd: str) -> tuple[float, dict[str, Any]]:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "kcloud.cli", *args, "--json"], cwd=cwd,
                         capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"kcloud {' '.join(args)} failed: {out.stderr.strip()}")
    return wall, json.loads(out.stdout)


def one(model: str, cluster: str, label: str, tmp: str, runs: int) -> dict[str, Any]:
    plan_file = str(Path(tmp) / f"{label}-{model}.json")
    plan_s, doc = _kcloud(["plan", "--model", model, "--cluster", cluster, "--slo-ms", "10000",
                           "-o", plan_file], tmp)
    replicas = len(doc["plan"]["replicas"])
    devices = sum(len(s["devices"]) for r in doc["plan"]["replicas"] for s in r["stages"])
    walls, rep = [], {}
    for _ in range(runs):
        wall, rep = _kcloud(["run", plan_file, "--mode", "emulated", "--trace",
                             str(Path(tmp) / "trace.json")], tmp)
        walls.append(wall)
    wall = sorted(walls)[len(walls) // 2]
    target = TARGETS[label]
    note = next((n for n in rep["notes"] if "replicas computed" in n), "every replica computed")
    print(f"{model} on {label}: {replicas} replicas on {devices} devices "
          f"(plan {plan_s:.1f} s measured)")
    print(f"  kcloud run --mode emulated: {wall:.1f} s wall (measured, median of {runs}; "
          f"target < {target:g} s: {'met' if wall < target else 'MISSED'}; "
          f"before: {BASELINES[label]})")
    print(f"  outputs equal to the reference: {rep['reference_ok']} "
          f"(max abs error {rep['max_abs_error']:.2g}); {note}")
    pred = rep["predicted"]
    print(f"  plan throughput (modeled): {pred['throughput']:,.0f} {pred['unit']}")
    return {"model": model, "cluster": label, "replicas": replicas, "devices": devices,
            "run_wall_s": wall, "plan_wall_s": plan_s, "reference_ok": rep["reference_ok"],
            "target_s": target}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mlp", help="a zoo model that runs on the CPU")
    ap.add_argument("--runs", type=int, default=1, help="runs of each command (median)")
    ap.add_argument("--json", action="store_true", help="also print one JSON line")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="kcloud-emu-") as tmp:
        os.environ.setdefault("KCLOUD_CACHE_DIR", str(Path(tmp) / "cache"))
        big = Path(tmp) / "hetero-1024.yaml"
        big.write_text(yaml.safe_dump(big_cluster_doc(32)))
        out = [one(a.model, "k-cloud-rack", "k-cloud-rack", tmp, a.runs),
               one(a.model, str(big), "hetero-1024", tmp, a.runs)]
    if a.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
