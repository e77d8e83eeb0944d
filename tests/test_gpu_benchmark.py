"""benchmarks/bench_gpu_loop.py has not run on a GPU yet: its every code path (loader alone with decode cpu and
device, full training steps of both methods with both decodes, the bare step) runs here on the CPU, tiny."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from _shards import write_shards

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_script_dry_run_covers_every_measurement(tmp_path: Path) -> None:
    curated = tmp_path / "work" / "curated256"
    write_shards(curated / "shards", shards=2, per_shard=8, size=72)
    (curated / "stats.json").write_text("{}")  # a finished curation: the script reuses it
    out = tmp_path / "gpu.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_gpu_loop.py"), "--dry-run", "--tile", "256",
               "--work", str(tmp_path / "work"), "--data", str(tmp_path), "--json", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert "failed" not in results
    assert {(r["method"], r["decode"]) for r in results["train"]} == {
        (m, d) for m in ("selectivemae", "mae") for d in ("cpu", "device")
    }
    assert all(r["img_s"] > 0 and r["gflops_per_img"] > 0 for r in results["train"])
    assert {r["decode"] for r in results["loader"]} == {"cpu", "device"}
    assert all(r["img_s"] > 0 and r["cores_at_6200"] > 0 for r in results["loader"])
    assert results["bare"] and results["bare"][0]["selectivemae"]["img_s"] > 0
    assert "GPU: the loader and the training step" in done.stdout
