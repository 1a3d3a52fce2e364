"""``spillway demo`` (and, as they land, the simulator's benchmarks)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from models.build import VARIANTS
from sim.bench_agent import bench_agent
from sim.bench_fleet import bench_fleet
from sim.bench_intake import bench_intake
from sim.bench_models import bench_models
from sim.bench_overflow import bench_overflow
from sim.bench_pool import bench_pool
from sim.bench_rollout import bench_rollout
from sim.broker import BrokerError
from sim.demo import DemoError, DemoReport, DemoSettings, run_demo, write_report
from sim.report import progress

ALL_BENCHES = ("models", "agent", "pool", "rollout", "overflow", "intake", "fleet")
"""What ``spillway bench all`` runs, in this order."""


def demo(
    agents: int = typer.Option(3, "--agents", min=1, max=50, help="Number of edge agents."),
    duration: float = typer.Option(
        20.0, "--duration", min=2, help="Seconds of traffic (steady, burst, steady)."
    ),
    report: Path | None = typer.Option(None, "--report", help="Write the JSON report here."),
    work_dir: Path = typer.Option(Path("var/demo"), "--work-dir", help="State and logs."),
    model_dir: Path = typer.Option(
        Path("var/models"), "--model-dir", help="Model variants (built there when missing)."
    ),
    port: int | None = typer.Option(None, "--port", help="Controller HTTP port (default: free)."),
    keep_running: bool = typer.Option(
        False, "--keep-running", help="Stay up (light traffic) after the summary until Ctrl-C."
    ),
) -> None:
    """The whole story: broker, controller, models, cloud pool, agents, an INT8 rollout,
    traffic with a burst that overflows to the cloud, and a summary."""
    console = Console()
    if not console.is_terminal:  # a log or a pipe: do not squeeze the table to 80 columns
        console = Console(width=140)
    settings = DemoSettings(
        agents=agents,
        duration_s=duration,
        work_dir=work_dir,
        http_port=port,
        model_dir=model_dir,
        keep_running=keep_running,
    )
    t0 = time.monotonic()

    def summarize(result: DemoReport) -> None:
        _summary(console, result, took_s=time.monotonic() - t0)
        if report is not None:
            write_report(result, report)
            console.print(f"report      {report}", highlight=False, soft_wrap=True)

    signal.signal(signal.SIGTERM, _stop_like_ctrl_c)  # `kill` stops every child too
    try:
        run_demo(
            settings,
            say=lambda line: console.print(line, highlight=False, soft_wrap=True),
            summary=summarize,
        )
    except (DemoError, BrokerError) as exc:
        typer.echo(f"spillway demo: {exc}", err=True)
        raise typer.Exit(1) from exc
    except KeyboardInterrupt:
        typer.echo("spillway demo: stopped; every process ended", err=True)
        raise typer.Exit(0 if keep_running else 130) from None


def _stop_like_ctrl_c(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _summary(console: Console, result: DemoReport, *, took_s: float) -> None:
    table = Table(title=f"Demo fleet after {result.traffic.get('duration_s', 0):.0f}s of traffic")
    for column in ("device", "profile", "status", "variant", "requests", "edge", "cloud"):
        table.add_column(
            column, justify="right" if column in ("requests", "edge", "cloud") else "left"
        )
    for column in ("p50 ms", "p99 ms", "req/s", "offload"):
        table.add_column(column, justify="right")
    rows = [(d["id"], d) for d in result.devices]
    totals = result.traffic.get("totals", {})
    for name, device in rows:
        t = device["traffic"]
        table.add_row(
            name,
            device["profile"].removeprefix("jetson-"),
            str(device.get("status")),
            str(device.get("variant")),
            str(t["requests"]),
            str(t["edge"]),
            str(t["cloud"]),
            _ms(t["p50_ms"]),
            _ms(t["p99_ms"]),
            f"{t['throughput_rps']:.1f}",
            f"{t['offload_ratio']:.0%}",
        )
    if totals:
        table.add_row(
            "fleet",
            f"{len(rows)} devices",
            f"{sum(1 for d in result.devices if d.get('status') == 'online')} online",
            ", ".join(f"{k} {v}" for k, v in (result.fleet.get("by_variant") or {}).items()),
            str(totals["requests"]),
            str(totals["edge"]),
            str(totals["cloud"]),
            _ms(totals["p50_ms"]),
            _ms(totals["p99_ms"]),
            f"{totals['throughput_rps']:.1f}",
            f"{totals['offload_ratio']:.0%}",
            style="bold",
        )
    console.print(table)
    burst, steady = result.traffic.get("burst", {}), result.traffic.get("steady", {})
    if burst:
        console.print(
            f"overflow    burst: {burst['offload_ratio']:.0%} of {burst['ok']} answers from the "
            f"cloud, p99 {_ms(burst['p99_ms'])} ms; steady: {steady['offload_ratio']:.0%}, "
            f"p99 {_ms(steady['p99_ms'])} ms",
            highlight=False,
        )
    rollout = result.rollout
    if rollout:
        console.print(
            f"rollout     #{rollout['id']} {rollout['state']} in {rollout['duration_s']:.0f}s "
            f"({len(rollout['waves'])} waves)",
            highlight=False,
        )
    build = result.models.get("build", {})
    steps = ", ".join(f"{k} {v:.0f}s" for k, v in result.steps_s.items())
    console.print(
        f"took        {took_s:.0f}s in all ({steps}); model build "
        f"{'cold' if build.get('built') else 'cached'}",
        highlight=False,
    )
    console.print(f"dashboard   {result.dashboard_url}", highlight=False)


def _bench_args(name: str, out: Path, model_dir: Path) -> list[str]:
    """Each bench's own command line: every bench writes ``<out>/<name>.json/.md/.png``
    through ``--out``; the ones that use a built model (the fleet rolls one out) also get
    ``--model-dir``."""
    args = ["--out", str(out)]
    if name not in ("pool", "intake"):  # the pool builds its own encoder; no model
        args += ["--model-dir", str(model_dir)]
    if name == "models":
        args += ["--rounds", "5"]
    return args


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
    if not all((model_dir / v / "manifest.json").is_file() for v in VARIANTS):  # then cached
        typer.echo(f"building the model variants into {model_dir} (log {out / 'build.log'})")
        with (out / "build.log").open("wb") as f:
            built = subprocess.call(
                [sys.executable, "-m", "spillway", "models", "build", "--out", str(model_dir)],
                stdout=f,
                stderr=subprocess.STDOUT,
            )
        if built != 0:
            typer.echo(
                f"spillway bench all: model build failed (see {out / 'build.log'})", err=True
            )
            raise typer.Exit(1)
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
    bench_app.command("models", help="Every model variant side by side.")(bench_models)
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
    bench_app.command(
        "intake", help="Controller MQTT intake: a broker backlog drained, msgs/s, CPU per message."
    )(bench_intake)
    bench_app.command("all", help="Every benchmark in turn; a combined markdown.")(bench_all)
