"""PNG plots of a simulation (matplotlib): latency CDFs per service, power and utilization
per device type over time. Every figure is modeled."""

from __future__ import annotations

from pathlib import Path

from kcloud.sim.fleet import SimResult


def plot_run(res: SimResult, out_dir: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, st in res.services.items():
        for ax, q, label in ((axes[0], st.ttft, "TTFT"), (axes[1], st.tpot, "TPOT"),
                             (axes[2], st.e2e, "end to end")):
            if st.is_llm or q is st.e2e:
                x, y = q.cdf()
                if x:
                    ax.plot(x, y, label=name)
                ax.set_title(f"{label} CDF (modeled)")
                ax.set_xlabel("s")
                ax.set_xscale("log")
    for ax in axes:
        ax.set_ylabel("share of requests")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(d / "latency_cdf.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    series = res.ledger.series(res.span_s)
    t = [i * res.ledger.bin_s for i in range(len(next(iter(series.values()))["power_w"]))]
    for key, title, file, unit in (("power_w", "power by device type (modeled)", "power.png",
                                    "W"),
                                   ("utilization", "utilization by device type (modeled)",
                                    "utilization.png", "busy share")):
        fig, ax = plt.subplots(figsize=(9, 4))
        if key == "power_w":
            ax.stackplot(t, *[series[k][key] for k in series], labels=list(series))
        else:
            for k in series:
                ax.plot(t, series[k][key], label=k)
        ax.set_title(title)
        ax.set_xlabel("time (s)")
        ax.set_ylabel(unit)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(d / file)
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths
