"""``spillway demo`` (and, as they land, the simulator's benchmarks)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from sim.bench_agent import bench_agent
from sim.bench_overflow import bench_overflow
from sim.bench_pool import bench_pool
from sim.bench_rollout import bench_rollout
from sim.broker import BrokerError
from sim.demo import DemoError, DemoReport, DemoSettings, run_demo, write_report


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
