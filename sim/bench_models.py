"""``spillway bench models``: every built model variant side by side, as a shared report.

The measuring is ``models.bench.bench_variants`` (interleaved rounds, per-round ratios against
FP32 ONNX); this module is the command around it and the pure step from its result to a
``BenchReport`` (:func:`models_report`): the latency / throughput table, the per-round speed
ratios with their interquartile range, size, memory and the build's quality, every speed
target (``models.bench.SPEED_TARGETS``) and quality gate (each manifest's) as a ratio with its
target, and plots of latency by batch size and of the per-round ratios. It lives in ``sim``
because ``models`` must not know the report writer; ``models`` keeps ``spillway models build``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from sim.report import BenchReport, progress

BATCHES = (1, 8, 32)
"""The batch sizes ``models.bench`` measures (its ``BATCH_SIZES``)."""
_QUALITY = (
    ("mean cos", "mean_cosine", "min_mean_cosine"),
    ("min cos", "min_cosine", "min_min_cosine"),
    ("top-1", "top1_agreement", "min_top1_agreement"),
)


def _title(result: dict[str, Any]) -> str:
    machine, method = result["machine"], result["method"]
    load = machine["load_average_1m"]
    return (
        f"{machine['cpu']} ({machine['cores']} cores, {'/'.join(machine['isa']) or '?'}), "
        f"{method['threads']} threads, {method['rounds']} interleaved rounds, "
        f"load {load['before']:.1f}->{load['after']:.1f}"
    )


def models_report(result: dict[str, Any]) -> BenchReport:
    """``bench_variants``' result -> the shared report (pure: unit-tested)."""
    method = result["method"]
    base = result.get("baseline")
    variants: dict[str, Any] = result["variants"]
    report = BenchReport("models", "Models: every built variant side by side")
    report.table(
        f"Latency (ms, pooled over rounds) and throughput: {_title(result)}",
        ["variant", "device"]
        + [f"b{b} {q} ms" for b in BATCHES for q in ("p50", "p95")]
        + [f"b{b} /s" for b in BATCHES],
        [
            {
                "variant": name,
                "device": row["device"],
                **{
                    f"b{b} {q} ms": row[f"b{b}"][f"{q}_ms"] for b in BATCHES for q in ("p50", "p95")
                },
                **{f"b{b} /s": row[f"b{b}"]["throughput_per_s"] for b in BATCHES},
            }
            for name, row in variants.items()
        ],
    )
    if base is not None:
        report.table(
            f"Throughput vs {base}: per-round ratio, median and interquartile range",
            ["variant"] + [f"b{b} {q}" for b in BATCHES for q in ("x", "p25", "p75")],
            [
                {
                    "variant": name,
                    **{
                        f"b{b} {q}": row["speedup"][f"b{b}"][key]
                        for b in BATCHES
                        for q, key in (("x", "median"), ("p25", "p25"), ("p75", "p75"))
                    },
                }
                for name, row in variants.items()
            ],
        )
    fmt5 = "{:.5f}"
    report.table(
        "Size, memory and quality (the build's measurement; FP32 variants vs torch, "
        f"the others vs {base or 'fp32-onnx'})",
        ["variant", "MiB", "size ratio", "peak RSS MiB", "mean cos", "min cos", "top-1", "samples"],
        [
            {
                "variant": name,
                "MiB": row["size_bytes"] / 2**20,
                "size ratio": row.get("size_ratio"),
                "peak RSS MiB": row["peak_rss_mib"],
                "mean cos": row["quality"]["mean_cosine"],
                "min cos": row["quality"]["min_cosine"],
                "top-1": row["quality"]["top1_agreement"],
                "samples": row["quality"].get("samples"),
            }
            for name, row in variants.items()
        ],
        formats={"mean cos": fmt5, "min cos": fmt5, "top-1": "{:.4f}"},
    )
    targets: dict[str, Any] = result.get("speed_targets", {})
    skipped: list[str] = []
    b8_targets: dict[str, float] = {}
    if base is not None:
        for name, row in variants.items():
            if name == base:
                continue
            target = targets.get(name)
            for b in (8, 32):
                wanted = None
                if target is not None and target["batch"] == b:
                    devices = target.get("devices")
                    if devices is None or any(d in row["device"] for d in devices):
                        wanted = target["ratio"]
                    else:
                        skipped.append(f"{name} ({target['why']}; measured on {row['device']})")
                if wanted is not None and b == 8:
                    b8_targets[name] = wanted
                report.ratio(
                    f"{name} throughput / {base}, batch {b}",
                    row["speedup"][f"b{b}"]["median"],
                    target=wanted,
                )
    for name, row in variants.items():
        gate = row.get("quality_gate")
        if not gate:
            continue
        for label, metric, floor in _QUALITY:
            report.ratio(
                f"{name} {label}",
                row["quality"][metric],
                target=gate[floor],
                fmt="{:.4f}" if label == "top-1" else fmt5,
            )
    for name, row in variants.items():
        report.series(
            "p50 latency by batch size",
            name,
            list(BATCHES),
            [row[f"b{b}"]["p50_ms"] for b in BATCHES],
            xlabel="batch size",
            ylabel="ms",
        )
    if base is not None:
        panel = f"throughput / {base} per round, batch 8"
        for name, row in variants.items():
            rounds = row["speedup"]["b8"].get("rounds") or []
            if name != base and rounds:
                report.series(
                    panel,
                    name,
                    list(range(1, len(rounds) + 1)),
                    rounds,
                    xlabel="round",
                    ylabel="ratio",
                )
        for name, wanted in b8_targets.items():
            report.series(
                panel,
                f"{name} target {wanted}",
                [1, method["rounds"]],
                [wanted, wanted],
                xlabel="round",
                ylabel="ratio",
            )
    report.note(
        f"{method['rounds']} measured rounds (plus one discarded warm-up), every variant in its "
        f"own process with {method['threads']} intra-op threads; ratios are per round, the "
        "median is reported (not a ratio of medians). Absolute latencies are pooled over rounds "
        "and depend on the machine's load."
    )
    if base is None:
        report.note("fp32-onnx is not built: no speed ratios.")
    for what in skipped:
        report.note(f"Speed target not applicable here: {what}.")
    report.data.update(result)
    return report


def _print_table(result: dict[str, Any]) -> None:
    """The terminal table the command has always printed."""
    table = Table(title=_title(result))
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

    for name, row in result["variants"].items():
        q = row["quality"]
        table.add_row(
            name,
            *(f"{row[f'b{b}']['p50_ms']:.1f}/{row[f'b{b}']['p95_ms']:.1f}" for b in BATCHES),
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


def _fail(message: str) -> typer.Exit:
    Console(stderr=True).print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(code=1)


def bench_models(
    out: Path = typer.Option(Path("var/bench"), "--out", help="Where the reports go."),
    model_dir: Path = typer.Option(
        Path("var/models"), "--model-dir", help="Directory `spillway models build` wrote."
    ),
    json_path: Path | None = typer.Option(
        None, "--json", help="Also write the raw results here (the pre-report JSON)."
    ),
    rounds: int = typer.Option(30, "--rounds", min=1, help="Interleaved measurement rounds."),
    threads: int = typer.Option(2, "--threads", min=1, help="Intra-op threads for every variant."),
    variant: list[str] | None = typer.Option(
        None, "--variant", help="Only these variants (repeatable); fp32-onnx is always included."
    ),
) -> None:
    """Benchmark every built variant side by side: interleaved rounds, median per-round ratios."""
    from models.bench import BenchOptions, bench_variants
    from models.build import DEFAULT_KEY_PATH
    from models.cli import quiet_libraries
    from models.errors import ModelError
    from models.signing import public_path

    quiet_libraries()
    public_key = public_path(model_dir / DEFAULT_KEY_PATH)
    if not public_key.is_file():
        raise _fail(
            f"no variants under {model_dir}; run `spillway models build --out {model_dir}` first"
        )
    options = BenchOptions(
        rounds=rounds, threads=threads, variants=tuple(variant) if variant else None
    )
    try:
        with progress(rounds + 2, "bench models") as step:
            result = bench_variants(
                model_dir, public_key_path=public_key, options=options, progress=step
            )
    except (ModelError, OSError, RuntimeError) as exc:
        raise _fail(str(exc)) from None
    if not result["variants"]:
        raise _fail(f"no built variants under {model_dir}")
    _print_table(result)
    paths = models_report(result).write(out)
    typer.echo(f"reports     {paths['json']} {paths['md']} {paths['png']}")
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2))
        typer.echo(f"json        {json_path}")
