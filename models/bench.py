"""Side-by-side benchmark of every built variant on this machine.

Each variant runs in its own spawned process, loaded through :func:`models.loader.load_model`
exactly as
the agent would, so peak RSS is per variant. Inputs are held-out stdlib sentences (real lengths,
padded
to the longest in each batch). Reported: p50/p95 latency at batch 1/8/32, throughput at batch 8 and
32,
file size, peak RSS, the manifest's quality metrics, and ratios against the best FP32 ONNX.
"""

from __future__ import annotations

import logging
import multiprocessing
import platform
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np

from models.corpus import stdlib_sentences
from models.signing import keyring, load_public_key

logger = logging.getLogger(__name__)

BATCH_SIZES = (1, 8, 32)
BASELINE = "fp32-onnx"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _measure(variant_dir: str, public_key_path: str, seconds_per_batch: float) -> dict[str, Any]:
    """Child-process body: load one variant and time it."""
    from models.loader import load_model

    ring = keyring([load_public_key(Path(public_key_path))])
    model = load_model(Path(variant_dir), trusted_keys=ring)
    texts = stdlib_sentences(evaluation=1200).evaluation
    rng = np.random.default_rng(0)
    result: dict[str, Any] = {"device": model.device}
    for batch in BATCH_SIZES:
        order = rng.permutation(len(texts))
        batches = [
            model.tokenizer.encode_batch([texts[i] for i in order[s : s + batch]])
            for s in range(0, len(texts) - batch + 1, batch)
        ]
        for ids, mask in batches[:3]:  # warm-up
            model.backend.embed(ids, mask)
        latencies: list[float] = []
        deadline = time.perf_counter() + seconds_per_batch
        while time.perf_counter() < deadline or len(latencies) < 5:
            ids, mask = batches[len(latencies) % len(batches)]
            start = time.perf_counter()
            model.backend.embed(ids, mask)
            latencies.append(time.perf_counter() - start)
        lat = np.asarray(latencies) * 1000.0
        result[f"b{batch}"] = {
            "p50_ms": float(np.percentile(lat, 50)),
            "p95_ms": float(np.percentile(lat, 95)),
            "throughput_per_s": float(batch * len(lat) / (lat.sum() / 1000.0)),
        }
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def _measure_in_child(folder: Path, public_key_path: Path, seconds: float) -> dict[str, Any]:
    """Run :func:`_measure` in a fresh interpreter so its peak RSS is this variant's alone."""
    import json
    import subprocess
    import sys

    argv = [sys.executable, "-m", "models.bench", str(folder), str(public_key_path), str(seconds)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"benchmark of {folder.name} failed: {last}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def bench_variants(
    out: Path, *, public_key_path: Path, seconds_per_batch: float = 8.0
) -> dict[str, Any]:
    """Benchmark every variant folder under ``out``; returns a JSON-ready report."""
    import json

    from models.build import VARIANTS
    from models.manifest import MANIFEST_FILE

    rows: dict[str, Any] = {}
    for variant in VARIANTS:
        folder = out / variant
        if not (folder / MANIFEST_FILE).is_file():
            logger.warning("skipping %s: not built", variant)
            continue
        manifest = json.loads((folder / MANIFEST_FILE).read_text())["manifest"]
        timing = _measure_in_child(folder, public_key_path, seconds_per_batch)
        rows[variant] = {
            **timing,
            "size_bytes": manifest["size_bytes"],
            "quality": manifest["quality"],
        }
    base = rows.get(BASELINE)
    if base is not None:
        for row in rows.values():
            row["speedup_b8"] = row["b8"]["throughput_per_s"] / base["b8"]["throughput_per_s"]
            row["speedup_b32"] = row["b32"]["throughput_per_s"] / base["b32"]["throughput_per_s"]
            row["size_ratio"] = row["size_bytes"] / base["size_bytes"]
    return {
        "machine": {"cpu": cpu_model(), "cores": multiprocessing.cpu_count()},
        "baseline": BASELINE,
        "variants": rows,
    }


if __name__ == "__main__":
    import json
    import sys

    logging.basicConfig(level=logging.ERROR)
    report = _measure(sys.argv[1], sys.argv[2], float(sys.argv[3]))
    sys.stdout.write(json.dumps(report) + "\n")
