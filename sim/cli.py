"""``spillway demo`` (and, as they land, the simulator's benchmarks)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from sim.bench_agent import bench_agent
from sim.bench_fleet import bench_fleet
from sim.bench_overflow import bench_overflow
from sim.bench_pool import bench_pool
from sim.bench_rollout import bench_rollout
from sim.broker import BrokerError
from sim.demo import DemoError, DemoReport, DemoSettings, run_demo, write_report
from sim.report import progress

ALL_BENCHES = ("models", "agent", "pool", "rollout", "overflow", "fleet")
"""What ``spillway bench all`` runs, in this order."""


def demo(
    agents: int = typer.Option(3, "--agents", min=1, max=200, help="Number of edge agents."),
    duration: float = typer.Option(20.0, "--duration", min=0, help="Seconds to run once up."),
    report: Path | None = typer.Option(None, "--report", help="Write the JSON report here."),
    work_dir: Path = typer.Option(Path("var/demo"), "--work-dir", help="State and logs."),
    port: int | None = typer.Option(None, "--port", help="Controller HTTP port (default: free)."),
) -> None:
    """Run the whole story: broker, controller, agents, a policy rollout, a summary."""
    console = Console()
    settings = DemoSettings(agents=agents, duration_s=duration, work_dir=work_dir, http_port=port)
    try:
        result = run_demo(settings, say=lambda line: console.print(line, highlight=False))
    except (DemoError, BrokerError) as exc:
        typer.echo(f"spillway demo: {exc}", err=True)
        raise typer.Exit(1) from exc
    except KeyboardInterrupt:
        typer.echo("spillway demo: interrupted; everything stopped", err=True)
        raise typer.Exit(130) from None
    _summary(console, result)
    if report is not None:
        write_report(result, report)
        console.print(f"report      {report}")


def _summary(console: Console, result: DemoReport) -> None:
    table = Table(title="Fleet at the end of the demo")
    for column in ("device", "hardware class", "status", "policy gen", "staleness s"):
        table.add_column(column)
    for device in result.devices:
        reported = device.get("reported") or {}
        table.add_row(
            device["id"],
            device.get("hardware_class", ""),
            device["status"],
            str(reported.get("observed_generation", "-")),
            f"{device.get('staleness_age_s', 0):.1f}",
        )
    console.print(table)


def _bench_args(name: str, out: Path, model_dir: Path) -> list[str]:
    """Each bench's own command line: the shared-report benches take ``--out``, the others
    ``--json`` (their markdown goes to their log)."""
    if name in ("overflow", "fleet"):
        extra = ["--model-dir", str(model_dir)] if name == "overflow" else []
        return ["--out", str(out), *extra]
    if name == "models":  # its --out is the model directory
        return ["--json", str(out / "models.json"), "--out", str(model_dir), "--rounds", "5"]
    extra = [] if name == "pool" else ["--model-dir", str(model_dir)]
    return ["--json", str(out / f"{name}.json"), *extra]


def bench_all(
    out: Path = typer.Option(Path("var/bench"), "--out", help="Where every report goes."),
    model_dir: Path = typer.Option(
        Path("var/models"), "--model-dir", help="Directory `spillway models build` wrote."
    ),
    only: list[str] = typer.Option([], "--only", help="Run only these benches (repeat)."),
) -> None:
    """Every benchmark, one after the other, each in its own process; one combined markdown."""
    names = [n for n in ALL_BENCHES if not only or n in only]
    unknown = sorted(set(only) - set(ALL_BENCHES))
    if unknown:
        typer.echo(f"spillway bench all: unknown bench {unknown}; known: {ALL_BENCHES}", err=True)
        raise typer.Exit(2)
    out.mkdir(parents=True, exist_ok=True)
    sections = ["# Spillway benchmarks (spillway bench all)", ""]
    failed: list[str] = []
    with progress(len(names), "bench all") as step:
        for name in names:
            log = out / f"{name}.log"
            with log.open("wb") as f:
                code = subprocess.call(
                    [
                        sys.executable,
                        "-m",
                        "spillway",
                        "bench",
                        name,
                        *_bench_args(name, out, model_dir),
                    ],
                    stdout=f,
                    stderr=subprocess.STDOUT,
                )
            step(f"{name}: {'ok' if code == 0 else f'exit {code}'}")
            md = out / f"{name}.md"
            sections.append(f"## {name} ({'ok' if code == 0 else f'**failed, exit {code}**'})")
            if code == 0 and md.is_file():
                sections.append(md.read_text().replace("\n## ", "\n### ").removeprefix("## "))
            else:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
                sections += ["", "```", tail, "```", ""]
            if code != 0:
                failed.append(name)
    combined = out / "all.md"
    combined.write_text("\n".join(sections) + "\n")
    typer.echo(f"combined    {combined}")
    if failed:
        typer.echo(f"spillway bench all: failed: {', '.join(failed)}", err=True)
        raise typer.Exit(1)


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    app.command("demo")(demo)
    bench_app.command("agent", help="Agent end-to-end vs a raw onnxruntime loop.")(bench_agent)
    bench_app.command("pool", help="Overflow pool: TP=1 vs TP=2, 1 vs 2 replicas.")(bench_pool)
    bench_app.command("rollout", help="Model delivery to N agents vs raw MQTT fan-out.")(
        bench_rollout
    )
    bench_app.command(
        "overflow", help="Edge-only vs edge + cloud overflow under a burst (edge simulated)."
    )(bench_overflow)
    bench_app.command(
        "fleet", help="Control plane under N simulated agents: ingest, REST p99, convergence."
    )(bench_fleet)
    bench_app.command("all", help="Every benchmark in turn; a combined markdown.")(bench_all)
