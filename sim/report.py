"""One report writer for every benchmark: JSON + a markdown table + a PNG, and a progress bar.

A benchmark fills a ``BenchReport`` (tables of rows, ratios with their targets, notes, plot
series, any raw data) and calls ``write(out_dir)``; it gets ``<out>/<name>.json``,
``<name>.md`` and ``<name>.png``. The machine the numbers came from (CPU, cores, memory,
load average at the start and at the end) is recorded in every report, because a number
without its machine is not a result. Small on purpose, so the existing benches can adopt it::

    report = BenchReport("overflow", "Edge-only vs edge + cloud overflow")
    report.table("results", ["mode", "goodput/s"], [{"mode": "edge", "goodput/s": 12.0}])
    report.ratio("goodput overflow / edge-only", 2.7, target=2.5)
    report.series("latency", "edge-only", xs, ys, xlabel="t (s)", ylabel="ms")
    paths = report.write(Path("var/bench"))

``progress(total, what)`` is the rich progress bar every bench shows while it runs.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """Where the numbers come from; the load average is sampled again at ``write``."""
    memory_gib = None
    try:
        import psutil

        memory_gib = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:  # psutil is a core dependency; keep the report writable without it
        pass
    return {
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "memory_gib": memory_gib,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_avg_1m_start": os.getloadavg()[0],
    }


def _cell(value: Any, fmt: str | None = None) -> str:
    if fmt is not None and isinstance(value, int | float) and not isinstance(value, bool):
        return "-" if value != value else fmt.format(value)
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    return "-" if value is None else str(value)


def markdown_table(
    columns: Sequence[str],
    rows: Sequence[dict[str, Any]],
    formats: dict[str, str] | None = None,
) -> str:
    """``formats`` maps a column to a ``str.format`` pattern for its numbers (``"{:.5f}"``)."""
    formats = formats or {}
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c), formats.get(c)) for c in columns) + " |")
    return "\n".join(lines)


@dataclass
class Ratio:
    name: str
    value: float
    target: float | None = None
    higher_is_better: bool = True
    fmt: str | None = None
    """``str.format`` pattern for the value and target in markdown (None: the default)."""

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        return self.value >= self.target if self.higher_is_better else self.value <= self.target

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "target": self.target,
            "higher_is_better": self.higher_is_better,
            "met": self.met,
        }


@dataclass
class Series:
    panel: str
    label: str
    xs: list[float]
    ys: list[float]
    xlabel: str = ""
    ylabel: str = ""
    kind: str = "line"
    """``line``, ``step`` or ``scatter``."""


@dataclass
class BenchReport:
    name: str
    title: str
    machine: dict[str, Any] = field(default_factory=machine_info)
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    tables: list[tuple[str, list[str], list[dict[str, Any]]]] = field(default_factory=list)
    formats: dict[str, dict[str, str]] = field(default_factory=dict)
    """Per table title: column -> ``str.format`` pattern for its numbers in markdown."""
    ratios: list[Ratio] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    plots: list[Series] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    """Anything else worth keeping in the JSON (raw samples, settings)."""

    def table(
        self,
        title: str,
        columns: Sequence[str],
        rows: Sequence[dict[str, Any]],
        *,
        formats: dict[str, str] | None = None,
    ) -> None:
        self.tables.append((title, list(columns), [dict(r) for r in rows]))
        if formats:
            self.formats[title] = dict(formats)

    def ratio(
        self,
        name: str,
        value: float,
        *,
        target: float | None = None,
        higher_is_better: bool = True,
        fmt: str | None = None,
    ) -> Ratio:
        r = Ratio(name, value, target, higher_is_better, fmt)
        self.ratios.append(r)
        return r

    def note(self, text: str) -> None:
        self.notes.append(text)

    def series(
        self,
        panel: str,
        label: str,
        xs: Sequence[float],
        ys: Sequence[float],
        *,
        xlabel: str = "",
        ylabel: str = "",
        kind: str = "line",
    ) -> None:
        self.plots.append(
            Series(
                panel, label, [float(x) for x in xs], [float(y) for y in ys], xlabel, ylabel, kind
            )
        )

    def distribution(self, panel: str, label: str, values: Sequence[float], *, ylabel: str) -> None:
        """``values`` sorted against their percentile (nothing when empty)."""
        ordered = sorted(values)
        if ordered:
            n = len(ordered)
            xs = [100.0 * (i + 0.5) / n for i in range(n)]
            self.series(panel, label, xs, ordered, xlabel="percentile", ylabel=ylabel)

    # -- rendering ----------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "bench": self.name,
            "title": self.title,
            "started_at": self.started_at,
            "machine": self.machine,
            "tables": [{"title": t, "columns": c, "rows": r} for t, c, r in self.tables],
            "ratios": [r.to_json() for r in self.ratios],
            "notes": self.notes,
            "series": [s.__dict__ for s in self.plots],
            "data": self.data,
        }

    def markdown(self, *, heading_level: int = 2) -> str:
        h = "#" * heading_level
        m = self.machine
        load_end = m.get("load_avg_1m_end")
        load = f"{m['load_avg_1m_start']:.2f}" + (
            f" -> {load_end:.2f}" if load_end is not None else ""
        )
        parts = [
            f"{h} {self.title}",
            "",
            f"`spillway bench {self.name}`, {self.started_at}; machine: {m['cpu']}, "
            f"{m['cpus']} CPUs, {m.get('memory_gib')} GiB; load average {load}.",
        ]
        for title, columns, rows in self.tables:
            parts += [
                "",
                f"**{title}**",
                "",
                markdown_table(columns, rows, self.formats.get(title)),
            ]
        if self.ratios:
            rows = [
                {
                    "measure": r.name,
                    "value": _cell(r.value, r.fmt),
                    "target": (
                        "-"
                        if r.target is None
                        else (">= " if r.higher_is_better else "<= ") + _cell(r.target, r.fmt)
                    ),
                    "met": "-" if r.met is None else r.met,
                }
                for r in self.ratios
            ]
            parts += ["", markdown_table(["measure", "value", "target", "met"], rows)]
        if self.notes:
            parts += [""] + [f"* {n}" for n in self.notes]
        return "\n".join(parts) + "\n"

    def _png(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels: dict[str, list[Series]] = {}
        for s in self.plots:
            panels.setdefault(s.panel, []).append(s)
        if not panels and self.ratios:
            panels["ratios"] = []
        count = max(1, len(panels))
        fig, axes = plt.subplots(count, 1, figsize=(9, 3.2 * count), squeeze=False)
        for ax, (panel, series) in zip(axes[:, 0], panels.items(), strict=False):
            ax.set_title(panel)
            if not series:  # ratios as bars, their targets as ticks
                names = [r.name for r in self.ratios]
                ax.barh(names, [r.value for r in self.ratios])
                for i, r in enumerate(self.ratios):
                    if r.target is not None:
                        ax.plot([r.target, r.target], [i - 0.4, i + 0.4], color="red")
                continue
            for s in series:
                if s.kind == "scatter":
                    ax.scatter(s.xs, s.ys, s=4, label=s.label, alpha=0.6)
                elif s.kind == "step":
                    ax.step(s.xs, s.ys, where="post", label=s.label)
                else:
                    ax.plot(s.xs, s.ys, label=s.label)
            ax.set_xlabel(series[0].xlabel)
            ax.set_ylabel(series[0].ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"{self.title} ({self.machine['cpus']} CPUs)")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)

    def write(self, out_dir: Path) -> dict[str, Path]:
        """Write ``<name>.json``, ``.md`` and ``.png`` under ``out_dir``; returns the paths."""
        self.machine["load_avg_1m_end"] = os.getloadavg()[0]
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {
            "json": out_dir / f"{self.name}.json",
            "md": out_dir / f"{self.name}.md",
            "png": out_dir / f"{self.name}.png",
        }
        paths["json"].write_text(json.dumps(self.to_json(), indent=2, default=str) + "\n")
        paths["md"].write_text(self.markdown())
        self._png(paths["png"])
        return paths


@contextmanager
def progress(
    total: int, what: str, *, console: Console | None = None
) -> Iterator[Callable[[str], None]]:
    """A rich progress bar; the yielded ``step(description)`` advances it by one."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console or Console(stderr=True), transient=True) as bar:
        task = bar.add_task(what, total=total)

        def step(description: str) -> None:
            bar.update(task, advance=1, description=f"{what}: {description}")

        yield step


def combine(title: str, markdown_files: Sequence[Path], out: Path) -> Path:
    """One markdown of several reports' markdown (``spillway bench all``)."""
    parts = [f"# {title}", ""]
    for path in markdown_files:
        text = path.read_text()
        parts.append(text.replace("\n## ", "\n### ").replace("## ", "### ", 1))
    out.write_text("\n".join(parts))
    return out
