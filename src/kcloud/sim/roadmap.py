"""The K-Cloud plan's three stages on one service mix that stands for its demonstration fields.

- public safety: CCTV detection, a single-stage CNN detector on 640x640 frames
  (`roadmap_models.cctv_detector`), 200 frames/s, 150 ms per frame;
- health: medical image segmentation, a U-Net on 256x256 slices (`roadmap_models.medical_unet`),
  20 slices/s, 500 ms per slice;
- education: a chat assistant on Llama 3.1 8B over the Azure conversation trace (its own rate,
  about 5.5 requests/s), TTFT 1 s and TPOT 100 ms;
- defence: document analysis on Llama 2 70B over the Azure code trace (long prompts, short
  answers) at a quarter of its rate, TTFT 5 s and TPOT 200 ms.

Each stage (2025: Korean NPUs and GPUs; 2028: with DRAM PIM; 2030: with the projected analog
NVM PIM) is sized by `size_fleet` toward the 80 % domestic share target (the fleet of the lowest
objective at or above it, or, where none reaches it, the one of the highest share).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from kcloud.sim.services import FleetSpec, parse_spec
from kcloud.sim.size import YEARS, size_fleet

DOMESTIC_TARGET = 0.8
# The devices each stage is sized over (a service file's `devices:` overrides them): the
# domestic NPUs of the year and two GPU reference points; DRAM PIM from 2028 (alone, or joined
# to each NPU); analog NVM PIM from 2030.
STAGE_DEVICES = {
    2025: ["rebellions-atom-max", "furiosa-rngd", "furiosa-warboy", "nvidia-h100-sxm",
           "nvidia-l4"],
    2028: ["rebellions-atom-max", "rebellions-rebel-quad", "furiosa-rngd", "furiosa-warboy",
           "skhynix-aimx", "nvidia-h100-sxm", "nvidia-l4"],
    2030: ["rebellions-rebel-quad", "furiosa-rngd", "furiosa-warboy", "skhynix-aimx",
           "nvm-analog-pim", "nvidia-h100-sxm", "nvidia-l4"],
}


def traces_dir() -> Path:
    """`../shared/traces` of the checkout (where the Azure traces are kept)."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        cand = parent.parent / "shared" / "traces"
        if cand.is_dir():
            return cand
    return Path("../shared/traces")


def builtin_services() -> FleetSpec:
    models = resources.files("kcloud.sim") / "roadmap_models.py"
    traces = traces_dir()
    return parse_spec({
        "seed": 1,
        "services": [
            {"name": "cctv-detection", "model": f"{models}:cctv_detector", "rate": 200.0,
             "slo": {"latency_ms": 150}, "max_batch": 16},
            {"name": "medical-segmentation", "model": f"{models}:medical_unet", "rate": 20.0,
             "slo": {"latency_ms": 500}, "max_batch": 8},
            {"name": "chat-8b", "model": "llama-3.1-8b",
             "trace": str(traces / "azure-llm-2023-conversation.csv"), "max_tokens": 4096,
             "slo": {"ttft_ms": 1000, "tpot_ms": 100}},
            {"name": "doc-70b", "model": "llama-2-70b",
             "trace": str(traces / "azure-llm-2023-code.csv"), "rate_scale": 0.25,
             "max_tokens": 4096, "slo": {"ttft_ms": 5000, "tpot_ms": 200}},
        ],
    }, "built-in roadmap")


def roadmap(spec: FleetSpec | None = None, *, objective: str = "energy",
            progress: Any = None) -> dict[str, Any]:
    spec = spec or builtin_services()
    scenarios = []
    for year in YEARS:
        s = size_fleet(spec, year, min_domestic_share=DOMESTIC_TARGET, objective=objective,
                       strict=False, progress=progress, devices=STAGE_DEVICES[year])
        s["domestic_target"] = DOMESTIC_TARGET
        s["meets_domestic_target"] = s["domestic_share"] >= DOMESTIC_TARGET - 1e-9
        scenarios.append(s)
    return {"scenarios": scenarios, "services": [s.name for s in spec.services],
            "objective": objective, "figures": "modeled"}


def plot_roadmap(result: dict[str, Any], path: str | Path) -> Path:
    """The three stages side by side: fleet devices by type, energy per request per service,
    power and domestic share against the target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sc = result["scenarios"]
    years = [str(s["year"]) + (" *" if s["estimated"] else "") for s in sc]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    types = sorted({t for s in sc for t in s["fleet"]})
    bottom = [0.0] * len(sc)
    cmap = plt.get_cmap("tab20")
    for i, t in enumerate(types):
        vals = [s["fleet"].get(t, 0) for s in sc]
        axes[0].bar(years, vals, bottom=bottom, label=t, color=cmap(i % 20))
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    axes[0].set_title("fleet (devices by type)")
    axes[0].legend(fontsize=7)
    services = result["services"]
    width = 0.8 / max(1, len(services))
    for k, name in enumerate(services):
        vals = [s["energy_per_request_j"].get(name) or 0.0 for s in sc]
        axes[1].bar([i + k * width for i in range(len(sc))], vals, width, label=name)
    axes[1].set_xticks([i + width * (len(services) - 1) / 2 for i in range(len(sc))], years)
    axes[1].set_yscale("log")
    axes[1].set_title("energy per request (J, modeled)")
    axes[1].legend(fontsize=7)
    ax = axes[2]
    ax.bar(years, [s["domestic_share"] for s in sc], color="tab:green", label="domestic share")
    ax.axhline(DOMESTIC_TARGET, color="k", ls="--", label="80 % target")
    ax.set_ylim(0, 1.05)
    ax2 = ax.twinx()
    ax2.plot(years, [s["avg_power_w"] / 1e3 for s in sc], "o-", color="tab:red",
             label="avg power (kW)")
    ax2.set_ylabel("kW")
    ax.set_title("domestic share (by devices) and power")
    ax.legend(loc="upper left", fontsize=7)
    ax2.legend(loc="upper right", fontsize=7)
    fig.suptitle("K-Cloud roadmap: the same services sized on 2025 / 2028 / 2030 devices "
                 "(modeled; * built on estimated or projected catalog figures)")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
