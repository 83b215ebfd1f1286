"""PNG charts of a bench report: throughput per tool and shape, and one clone over time.

``throughput.png``: a panel per data shape, a bar per tool (the median GB/s, the data
synced), whiskers from the slowest to the fastest round when the report has its rounds,
each bar labelled with its GB/s and seconds, and a baseline's bar with clone-agent's time
over the tool's (below 1: clone-agent faster).

``timeline.png``: the unthrottled clone's MiB/s over time; the throttled clone's on an
axis of its own, against its limit and the ±10% target band; the autotuned stream count
of both below.
"""

from __future__ import annotations

import bisect
import os
import statistics
from typing import Any

MiB = 1 << 20
#: The throttle target's band around the limit, in % (bench/suite.py, target c).
THROTTLE_BAND_PCT = 10.0
#: The tuner's sampling interval, seconds (recipient/tuner.py).
TUNER_INTERVAL = 0.5


def draw(report: dict[str, Any], out: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")

    paths = [_throughput(report, os.path.join(out, "throughput.png"))]
    timelines = report.get("timelines")
    if timelines:
        paths.append(_timeline(report, timelines, os.path.join(out, "timeline.png")))
    return paths


def _is_baseline(tool: str) -> bool:
    return not tool.startswith("clone-agent")


def _round_gbs(row: dict[str, Any]) -> list[float]:
    return [row["bytes"] / 1e9 / r["wall"] for r in row.get("runs") or [] if r["wall"] > 0]


def _throughput(report: dict[str, Any], path: str) -> str:
    import matplotlib.pyplot as plt

    rows = report["rows"]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    tools = list(dict.fromkeys(r["tool"] for r in rows))
    colors = {tool: plt.get_cmap("tab10")(k % 10) for k, tool in enumerate(tools)}
    ncols = 1 if len(shapes) == 1 else 2
    nrows = -(-len(shapes) // ncols)
    fig, axes = plt.subplots(nrows, ncols, squeeze=False,
                             figsize=(7.5 * ncols if ncols > 1 else 10,
                                      nrows * (0.42 * len(tools) + 1.1) + 1.2))
    for ax, shape in zip(axes.flat, shapes, strict=False):
        _throughput_panel(ax, shape, [r for r in rows if r["shape"] == shape], colors)
    for ax in list(axes.flat)[len(shapes):]:
        ax.set_visible(False)
    rounds = max((len(r.get("runs") or []) for r in rows), default=0)
    spread = f"; whiskers: slowest to fastest of {rounds} rounds" if rounds > 1 else ""
    fig.suptitle("clone-agent beside baselines: GB/s (median, data synced) and seconds"
                 f"{spread}\nagent/tool: clone-agent's time over the tool's, median of "
                 "per-round ratios (below 1: clone-agent faster)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _throughput_panel(ax: Any, shape: str, rows: list[dict[str, Any]],
                      colors: dict[str, Any]) -> None:
    ys = list(range(len(rows)))
    values = [r["gb_s"] for r in rows]
    spreads = [_round_gbs(r) for r in rows]
    lo = [v - min(s) if s else 0.0 for v, s in zip(values, spreads, strict=True)]
    hi = [max(s) - v if s else 0.0 for v, s in zip(values, spreads, strict=True)]
    has_spread = any(len(s) > 1 for s in spreads)
    ax.barh(ys, values, 0.7, color=[colors[r["tool"]] for r in rows],
            xerr=[lo, hi] if has_spread else None, error_kw={"capsize": 3, "lw": 1})
    right = max(v + h for v, h in zip(values, hi, strict=True))
    for y, row, h in zip(ys, rows, hi, strict=True):
        label = f" {row['gb_s']:.2f} GB/s, {row['wall_s']:.2f} s"
        ax.text(row["gb_s"] + h + right * 0.01, y, label, va="center", fontsize=8)
        if _is_baseline(row["tool"]):
            ratio = row["agent_time_ratio"]
            ax.text(right * 1.95, y, f"agent/tool {ratio:.2f}", va="center", ha="right",
                    fontsize=8, fontweight="bold", color="tab:green" if ratio < 1 else "tab:red")
    ax.set_yticks(ys, [r["tool"] for r in rows], fontsize=9)
    ax.invert_yaxis()
    ax.set_xlim(0, right * 2.0)
    ax.set_title(shape, fontsize=10, loc="left", fontweight="bold")
    ax.set_xlabel("GB/s", fontsize=8)
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)


def _rates(points: list[list[float]]) -> tuple[list[float], list[float]]:
    """MiB/s between successive progress samples, at the middle of each interval."""
    xs, ys = [], []
    for (t0, d0), (t1, d1) in zip(points, points[1:], strict=False):
        if t1 > t0:
            xs.append((t0 + t1) / 2)
            ys.append((d1 - d0) / (t1 - t0) / MiB)
    return xs, ys


def _align(autotune: list[dict[str, Any]], points: list[list[float]]) -> list[float]:
    """The tuner's samples (monotonic clock) on the progress samples' clock (seconds
    since the pull started): where the bytes written by each sample, summed from the
    tuner's speeds, fall on the progress curve; the median offset."""
    times = [a["t"] for a in autotune]
    ts, data = [p[0] for p in points], [p[1] for p in points]
    offsets, written, prev = [], 0.0, times[0] - TUNER_INTERVAL
    for a in autotune:
        written += a["speed"] * (a["t"] - prev)
        prev = a["t"]
        k = bisect.bisect_left(data, written)
        if 0 < k < len(data) and data[k] > data[k - 1]:
            at = ts[k - 1] + (written - data[k - 1]) / (data[k] - data[k - 1]) * \
                (ts[k] - ts[k - 1])
            offsets.append(at - a["t"])
    if offsets:
        offset = statistics.median(offsets)
    else:  # the tuner's first sample comes an interval after the copy began
        offset = (ts[0] if ts else 0.0) + TUNER_INTERVAL - times[0]
    return [t + offset for t in times]


def _streams(ax: Any, autotune: list[dict[str, Any]], points: list[list[float]],
             color: Any, label: str, lw: float) -> int:
    """The stream count over time, each sample's count held over the interval before
    it; the highest count."""
    xs = _align(autotune, points)
    counts = [a["streams"] for a in autotune]
    ax.step([xs[0] - TUNER_INTERVAL, *xs], [counts[0], *counts], where="pre", color=color,
            label=label, lw=lw)
    return max(counts)


def _timeline(report: dict[str, Any], timelines: dict[str, Any], path: str) -> str:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    throttle = report.get("throttle")
    throttled = [n for n in timelines if n.startswith("throttled")] if throttle else []
    free = [n for n in timelines if n not in throttled]
    tuned = [n for n in timelines if timelines[n].get("autotune")]
    ratios = [3] * bool(free) + [3] * bool(throttled) + [2] * bool(tuned)
    fig, axes = plt.subplots(len(ratios), 1, sharex=True, squeeze=False,
                             figsize=(11, 1.05 * sum(ratios) + 0.8),
                             gridspec_kw={"height_ratios": ratios})
    panels = iter(axes[:, 0])
    colors = {n: plt.get_cmap("tab10")(k) for k, n in enumerate(timelines)}
    if free:
        ax = next(panels)
        for name in free:
            xs, ys = _rates(timelines[name]["points"])
            ax.plot(xs, ys, marker=".", color=colors[name], label=name)
        ax.set_ylim(0, None)
        ax.set_ylabel("MiB/s written")
        ax.set_title("one clone over time (FILE COPY)", fontsize=10, loc="left")
        ax.legend(fontsize=8, loc="lower right")
    if throttled:
        assert throttle is not None
        _throttle_panel(next(panels), timelines, throttled, throttle, colors)
    if tuned:
        ax = next(panels)
        # the first line broad, those over it thin, so that equal counts show both
        top = max(_streams(ax, timelines[n]["autotune"], timelines[n]["points"], colors[n], n,
                           lw=4 if k == 0 else 1.8)
                  for k, n in enumerate(tuned))
        ax.set_ylim(0, top + 1)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("streams")
        ax.set_title("autotuned stream count", fontsize=10, loc="left")
        ax.legend(fontsize=8, loc="lower right")
    for ax in axes[:, 0]:
        ax.grid(alpha=0.3)
        ax.set_xlim(0, None)
    axes[-1, 0].set_xlabel("seconds since the pull started")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _throttle_panel(ax: Any, timelines: dict[str, Any], names: list[str],
                    throttle: dict[str, Any], colors: dict[str, Any]) -> None:
    limit = throttle["limit_mib_s"]
    band = limit * THROTTLE_BAND_PCT / 100
    ax.axhspan(limit - band, limit + band, color="tab:green", alpha=0.12,
               label=f"±{THROTTLE_BAND_PCT:g}% target")
    ax.axhline(limit, linestyle="--", color="black", lw=1, label=f"limit {limit} MiB/s")
    top = limit + band
    for name in names:
        xs, ys = _rates(timelines[name]["points"])
        ax.plot(xs, ys, marker=".", color=colors[name], label=name)
        top = max(top, *ys) if ys else top
    ax.set_ylim(0, top * 1.25)
    ax.set_ylabel("MiB/s written")
    ax.set_title(f"throttled clone: worst 2-second window off the limit by "
                 f"{throttle['worst_error_pct']:.1f}%, median "
                 f"{throttle['median_error_pct']:.1f}% ({throttle['windows']} windows)",
                 fontsize=10, loc="left")
    ax.legend(fontsize=8, loc="lower right")
