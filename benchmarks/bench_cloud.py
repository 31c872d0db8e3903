"""Cloud control-plane benchmark: placement, API latency, gateway overhead, restart.

    python benchmarks/bench_cloud.py [--quick]

1. Placement on a 1,000-device fleet (40 RNGD, 30 ATOM-Max, 30 A100 and 25 ATOM nodes of 8)
   under a replayed churn of deployments (Poisson arrivals, exponential lifetimes, mixed sizes:
   single partitions, half and whole cards, tensor-parallel groups of 2, 4 and 8 on one node),
   offered at about 1.2 x the fleet's capacity. The same sequence is replayed with the best-fit
   placer and with first-fit (the baseline); refused requests are dropped, never queued.
   Figures: fraction admitted, devices stranded (free slices on partly held devices, in
   device-equivalents, averaged over arrivals), placements per second (measured).
2. Control-plane API latency, p50/p99 under 50 concurrent clients (`kcloud cloud up` in its own
   process; GET of deployments, one deployment, usage; measured).
3. Gateway overhead: the same completion (tiny-gpt, emulated, 1 token) straight to the engine's
   unix socket and through the gateway, p50 of each (measured).
4. Restart: a control plane with 20 deployments (mlp, real `kcloud serve` engines in
   bubblewrap) is stopped and started again; time until all 20 serve again (measured).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from kcloud.cloud.fleet import Fleet, Group
from kcloud.hardware.cluster import cluster_from_dict

FLEET = {"name": "fleet-1000", "network": {"bandwidth_gbps": 25, "latency_us": 8},
         "nodes": [{"name": "rngd", "count": 40, "devices": {"furiosa-rngd": 8}},
                   {"name": "atommax", "count": 30, "devices": {"rebellions-atom-max": 8}},
                   {"name": "a100", "count": 30, "devices": {"nvidia-a100-sxm-80gb": 8}},
                   {"name": "atom", "count": 25, "devices": {"rebellions-atom": 8}}]}

# (weight, groups): the mix of deployment shapes
SHAPES: list[tuple[float, list[Group]]] = [
    (12, [Group("furiosa-rngd:1core.6gb", 1)]), (8, [Group("rebellions-atom-max:1die.16gb", 1)]),
    (8, [Group("nvidia-a100-sxm-80gb:1g.10gb", 1)]), (7, [Group("furiosa-rngd:2core.12gb", 1)]),
    (5, [Group("nvidia-a100-sxm-80gb:3g.40gb", 1)]), (6, [Group("furiosa-rngd:4core.24gb", 1)]),
    (8, [Group("furiosa-rngd", 1)]), (6, [Group("rebellions-atom", 1)]),
    (6, [Group("nvidia-a100-sxm-80gb", 1)]), (6, [Group("furiosa-rngd", 2)]),
    (5, [Group("rebellions-atom-max", 4)]), (5, [Group("nvidia-a100-sxm-80gb", 4)]),
    (4, [Group("rebellions-atom", 4), Group("rebellions-atom", 4)]),  # a 2-stage pipeline
    (4, [Group("furiosa-rngd", 8)]), (3, [Group("nvidia-a100-sxm-80gb", 8)]),
    (3, [Group("rebellions-atom", 8)]),
]


def _size(f: Fleet, groups: list[Group]) -> float:
    out = 0.0
    for g in groups:
        base, _, part = g.type.partition(":")
        dev = next(d for d in f.devices.values() if d.type == base)
        out += g.count * (dev.profiles[part] / dev.units if part else 1.0)
    return out


def churn(n: int, seed: int, load: float, f: Fleet) -> list[tuple[float, int, int, float]]:
    """Arrivals: (time, shape, request index, lifetime)."""
    rnd = random.Random(seed)
    weights = [w for w, _ in SHAPES]
    mean_size = sum(w * _size(f, g) for w, g in SHAPES) / sum(weights)
    lifetime = 100.0
    rate = load * len(f.devices) / (mean_size * lifetime)  # Little's law
    t, out = 0.0, []
    for i in range(n):
        t += rnd.expovariate(rate)
        out.append((t, rnd.choices(range(len(SHAPES)), weights)[0], i,
                    rnd.expovariate(1 / lifetime)))
    return out


def replay(policy: str, arrivals: list[tuple[float, int, int, float]]) -> dict[str, Any]:
    f = Fleet([(cluster_from_dict(FLEET, "fleet-1000"), False)])
    leaves: list[tuple[float, str]] = []
    admitted, stranded, place_s, places = 0, [], 0.0, 0
    import heapq
    for t, shape, i, life in arrivals:
        while leaves and leaves[0][0] <= t:
            _, h = heapq.heappop(leaves)
            f.release(h)
        t0 = time.perf_counter()
        got = f.place(SHAPES[shape][1], f"r{i}", policy=policy)
        place_s += time.perf_counter() - t0
        places += 1
        if got is not None:
            admitted += 1
            heapq.heappush(leaves, (t + life, f"r{i}"))
        stranded.append(f.stranded())
    return {"policy": policy, "admitted": admitted / len(arrivals),
            "stranded_devices": statistics.fmean(stranded),
            "placements_per_s": places / place_s, "requests": len(arrivals)}


# ---------------------------------------------------------------------------------------------
# a control plane in its own process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Plane:
    def __init__(self, data: Path, port: int) -> None:
        self.data, self.port = data, port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def up(self) -> float:
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kcloud.cli", "cloud", "up", "--data-dir", str(self.data),
             "--port", str(self.port), "--local-cores", "0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while True:
            try:
                httpx.get(self.url + "/openapi.json", timeout=2)
                return time.perf_counter() - t0
            except httpx.HTTPError:
                time.sleep(0.1)
                if self.proc.poll() is not None:
                    raise SystemExit("the control plane did not start") from None

    def down(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(120)

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {(self.data / 'admin.key').read_text().strip()}"}

    def tenant(self, name: str) -> dict[str, str]:
        t = httpx.post(self.url + "/api/v1/tenants", json={"name": name}, headers=self.admin)
        k = httpx.post(self.url + f"/api/v1/tenants/{t.json()['id']}/keys", headers=self.admin)
        return {"Authorization": f"Bearer {k.json()['key']}"}

    def deploy(self, h: dict[str, str], name: str, model: str) -> str:
        r = httpx.post(self.url + "/api/v1/deployments", headers=h, timeout=600,
                       json={"name": name, "model": model, "objective": "cost"})
        r.raise_for_status()
        return r.json()["id"]

    def states(self, h: dict[str, str]) -> list[str]:
        r = httpx.get(self.url + "/api/v1/deployments", headers=h, timeout=30)
        return [d["state"] for d in r.json()["deployments"]]

    def wait_running(self, h: dict[str, str], n: int, timeout: float = 900) -> None:
        t0 = time.time()
        while time.time() - t0 < timeout:
            s = self.states(h)
            if len(s) == n and all(x == "running" for x in s):
                return
            time.sleep(0.25)
        raise SystemExit(f"deployments not running after {timeout} s: {self.states(h)}")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def api_load(url: str, h: dict[str, str], dep_id: str, clients: int, per: int
                   ) -> list[float]:
    lat: list[float] = []
    paths = ["/api/v1/deployments", f"/api/v1/deployments/{dep_id}", "/api/v1/usage"]
    async with httpx.AsyncClient(base_url=url, headers=h, timeout=60,
                                 limits=httpx.Limits(max_connections=clients)) as c:
        async def one(k: int) -> None:
            for i in range(per):
                t0 = time.perf_counter()
                r = await c.get(paths[(k + i) % len(paths)])
                lat.append(time.perf_counter() - t0)
                assert r.status_code == 200, r.text
        await asyncio.gather(*(one(k) for k in range(clients)))
    return lat


def gateway_overhead(p: Plane, h: dict[str, str], dep_id: str, n: int) -> tuple[float, float]:
    sock = p.data / "deployments" / dep_id / "engine.sock"
    body = {"model": "gpt", "prompt": "hello", "max_tokens": 1}
    direct, via = [], []
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://e",
                      timeout=60) as d, httpx.Client(base_url=p.url, headers=h, timeout=60) as g:
        for _ in range(5):
            d.post("/v1/completions", json=body)
            g.post("/v1/completions", json=body)
        for _ in range(n):
            t0 = time.perf_counter()
            assert d.post("/v1/completions", json=body).status_code == 200
            direct.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            assert g.post("/v1/completions", json=body).status_code == 200
            via.append(time.perf_counter() - t0)
    return statistics.median(direct), statistics.median(via)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller runs (a smoke test)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--restart-deployments", type=int, default=20)
    a = ap.parse_args()
    out: dict[str, Any] = {}
    say = (lambda *x: None) if a.json else print

    # 1. placement
    f = Fleet([(cluster_from_dict(FLEET, "fleet-1000"), False)])
    arrivals = churn(1000 if a.quick else 5000, 7, 1.2, f)
    res = [replay(p, arrivals) for p in ("best-fit", "first-fit")]
    out["placement"] = res
    say(f"placement on {len(f.devices)} devices, {len(arrivals)} requests offered at 1.2 x "
        f"capacity (replayed churn, seed 7):")
    for r in res:
        say(f"  {r['policy']:9s}: admitted {r['admitted']:.1%}, stranded "
            f"{r['stranded_devices']:.1f} device-equivalents on average, "
            f"{r['placements_per_s']:,.0f} placements/s (measured)")

    data = Path(tempfile.mkdtemp(prefix="kcloud-bench-"))
    p = Plane(data, free_port())
    try:
        p.up()
        h = p.tenant("bench")
        gpt = p.deploy(h, "gpt", "tiny-gpt")
        p.wait_running(h, 1)
        # 2. API latency
        lat = asyncio.run(api_load(p.url, h, gpt, 50, 10 if a.quick else 40))
        out["api"] = {"clients": 50, "requests": len(lat), "p50_ms": pct(lat, 0.5) * 1e3,
                      "p99_ms": pct(lat, 0.99) * 1e3}
        say(f"API under 50 concurrent clients ({len(lat)} GETs): p50 "
            f"{out['api']['p50_ms']:.1f} ms, p99 {out['api']['p99_ms']:.1f} ms (measured)")
        # 3. gateway overhead
        d50, g50 = gateway_overhead(p, h, gpt, 20 if a.quick else 100)
        out["gateway"] = {"direct_p50_ms": d50 * 1e3, "gateway_p50_ms": g50 * 1e3,
                          "overhead_ms": (g50 - d50) * 1e3}
        say(f"gateway: tiny-gpt 1-token completion p50 {g50 * 1e3:.2f} ms through the gateway "
            f"vs {d50 * 1e3:.2f} ms straight to the engine's socket: overhead "
            f"{(g50 - d50) * 1e3:.2f} ms (measured)")
        # 4. restart
        n = 3 if a.quick else a.restart_deployments
        for i in range(n - 1):
            p.deploy(h, f"m{i}", "mlp")
        p.wait_running(h, n)
        p.down()
        t0 = time.perf_counter()
        p.up()
        p.wait_running(h, n)
        back = time.perf_counter() - t0
        out["restart"] = {"deployments": n, "seconds": back}
        say(f"restart: {n} deployments serving again {back:.1f} s after the control plane "
            f"started (measured, real kcloud serve engines in bubblewrap, "
            f"{os.cpu_count()} CPU cores)")
    finally:
        p.down()
        shutil.rmtree(data, ignore_errors=True)
    if a.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
