"""Command-line entry points for building and benchmarking model variants.

``models_app`` is mounted by the CLI root as ``spillway models``; :func:`bench_models` is registered
as
``spillway bench models``. Errors are reported as one line and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from models.errors import ModelError

logger = logging.getLogger(__name__)

models_app = typer.Typer(
    help="Build and publish the embedding model variants.", no_args_is_help=True
)


def _quiet_libraries() -> None:
    """ORT's quantizer logs at INFO on the root logger; bnb warns once per matmul call."""
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _fail(message: str) -> typer.Exit:
    Console(stderr=True).print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(code=1)


@models_app.command("build")
def build(
    out: Path = typer.Option(Path("var/models"), "--out", help="Output directory."),
    force: bool = typer.Option(False, "--force", help="Rebuild even when cached."),
    key: Path | None = typer.Option(
        None, "--key", help="Ed25519 private key (PEM); default OUT/keys/signing.key."
    ),
    eval_sentences: int = typer.Option(1200, "--eval-sentences", min=50, hidden=True),
) -> None:
    """Build, evaluate, sign and publish every variant (cached by content hash)."""
    from models.build import VARIANTS, BuildOptions, build_all

    _quiet_libraries()
    options = BuildOptions(out=out, key_path=key, force=force, eval_sentences=eval_sentences)
    console = Console()
    columns = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("building", total=len(VARIANTS))

            def on_step(variant: str, step: str) -> None:
                progress.update(task, description=f"{variant}: {step}")
                if step in ("built", "cached"):
                    progress.advance(task)

            report = build_all(options, progress=on_step)
    except (ModelError, OSError, RuntimeError, ValueError) as exc:
        raise _fail(str(exc)) from None
    table = Table("variant", "status", "size MiB", "mean cos", "min cos", "top-1")
    for variant, manifest in report.manifests.items():
        q = manifest.quality
        table.add_row(
            variant,
            "cached" if variant in report.cached else "built",
            f"{manifest.size_bytes / 2**20:.1f}",
            f"{q.mean_cosine:.5f}",
            f"{q.min_cosine:.5f}",
            f"{q.top1_agreement:.4f}",
        )
    console.print(table)


def bench_models(
    json_path: Path | None = typer.Option(None, "--json", help="Also write the results here."),
    out: Path = typer.Option(Path("var/models"), "--out", help="Directory `models build` wrote."),
    rounds: int = typer.Option(30, "--rounds", min=1, help="Interleaved measurement rounds."),
    threads: int = typer.Option(2, "--threads", min=1, help="Intra-op threads for every variant."),
    variant: list[str] | None = typer.Option(
        None, "--variant", help="Only these variants (repeatable); fp32-onnx is always included."
    ),
) -> None:
    """Benchmark every built variant side by side: interleaved rounds, median per-round ratios."""
    from models.bench import BenchOptions, bench_variants
    from models.build import DEFAULT_KEY_PATH
    from models.signing import public_path

    _quiet_libraries()
    public_key = public_path(out / DEFAULT_KEY_PATH)
    if not public_key.is_file():
        raise _fail(f"no variants under {out}; run `spillway models build --out {out}` first")
    options = BenchOptions(
        rounds=rounds, threads=threads, variants=tuple(variant) if variant else None
    )
    try:
        report = bench_variants(out, public_key_path=public_key, options=options)
    except (ModelError, OSError, RuntimeError) as exc:
        raise _fail(str(exc)) from None
    if not report["variants"]:
        raise _fail(f"no built variants under {out}")
    machine = report["machine"]
    load = machine["load_average_1m"]
    title = (
        f"{machine['cpu']} ({machine['cores']} cores, {'/'.join(machine['isa']) or '?'}), "
        f"{threads} threads, {rounds} interleaved rounds, "
        f"load {load['before']:.1f}->{load['after']:.1f}"
    )
    table = Table(title=title)
    for column in (
        "variant",
        "b1 p50/p95 ms",
        "b8 p50/p95 ms",
        "b32 p50/p95 ms",
        "b8 /s",
        "x fp32 b8 (IQR)",
        "x fp32 b32 (IQR)",
        "MiB",
        "RSS MiB",
        "mean cos",
        "min cos",
        "top-1",
    ):
        table.add_column(column)

    def ratio(row: dict[str, Any], batch: str) -> str:
        if "speedup" not in row:
            return "-"
        r = row["speedup"][batch]
        return f"{r['median']:.2f} ({r['p25']:.2f}-{r['p75']:.2f})"

    for name, row in report["variants"].items():
        q = row["quality"]
        table.add_row(
            name,
            *(f"{row[f'b{b}']['p50_ms']:.1f}/{row[f'b{b}']['p95_ms']:.1f}" for b in (1, 8, 32)),
            f"{row['b8']['throughput_per_s']:.0f}",
            ratio(row, "b8"),
            ratio(row, "b32"),
            f"{row['size_bytes'] / 2**20:.1f}",
            f"{row['peak_rss_mib']:.0f}",
            f"{q['mean_cosine']:.5f}",
            f"{q['min_cosine']:.5f}",
            f"{q['top1_agreement']:.4f}",
        )
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 180)  # a piped table keeps its columns
    console.print(table)
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=2))
