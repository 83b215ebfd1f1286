"""The bench's printed table, its targets and its charts, from a small synthetic report
(no benchmark run)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench import charts, suite

GB = 10**9
MONOTONIC = 5000.0  # the tuner's clock: the monotonic one, not the pull's


def row(shape: str, tool: str, walls: list[float], ratio: float, size: int = GB) -> dict[str, Any]:
    wall = sorted(walls)[len(walls) // 2]
    return {"shape": shape, "tool": tool, "bytes": size, "wall_s": wall,
            "gb_s": size / 1e9 / wall, "agent_time_ratio": ratio,
            "cpu_s_per_gib_donor": 0.5 if tool.startswith("clone") else 0.0,
            "cpu_s_per_gib_recipient": 0.7, "peak_pss_mib": 180.0,
            "runs": [{"wall": w, "cpu_donor": 0.5, "cpu_recipient": 0.7, "peak_pss": 1 << 27}
                     for w in walls]}


def timeline(rate: float, seconds: float, start: float, grow_at: float | None
             ) -> dict[str, Any]:
    """Progress every half second from ``start``; tuner samples every half second from
    half a second into the copy, on the monotonic clock."""
    points = [[round(start + k * 0.5, 3), int(rate * k * 0.5)]
              for k in range(int(seconds / 0.5) + 1)]
    autotune = [{"t": MONOTONIC + k * 0.5, "speed": int(rate),
                 "streams": 2 if grow_at is not None and k * 0.5 > grow_at else 1}
                for k in range(1, int(seconds / 0.5) + 1)]
    return {"points": points, "autotune": autotune}


@pytest.fixture
def report() -> dict[str, Any]:
    mixed, small = "mixed 1G", "20k small files"
    return {
        "rows": [
            row(mixed, "clone-agent", [1.0, 1.1, 1.2], 1.0),
            row(mixed, "clone-agent encrypted", [1.2, 1.3, 1.3], 0.85),
            row(mixed, "cp -a", [0.8, 0.8, 0.9], 1.3),
            row(mixed, "clone-agent local", [0.9, 0.9, 1.0], 1.2),
            row(mixed, "tar|socat|tar", [2.0, 2.1, 2.2], 0.5),
            row(mixed, "rsync -aW", [2.5, 2.5, 2.6], 0.45),
            row(small, "clone-agent", [0.7, 0.7, 0.8], 1.0, size=80_000_000),
            row(small, "clone-agent encrypted", [0.9, 1.0, 1.0], 0.7, size=80_000_000),
            row(small, "tar|socat|tar", [0.5, 0.5, 0.6], 1.4, size=80_000_000),
        ],
        "timelines": {
            "unthrottled": timeline(300 * charts.MiB, 3.0, 0.2, grow_at=1.0),
            "throttled 32 MiB/s": timeline(32 * charts.MiB, 8.0, 0.2, grow_at=None),
        },
        "throttle": {"limit_mib_s": 32, "windows": 10, "worst_error_pct": 1.5,
                     "median_error_pct": 0.2},
        "command": "clone-agent bench --rounds 3",
    }


def test_the_table_is_aligned_with_a_long_tool_name(report: dict[str, Any],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    suite._print_table(report, json_mode=False)
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("shape"))
    body = lines[lines.index(header) + 1:][:len(report["rows"])]
    tool_at = header.index("tool")
    for line, r in zip(body, report["rows"], strict=True):
        assert line.startswith(r["shape"])
        assert line[tool_at:tool_at + len(r["tool"])] == r["tool"]
        # each figure ends where its column's title ends
        for title, shown in (("GB/s", f"{r['gb_s']:.2f}"), ("median s", f"{r['wall_s']:.2f}"),
                             ("peak PSS MiB", f"{r['peak_pss_mib']:.1f}")):
            end = header.index(title) + len(title)
            assert line[end - len(shown):end] == shown, (title, line)
            assert line[end:end + 1] in ("", " ")
    assert max(len(line) for line in body) == max(len(header), max(map(len, body)))


def test_targets_held_missed_and_not_measured(report: dict[str, Any],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    targets = {t["name"]: t for t in suite._targets(report)}
    tar = targets["clone-agent faster than tar|socat|tar on every shape"]
    assert (tar["value"], tar["limit"], tar["held"]) == (1.4, 1.0, False)  # the small files
    assert targets["clone-agent faster than rsync -aW on every shape"]["held"] is True
    enc = targets["encrypted clone at most 1.25x the plain clone's time"]
    # the median of per-round ratios, on the worse shape (small files: 9/7, 10/7, 10/8)
    assert enc["value"] == pytest.approx(9 / 7, abs=1e-4) and enc["held"] is False
    assert targets["throttle within 10% in its worst 2-second window"]["held"] is True
    local = targets["clone-local at most 1.1x cp -a's time"]
    # the median of per-round ratios to cp -a: 0.9/0.8, 0.9/0.8, 1.0/0.9
    assert local["value"] == pytest.approx(1.125, abs=1e-4) and local["held"] is False
    suite._print_table(report, json_mode=False)
    out = capsys.readouterr().out
    assert "missed" in out and "held" in out

    del report["throttle"]
    report["rows"] = [r for r in report["rows"] if r["tool"] != "rsync -aW"]
    enc_small = next(r for r in report["rows"]
                     if r["shape"] == "20k small files" and r["tool"] == "clone-agent encrypted")
    enc_small["runs"] = enc_small["runs"][:2]  # unequal rounds
    verdicts = {t["name"]: t for t in suite._targets(report)}
    assert verdicts["clone-agent faster than rsync -aW on every shape"]["held"] is None
    assert verdicts["throttle within 10% in its worst 2-second window"]["value"] is None
    report["rows"] = [r for r in report["rows"] if r["tool"] != "cp -a"]
    assert {t["name"]: t for t in suite._targets(report)}[
        "clone-local at most 1.1x cp -a's time"]["held"] is None
    enc = verdicts["encrypted clone at most 1.25x the plain clone's time"]
    assert enc["value"] == pytest.approx(1.0 / 0.7, abs=1e-4)  # the ratio of medians
    assert enc["basis"].startswith("ratio of medians")
    suite._print_table(report, json_mode=False)
    assert "not measured" in capsys.readouterr().out


def test_the_json_report_has_the_targets() -> None:
    results = []
    for tool, wall in (("clone-agent", 1.0), ("clone-agent encrypted", 1.1),
                       ("tar|socat|tar", 2.0)):
        res = suite.Result("mixed 1G", tool, GB)
        res.runs = [suite.Run(wall, 0.5, 0.7, 1 << 27)] * 3
        results.append(res)
    report = suite._report(results, {"throttle": {"limit_mib_s": 32, "windows": 4,
                                                  "worst_error_pct": 12.0,
                                                  "median_error_pct": 3.0}})
    got = [(t["value"], t["limit"], t["held"]) for t in report["targets"]]
    assert got == [(0.5, 1.0, True), (None, 1.0, None), (1.1, 1.25, True), (None, 1.1, None),
                   (12.0, 10.0, False)]
    assert all({"name", "value", "limit", "held"} <= t.keys() for t in report["targets"])


def test_the_tuner_samples_are_put_on_the_pulls_clock(report: dict[str, Any]) -> None:
    tl = report["timelines"]["unthrottled"]
    xs = charts._align(tl["autotune"], tl["points"])
    # the copy began at 0.2 s, the first sample half a second later
    assert xs[0] == pytest.approx(0.7, abs=0.01)
    assert xs[-1] - xs[0] == pytest.approx(tl["autotune"][-1]["t"] - MONOTONIC - 0.5)


def test_the_charts_are_written(report: dict[str, Any], tmp_path: Path) -> None:
    paths = charts.draw(report, str(tmp_path))
    assert sorted(Path(p).name for p in paths) == ["throughput.png", "timeline.png"]
    for p in paths:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a report without rounds, timelines or throttle: the throughput chart only
    bare = {"rows": [{k: v for k, v in r.items() if k != "runs"} for r in report["rows"]]}
    (tmp_path / "bare").mkdir()
    assert [Path(p).name for p in charts.draw(bare, str(tmp_path / "bare"))] == \
        ["throughput.png"]
