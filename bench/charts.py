"""PNG charts of a bench report: throughput per tool and shape, and one clone over time."""

from __future__ import annotations

import os
from typing import Any

MiB = 1 << 20


def draw(report: dict[str, Any], out: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    rows = report["rows"]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    tools = list(dict.fromkeys(r["tool"] for r in rows))
    fig, ax = plt.subplots(figsize=(11, 5))
    width = 0.8 / len(tools)
    for k, tool in enumerate(tools):
        values = [next((r["gb_s"] for r in rows if r["shape"] == s and r["tool"] == tool), 0)
                  for s in shapes]
        ax.bar([i + k * width for i in range(len(shapes))], values, width, label=tool)
    ax.set_xticks([i + width * (len(tools) - 1) / 2 for i in range(len(shapes))])
    ax.set_xticklabels(shapes)
    ax.set_ylabel("GB/s (median, data synced)")
    ax.set_title("clone-agent vs baselines, loopback, interleaved rounds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out, "throughput.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    timelines = report.get("timelines")
    if timelines:
        fig, ax = plt.subplots(figsize=(11, 4.5))
        for name, tl in timelines.items():
            pts = tl["points"]
            xs = [(t0 + t1) / 2 for (t0, _), (t1, _) in zip(pts, pts[1:], strict=False)]
            ys = [(d1 - d0) / (t1 - t0) / MiB
                  for (t0, d0), (t1, d1) in zip(pts, pts[1:], strict=False) if t1 > t0]
            ax.plot(xs[: len(ys)], ys, marker=".", label=name)
        if "throttle" in report:
            ax.axhline(report["throttle"]["limit_mib_s"], linestyle="--", color="grey",
                       label="limit")
        ax.set_xlabel("seconds since the pull started")
        ax.set_ylabel("MiB/s written (FILE COPY)")
        ax.set_title("one clone over time: autotuned streams, and a throttled clone")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out, "timeline.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
