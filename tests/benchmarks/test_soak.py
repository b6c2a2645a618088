"""`kiln bench --soak`: the shipped soak file parses, and one short cycle on a real server reports RSS per step.
The soak itself is a benchmark (benchmarks/README.md); nothing about memory is asserted here."""

from __future__ import annotations

import json
from pathlib import Path

from kiln.benchmarks.cli import main
from kiln.benchmarks.scenarios import SCENARIO_DIR
from kiln.benchmarks.soak import Soak, load_soak_file


def test_the_shipped_soak_file_parses() -> None:
    soak = load_soak_file(SCENARIO_DIR / "soak.toml")
    assert soak.sizes[-1] == (1024, 1024) and soak.minutes > 0 and soak.max_cycles is None
    assert isinstance(soak, Soak) and soak.models


def test_one_soak_cycle(tmp_path: Path, tiny_root: Path) -> None:
    path = tmp_path / "soak.toml"
    path.write_text('[soak]\nmax_cycles = 1\nmodels = ["sd-turbo"]\nsizes = ["64x64", "128x64"]\nsteps = 1\n')
    assert main(["--soak", str(path), "--output", str(tmp_path / "soak.json")]) == 0
    report = json.loads((tmp_path / "soak.json").read_text())
    (cycle,) = report["cycles"]
    assert report["rss_start_mib"] > 0 and cycle["rss_generated_mib"] <= cycle["peak_rss_mib"]
    assert report["rss_terminated_last_mib"] == cycle["rss_terminated_mib"] > 0
