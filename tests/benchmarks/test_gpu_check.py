"""`kiln gpu-check --dry-run`: the GPU check's own code path on the CPU with tiny models, so it cannot rot. Only the
report's shape and consistency are asserted, never a speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FIELDS = {"model", "size", "steps", "concurrency", "system", "backend", "images_per_s", "p50_s", "p99_s",
          "peak_memory_bytes"}


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory, tiny_root: Path) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("gpu-check")
    # Through scripts/gpu_check, as an operator runs it (Kiln is importable here, so nothing is installed); the
    # budget is the real run's rather than the dry run's two minutes, because CI machines are shared.
    completed = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check"), "--dry-run", "--out", str(out),
                                "--budget", "480"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads((out / "report.json").read_text()), out


def test_the_dry_run_reports_every_system_with_the_fields_the_issue_names(report):
    data, out = report
    assert data["dry_run"] and data["machine"]["gpu"] == {"cuda": False}
    rows = data["results"]
    assert rows and all(FIELDS <= set(row) for row in rows)
    systems = {(row["system"], row["concurrency"]) for row in rows if row["backend"] in ("eager", "diffusers")}
    assert systems == {(system, c) for system in ("kiln", "sequential", "static") for c in (1, 4)}
    for row in rows:
        assert row["images_per_s"] > 0 and 0 < row["p50_s"] <= row["p99_s"] and row["peak_memory_bytes"] > 0
    assert {row["backend"] for row in rows if row["system"] == "kiln"} == {"eager", "compile"}
    assert all(Path(path).stat().st_size > 0 for path in data["plots"]) and data["plots"]


def test_the_dry_run_covers_the_other_sections(report):
    data, _ = report
    sections = data["sections"]
    assert "no CUDA" in sections["cuda_tests"]["skipped"]
    assert sections["backend_tensorrt"] == {"skipped": "not installed"}
    checks = sections["precision"]["checks"]
    assert checks and all(c["batch_invariance_max_pixel_diff"] <= 2 and c["diffusers_max_pixel_diff"] <= 2
                          for c in checks)
    flops = data["flops"]["stable-diffusion-v1.5"]
    assert flops["flops_per_image"] == flops["flops_per_row"] * 2 * 2  # CFG rows x steps
