"""The shared report writer: JSON, markdown and PNG from one BenchReport."""

from __future__ import annotations

import json
from pathlib import Path

from sim.report import BenchReport, combine, markdown_table


def test_writes_json_markdown_and_png(tmp_path: Path) -> None:
    report = BenchReport("demo-bench", "A demo benchmark")
    report.table("results", ["mode", "goodput/s", "simulated"], [
        {"mode": "edge-only", "goodput/s": 12.345, "simulated": True},
        {"mode": "overflow", "goodput/s": 31.0, "simulated": False},
    ])  # fmt: skip
    report.ratio("overflow / edge-only", 2.51, target=2.5)
    report.ratio("p99 ms", 900.0, target=500.0, higher_is_better=False)
    report.series("latency", "edge-only", [0, 1, 2], [5, 6, 7], xlabel="t", ylabel="ms")
    report.note("one run")
    paths = report.write(tmp_path)
    body = json.loads(paths["json"].read_text())
    assert body["bench"] == "demo-bench"
    assert body["machine"]["cpus"] >= 1 and "load_avg_1m_end" in body["machine"]
    assert [r["met"] for r in body["ratios"]] == [True, False]
    md = paths["md"].read_text()
    assert "| edge-only | 12.3 | yes |" in md
    assert "| p99 ms | 900 | <= 500 | **no** |" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    combined = combine("All", [paths["md"]], tmp_path / "all.md")
    assert (
        combined.read_text().startswith("# All") and "### A demo benchmark" in combined.read_text()
    )


def test_png_without_series_shows_the_ratios(tmp_path: Path) -> None:
    report = BenchReport("r", "Ratios only")
    report.ratio("x", 1.0, target=2.0)
    assert report.write(tmp_path)["png"].stat().st_size > 0


def test_markdown_table_formats_cells() -> None:
    assert (
        markdown_table(["a", "b"], [{"a": None, "b": float("nan")}]).splitlines()[-1] == "| - | - |"
    )
