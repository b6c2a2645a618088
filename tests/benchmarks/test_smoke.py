"""`kiln bench` end to end on tiny models, a few requests per scenario: the JSON report is complete and consistent.

One run (module-scoped) of the real harness: Kiln over HTTP, the sequential and static-batching baselines and the
limit, each in its own process. No timing is asserted; only that the figures are there and agree with each other.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from kiln.benchmarks.cli import main
from kiln.benchmarks.report import RATIOS

SCENARIOS = """
mix = [{ model = "stable-diffusion-v1.5", size = "64x64", steps = 2, guidance = 7.5 }]

[[scenario]]
name = "closed"
kind = "closed"
concurrency = [1, 3]
requests_per_client = 2

[[scenario]]
name = "poisson"
kind = "open"
load = 0.7
requests = 5

[[scenario]]
name = "burst"
kind = "burst"
requests = 4
mix = [
  { model = "stable-diffusion-v1.5", size = "64x64", steps = 2, guidance = 7.5, weight = 2 },
  { model = "stable-diffusion-v1.5", size = "64x64", steps = 3, guidance = 1.0, weight = 1 },
]
"""
SYSTEMS = ("kiln", "kiln+idle", "sequential", "static", "limit")
PLANS = {"closed-c1": ("closed", 2), "closed-c3": ("closed", 6), "poisson": ("open", 5), "burst": ("burst", 4)}


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory, tiny_root: Path) -> dict:
    folder = tmp_path_factory.mktemp("bench")
    scenario = folder / "smoke.toml"
    scenario.write_text(SCENARIOS)
    output = folder / "report.json"
    code = main(["--scenario", str(scenario), "--output", str(output), "--no-memory-check", "--max-batch-size", "4",
                 "--static-wait", "0.01", "--idle-neighbours", "sd-turbo"])
    assert code == 0
    assert output.with_suffix(".png").stat().st_size > 0
    return json.loads(output.read_text())


def _ordered(figures: dict) -> None:
    assert figures["min"] <= figures["p50"] <= figures["p95"] <= figures["p99"] <= figures["max"]
    assert figures["min"] <= figures["mean"] <= figures["max"]


def test_machine_facts_and_settings(report: dict) -> None:
    machine = report["machine"]
    for key in ("cpu_model", "cpu_count", "cpus_usable", "torch_threads", "load_average_start", "load_average_end",
                "versions", "git", "python"):
        assert key in machine, key
    assert machine["torch_threads"] == report["settings"]["threads"] == 1
    for name in ("kiln", "torch", "diffusers"):
        assert machine["versions"][name]
    assert len(machine["load_average_start"]) == 3
    assert report["settings"]["max_batch_size"] == 4
    assert report["memory_check"] is None


def test_every_plan_has_every_system(report: dict) -> None:
    plans = {plan["name"]: plan for plan in report["plans"]}
    assert set(plans) == set(PLANS)
    for name, (kind, requests) in PLANS.items():
        plan = plans[name]
        assert plan["kind"] == kind
        assert plan["requests"] == requests and plan["images"] == requests
        assert set(plan["systems"]) == set(SYSTEMS)
    assert plans["closed-c3"]["concurrency"] == 3
    poisson = plans["poisson"]
    capacity = report["system_facts"]["kiln"][0]["capacity"]["poisson"]["images_per_s"]
    assert poisson["rate_images_per_s"] == pytest.approx(0.7 * capacity)
    assert report["system_facts"]["kiln+idle"][0]["idle_neighbours"] == ["sd-turbo"]
    assert report["system_facts"]["kiln"][0]["idle_neighbours"] == []


def test_counts_add_up(report: dict) -> None:
    for plan in report["plans"]:
        for name in ("kiln", "kiln+idle", "sequential", "static"):
            figures = plan["systems"][name]
            assert figures["requests"] == plan["requests"], (plan["name"], name)
            assert figures["requests_ok"] + figures["requests_failed"] == figures["requests"]
            assert figures["requests_failed"] == 0, figures["errors"]
            assert figures["images"] == plan["images"]
            assert len(figures["latencies_s"]) == figures["requests_ok"]
            assert figures["latencies_s"] == sorted(figures["latencies_s"])
            assert figures["images_per_s"] == pytest.approx(figures["images"] / figures["duration_s"])
            assert figures["images_per_cpu_s"] == pytest.approx(figures["images"] / figures["cpu_s"])
            assert figures["admission_measured"] == figures["requests_ok"]
            assert figures["memory"]["peak_rss_bytes"] >= figures["memory"]["rss_bytes"] > 0
            assert figures["cpu_s"] > 0
            assert len(figures["load_before"]) == len(figures["load_after"]) == 1  # one list per round
            assert len(figures["load_before"][0]) == 3
            assert 0 < figures["batches"]["occupancy"] <= 1
        kiln = plan["systems"]["kiln"]
        assert sum(kiln["batches"]["histogram"].values()) == kiln["batches"]["steps"]
        assert kiln["batches"]["occupancy"] == pytest.approx(kiln["batches"]["mean_images_per_forward"] / 4)
        static = plan["systems"]["static"]["batches"]
        assert max(int(size) for size in static["histogram"]) <= 4
        assert sum(static["histogram"].values()) == static["pipeline_calls"]
        sequential = plan["systems"]["sequential"]["batches"]
        assert sequential["histogram"] == {"1": plan["requests"]}
        limit = plan["systems"]["limit"]
        assert limit["images"] == kiln["images"]
        parts = limit["component_seconds"]
        assert parts["total"] == pytest.approx(parts["encode"] + parts["forward"] + parts["decode"])
        assert limit["images_per_s"] == pytest.approx(limit["images"] / parts["total"])
        assert limit["calls"]["forward"] == kiln["batches"]["forwards"]


def test_percentiles_are_ordered(report: dict) -> None:
    for plan in report["plans"]:
        for name in ("kiln", "kiln+idle", "sequential", "static"):
            figures = plan["systems"][name]
            _ordered(figures["latency_s"])
            _ordered(figures["admission_s"])
            # Admission (first step done) comes before completion, request by request, so in every percentile.
            assert figures["admission_s"]["max"] <= figures["latency_s"]["max"] + 1e-6
        kiln = plan["systems"]["kiln"]
        _ordered(kiln["step_s"])
        # Server-side admission splits into the floor (the step in flight, then the request's own first step)
        # and the excess, request by request, so their means add up; the excess is never below zero.
        floor, excess = kiln["admission_floor_s"], kiln["admission_excess_s"]
        assert floor["mean"] + excess["mean"] == pytest.approx(kiln["server_admission_s"]["mean"], abs=1e-6)
        assert floor["min"] > 0 and excess["min"] >= -1e-3


def test_ratios_are_quotients_of_reported_figures(report: dict) -> None:
    for plan in report["plans"]:
        systems = plan["systems"]
        assert set(plan["ratios"]) == {f"{top}/{bottom}" for top, bottom in RATIOS}
        for top, bottom in RATIOS:
            expected = systems[top]["images_per_s"] / systems[bottom]["images_per_s"]
            assert math.isclose(plan["ratios"][f"{top}/{bottom}"], expected, rel_tol=1e-12)
        with_cpu = [(top, bottom) for top, bottom in RATIOS if "limit" not in (top, bottom)]  # the limit has none
        assert set(plan["cpu_ratios"]) == {f"{top}/{bottom}" for top, bottom in with_cpu}
        for top, bottom in with_cpu:
            expected = systems[top]["images_per_cpu_s"] / systems[bottom]["images_per_cpu_s"]
            assert math.isclose(plan["cpu_ratios"][f"{top}/{bottom}"], expected, rel_tol=1e-12)


def test_targets_are_reported(report: dict) -> None:
    targets = {target["name"]: target for target in report["targets"]}
    assert set(targets) == {"kiln_vs_sequential", "kiln_vs_limit", "admission_p99", "latency_p99_vs_static",
                            "demo_rss"}
    # The smoke scenarios are named like the default suite's only in part: `poisson` exists, `closed-c16` does not.
    assert targets["kiln_vs_sequential"]["met"] is None
    assert targets["demo_rss"]["met"] is None
    admission = targets["admission_p99"]
    assert admission["value"] == report["plans"][2]["systems"]["kiln"]["admission_s"]["p99"]
    assert isinstance(admission["met"], bool)
