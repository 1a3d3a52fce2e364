"""Each bench's result -> BenchReport step, on small synthetic results (no benchmark runs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import typer

from sim.bench_agent import agent_report
from sim.bench_models import models_report
from sim.bench_pool import pool_report
from sim.cli import ALL_BENCHES, _bench_args, register
from sim.report import BenchReport


def _ratios(report: BenchReport) -> dict[str, tuple[float, float | None, bool | None]]:
    return {r.name: (r.value, r.target, r.met) for r in report.ratios}


def _table(report: BenchReport, starts: str) -> list[dict[str, Any]]:
    (rows,) = [rows for title, _, rows in report.tables if title.startswith(starts)]
    return rows


# -- models ---------------------------------------------------------------------------------


def _variant(
    device: str, p50: float, *, speedup: dict[str, float] | None, top1: float
) -> dict[str, Any]:
    row: dict[str, Any] = {"device": device}
    for b in (1, 8, 32):
        row[f"b{b}"] = {"p50_ms": p50 * b, "p95_ms": p50 * b * 2, "throughput_per_s": 1000 / p50}
    row.update(peak_rss_mib=300.0, size_bytes=64 * 2**20)
    row["quality"] = {
        "mean_cosine": 0.99878,
        "min_cosine": 0.99426,
        "top1_agreement": top1,
        "samples": 1200,
        "corpus": "stdlib",
    }
    row["quality_gate"] = {
        "min_mean_cosine": 0.995,
        "min_min_cosine": 0.985,
        "min_top1_agreement": 0.95,
    }
    if speedup is not None:
        row["speedup"] = {
            b: {"median": r, "p25": r - 0.1, "p75": r + 0.1, "rounds": [r - 0.1, r, r + 0.1]}
            for b, r in speedup.items()
        }
        row["size_ratio"] = 0.73
    return row


def _models_result(*, fp16_device: str = "CPUExecutionProvider") -> dict[str, Any]:
    one = {"b1": 1.0, "b8": 1.0, "b32": 1.0}
    return {
        "machine": {
            "cpu": "Test CPU",
            "cores": 2,
            "isa": ["avx2"],
            "load_average_1m": {"before": 0.5, "after": 1.5},
        },
        "method": {"rounds": 3, "threads": 2},
        "baseline": "fp32-onnx",
        "speed_targets": {
            "int8-onnx": {"batch": 8, "ratio": 2.0, "devices": None, "why": "issue 3"},
            "fp16-onnx": {"batch": 32, "ratio": 1.5, "devices": ["CUDA"], "why": "on a GPU"},
        },
        "variants": {
            "fp32-onnx": _variant("CPUExecutionProvider", 8.0, speedup=one, top1=1.0),
            "int8-onnx": _variant(
                "CPUExecutionProvider",
                7.0,
                speedup={"b1": 1.1, "b8": 1.17, "b32": 1.13},
                top1=0.9575,
            ),
            "fp16-onnx": _variant(
                fp16_device, 7.5, speedup={"b1": 1.0, "b8": 1.01, "b32": 1.6}, top1=0.94
            ),
        },
    }


def test_models_report_sets_speed_and_quality_beside_their_targets() -> None:
    report = models_report(_models_result())
    ratios = _ratios(report)
    assert ratios["int8-onnx throughput / fp32-onnx, batch 8"] == (1.17, 2.0, False)
    assert ratios["int8-onnx throughput / fp32-onnx, batch 32"] == (1.13, None, None)
    # FP16's target is for a GPU: measured on a CPU it is shown without one, with a note.
    assert ratios["fp16-onnx throughput / fp32-onnx, batch 32"] == (1.6, None, None)
    assert any("fp16-onnx" in n and "not applicable" in n for n in report.notes)
    assert ratios["int8-onnx top-1"] == (0.9575, 0.95, True)
    assert ratios["fp16-onnx top-1"][2] is False
    assert ratios["int8-onnx min cos"] == (0.99426, 0.985, True)
    assert not any(name.startswith("fp32-onnx throughput") for name in ratios)

    latency = _table(report, "Latency")
    assert [r["variant"] for r in latency] == ["fp32-onnx", "int8-onnx", "fp16-onnx"]
    assert latency[1]["b8 p50 ms"] == 56.0 and latency[1]["b32 p95 ms"] == 448.0
    speed = _table(report, "Throughput vs fp32-onnx")
    assert speed[1]["b8 x"] == 1.17 and speed[1]["b8 p25"] == pytest.approx(1.07)
    quality = _table(report, "Size, memory and quality")
    assert quality[1]["MiB"] == 64.0 and quality[1]["top-1"] == 0.9575

    md = report.markdown()
    assert "| int8-onnx | 64.0 | 0.73 | 300 | 0.99878 | 0.99426 | 0.9575 | 1200 |" in md
    assert "| int8-onnx mean cos | 0.99878 | >= 0.99500 | yes |" in md
    panels = {s.panel for s in report.plots}
    assert panels == {"p50 latency by batch size", "throughput / fp32-onnx per round, batch 8"}
    assert report.data["variants"]["int8-onnx"]["speedup"]["b8"]["median"] == 1.17


def test_models_report_applies_the_gpu_target_on_a_gpu() -> None:
    report = models_report(_models_result(fp16_device="CUDAExecutionProvider"))
    assert _ratios(report)["fp16-onnx throughput / fp32-onnx, batch 32"] == (1.6, 1.5, True)


# -- agent ----------------------------------------------------------------------------------


def _agent_result() -> dict[str, Any]:
    return {
        "variant": "int8-onnx",
        "device": "CPUExecutionProvider",
        "threads": 2,
        "cpu_count": 2,
        "rounds": 2,
        "phase_s": 4.0,
        "load_avg_1m": {"before": 0.6, "after": 2.8},
        "saturation": {
            "raw_batch": 32,
            "raw_items_per_s": 282.2,
            "raw_batch1_items_per_s": 235.0,
            "agent_items_per_s": 276.0,
            "agent_clients": 64,
            "ratio": 0.95,
            "ratios": [1.0, 0.9],
            "target": 0.9,
            "met": True,
        },
        "latency_batch1": {
            "samples": 4,
            "raw_p50_ms": 4.44,
            "agent_p50_ms": 6.67,
            "added_p50_ms": 2.23,
            "agent_outbox_normal_p50_ms": 6.13,
            "added_p50_ms_outbox_normal": 1.69,
            "fsync_probe_p50_ms": 0.8,
            "target_ms": 1.0,
            "met": False,
        },
        "dynamic_batching": {
            "concurrency": 16,
            "batch1_items_per_s": 151.2,
            "dynamic_items_per_s": 255.9,
            "mean_batch_items": 9.2,
            "ratio": 1.66,
            "ratios": [1.49, 1.72],
            "target": 1.3,
            "met": True,
        },
        "latency_samples_ms": {
            "raw": [4.0, 4.4, 4.5, 9.0],
            "agent": [6.0, 6.6, 6.7, 12.0],
            "agent_normal": [6.0, 6.1, 6.2, 7.0],
            "fsync": [0.7, 0.8, 0.8, 0.9],
        },
    }


def test_agent_report_carries_every_number_and_the_three_targets() -> None:
    report = agent_report(_agent_result())
    ratios = _ratios(report)
    assert ratios["saturation: agent (64 clients) / best raw ORT loop"] == (0.95, 0.9, True)
    assert ratios["batch-1 added p50 ms (outbox synchronous=full, the default)"] == (
        2.23,
        1.0,
        False,
    )
    assert ratios["concurrency 16: dynamic batching / batch-1 serving"] == (1.66, 1.3, True)
    assert ratios["batch-1 added p50 ms (outbox synchronous=normal; info)"][1] is None

    throughput = {r["phase"]: r for r in _table(report, "Throughput")}
    assert [r["items/s"] for r in throughput.values()] == [282.2, 235.0, 276.0, 151.2, 255.9]
    assert throughput["agent at concurrency 16, dynamic batching"]["mean batch"] == 9.2
    latency = {r["path"]: r for r in _table(report, "Batch-1 latency")}
    assert latency["raw session.run (with tokenization)"]["p50 ms"] == 4.44
    assert latency["agent, outbox synchronous=normal"]["added p50 ms"] == 1.69
    assert latency["the disk's flush alone: 4 KiB write + fdatasync"]["p50 ms"] == 0.8
    assert latency["agent, outbox synchronous=full (default)"]["p95 ms"] == pytest.approx(
        11.2, abs=0.1
    )
    assert _table(report, "Per-round ratios") == [
        {"round": 1, "saturation": 1.0, "c16 batching": 1.49},
        {"round": 2, "saturation": 0.9, "c16 batching": 1.72},
    ]
    panels = {s.panel for s in report.plots}
    assert panels == {"per-round ratios", "batch-1 latency distribution"}
    assert report.data["saturation"]["ratio"] == 0.95


def test_agent_report_without_samples_still_builds() -> None:
    result = _agent_result()
    del result["latency_samples_ms"]  # a result from before the samples were kept
    report = agent_report(result)
    assert all(r["p95 ms"] is None for r in _table(report, "Batch-1 latency"))
    assert {s.panel for s in report.plots} == {"per-round ratios"}


# -- pool -----------------------------------------------------------------------------------


def _pool_result(cuda: dict[str, Any]) -> dict[str, Any]:
    def row(name: str, replicas: int, tp: int, tput: float) -> dict[str, Any]:
        return {
            "pool": name,
            "replicas": replicas,
            "tp": tp,
            "requests": 100,
            "texts_per_s": tput,
            "p50_ms": 700.0,
            "p95_ms": 1300.0,
            "throughput_vs_baseline": tput / 40.0,
        }

    names = ("1 replica, TP=1", "1 replica, TP=2", "2 replicas, TP=1")
    return {
        "host": {"cpus": 2, "machine": "x86_64"},
        "load": {"rounds": 2, "seconds_per_round": 4.0, "concurrency": 8, "texts_per_request": 4},
        "pools": [row(names[0], 1, 1, 40.0), row(names[1], 1, 2, 32.0), row(names[2], 2, 1, 54.0)],
        "cuda_precisions": cuda,
        "per_round_texts_per_s": [
            {names[0]: 39.0, names[1]: 31.0, names[2]: 55.0},
            {names[0]: 41.0, names[1]: 33.0, names[2]: 53.0},
        ],
        "latencies_ms": {n: [600.0, 700.0, 1300.0] for n in names},
    }


def test_pool_report_has_tp_and_replica_ratios_and_rounds() -> None:
    report = pool_report(_pool_result({"skipped": "no CUDA device on this host"}))
    ratios = _ratios(report)
    assert ratios["throughput 1 replica, TP=2 / 1 replica, TP=1"][0] == pytest.approx(0.8)
    assert ratios["throughput 2 replicas, TP=1 / 1 replica, TP=1"][0] == pytest.approx(1.35)
    pools = _table(report, "Overflow pool on 2 CPUs")
    assert [(r["pool"], r["texts/s"], r["vs 1xTP1"]) for r in pools] == [
        ("1 replica, TP=1", 40.0, 1.0),
        ("1 replica, TP=2", 32.0, 0.8),
        ("2 replicas, TP=1", 54.0, 1.35),
    ]
    assert _table(report, "Texts/s per round")[1]["2 replicas, TP=1"] == 53.0
    assert any("no CUDA device" in n for n in report.notes)
    assert {s.panel for s in report.plots} == {
        "texts/s per round",
        "request latency distribution",
    }


def test_pool_report_shows_the_cuda_precisions_when_measured() -> None:
    cuda = {
        "device": "Test GPU",
        "float32": {"batch64_ms": 10.0, "max_abs_diff_vs_fp32": 0.0},
        "float16": {"batch64_ms": 4.0, "max_abs_diff_vs_fp32": 1e-3},
        "bfloat16": {"batch64_ms": 5.0, "max_abs_diff_vs_fp32": 8e-3},
    }
    report = pool_report(_pool_result(cuda))
    rows = _table(report, "One full-model forward, batch 64, on Test GPU")
    assert [r["speed vs float32"] for r in rows] == [1.0, 2.5, 2.0]
    assert _ratios(report)["forward speed float16 / float32 (CUDA, batch 64)"][0] == 2.5
    assert "| float16 | 4.00 | 2.50 | 1.00e-03 |" in report.markdown()


# -- all of them ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "report",
    [
        models_report(_models_result()),
        agent_report(_agent_result()),
        pool_report(_pool_result({"skipped": "no CUDA"})),
    ],
    ids=["models", "agent", "pool"],
)
def test_every_report_writes_json_markdown_and_a_plot(report: BenchReport, tmp_path: Path) -> None:
    paths = report.write(tmp_path)
    assert paths["md"].name == f"{report.name}.md"
    body = json.loads(paths["json"].read_text())
    assert body["bench"] == report.name and body["tables"] and body["ratios"] and body["series"]
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name", ALL_BENCHES)
def test_bench_all_passes_each_bench_options_it_accepts(name: str, tmp_path: Path) -> None:
    app, bench_app = typer.Typer(), typer.Typer()
    register(app, bench_app)
    command = typer.main.get_group(bench_app).commands[name]
    args = _bench_args(name, tmp_path / "out", tmp_path / "models")
    params = command.make_context(name, args).params  # parses, runs nothing
    assert params["out"] == tmp_path / "out"
    if "model_dir" in params:
        assert params["model_dir"] == tmp_path / "models"
