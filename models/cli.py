"""Command-line entry points for building and benchmarking model variants.

``models_app`` is mounted by the CLI root as ``spillway models``; :func:`bench_models` is registered
as
``spillway bench models``. Errors are reported as one line and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

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
    seconds: float = typer.Option(8.0, "--seconds", help="Timing budget per batch size."),
) -> None:
    """Benchmark every built variant side by side on this machine."""
    from models.bench import bench_variants
    from models.build import DEFAULT_KEY_PATH
    from models.signing import public_path

    _quiet_libraries()
    public_key = public_path(out / DEFAULT_KEY_PATH)
    if not public_key.is_file():
        raise _fail(f"no variants under {out}; run `spillway models build --out {out}` first")
    try:
        report = bench_variants(out, public_key_path=public_key, seconds_per_batch=seconds)
    except (ModelError, OSError, RuntimeError) as exc:
        raise _fail(str(exc)) from None
    if not report["variants"]:
        raise _fail(f"no built variants under {out}")
    table = Table(title=f"{report['machine']['cpu']} ({report['machine']['cores']} cores)")
    for column in (
        "variant",
        "b1 p50/p95 ms",
        "b8 p50/p95 ms",
        "b32 p50/p95 ms",
        "b8 /s",
        "x fp32 b8",
        "x fp32 b32",
        "MiB",
        "RSS MiB",
        "mean cos",
        "min cos",
        "top-1",
    ):
        table.add_column(column)
    for variant, row in report["variants"].items():
        q = row["quality"]
        table.add_row(
            variant,
            *(f"{row[f'b{b}']['p50_ms']:.1f}/{row[f'b{b}']['p95_ms']:.1f}" for b in (1, 8, 32)),
            f"{row['b8']['throughput_per_s']:.0f}",
            f"{row.get('speedup_b8', float('nan')):.2f}",
            f"{row.get('speedup_b32', float('nan')):.2f}",
            f"{row['size_bytes'] / 2**20:.1f}",
            f"{row['peak_rss_mib']:.0f}",
            f"{q['mean_cosine']:.5f}",
            f"{q['min_cosine']:.5f}",
            f"{q['top1_agreement']:.4f}",
        )
    Console().print(table)
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=2))
