"""Command-line entry points for building model variants.

``models_app`` is mounted by the CLI root as ``spillway models``. ``spillway bench models`` lives in
``sim.bench_models`` (it writes the shared benchmark report, which ``models`` must not know).
Errors are reported as one line and a non-zero exit, never a traceback.
"""

from __future__ import annotations

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


def quiet_libraries() -> None:
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

    quiet_libraries()
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
