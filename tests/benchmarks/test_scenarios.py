"""Scenario files and plans: parsing, validation messages, and identical requests for every system."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiln.benchmarks.load import Outcome, percentiles, summarize
from kiln.benchmarks.scenarios import (
    DEFAULT_SCENARIO_FILE, SCENARIO_DIR, Plan, RequestClass, Scenario, ScenarioError, load_scenario_file,
    parse_scenarios, plan, same_mix,
)


def test_shipped_scenario_files_parse() -> None:
    default = load_scenario_file(DEFAULT_SCENARIO_FILE)
    assert [s.kind for s in default] == ["closed", "open", "burst"]
    assert default[0].concurrency == (1, 4, 8, 16)
    assert default[1].load == 0.7
    assert default[0].mix == (RequestClass("stable-diffusion-v1.5", 64, 64, 8, 7.5),)
    mix = load_scenario_file(SCENARIO_DIR / "mix.toml")
    assert {item.model for item in mix[0].mix} == {"stable-diffusion-v1.5", "sd-turbo"}


def test_the_lora_scenario_file() -> None:
    """lora.toml: the per-config scenario runs lora-mixed's very requests under its own launch table, and the
    harness makes the LoRAs its launch tables name into a peft_model_config of files made for the model."""
    from safetensors.torch import load_file

    from kiln.benchmarks.harness import with_lora_files

    scenarios = {s.name: s for s in load_scenario_file(SCENARIO_DIR / "lora.toml")}
    mixed, per_config = plan(scenarios["lora-mixed"])[0], plan(scenarios["lora-per-config"])[0]
    drawn = [[(r.prompt, r.seed, r.lora) for r in p.requests] for p in (mixed, per_config)]
    assert drawn[0] == drawn[1]
    assert {r.lora for r in mixed.requests} == {"ink", "neon", "clay", "film", None}
    assert per_config.launch["lora_batching"] == "per-config" and per_config.launch["backend"] == "eager"
    assert scenarios["lora-none"].launch == {"backend": "eager"} and not scenarios["lora-none-auto"].launch
    launch = with_lora_files(scenarios["lora-mixed"]).launch
    assert "loras" not in launch and launch["max_loras"] == 4
    listed = launch["peft_model_config"]["lora_list"]
    assert [entry["lora_name"] for entry in listed] == ["ink", "neon", "clay", "film"]
    neon = load_file(listed[1]["local_path"])
    assert any(key.startswith("text_encoder.") for key in neon) and any(key.startswith("unet.") for key in neon)


def test_json_scenario_file(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"scenario": [{"kind": "burst", "requests": 3,
                                              "mix": [{"model": "sd-turbo", "size": "128x64", "steps": 2}]}]}))
    (scenario,) = load_scenario_file(path)
    assert scenario.name == "burst" and scenario.mix[0].width == 128 and scenario.mix[0].height == 64


@pytest.mark.parametrize("data, message", [
    ({"scenario": [{"kind": "spiral"}]}, "kind must be one of"),
    ({"scenario": [{"kind": "open"}]}, "exactly one of `rate`"),
    ({"scenario": [{"kind": "open", "rate": 1, "load": 0.5}]}, "exactly one of `rate`"),
    ({"scenario": [{"kind": "burst", "colour": 1}]}, "unknown field"),
    ({"scenario": [{"kind": "burst", "mix": [{"size": "big"}]}]}, "size must be WIDTHxHEIGHT"),
    ({"scenario": [{"kind": "burst"}, {"kind": "burst"}]}, "names must be unique"),
    ({}, "non-empty `scenario` list"),
])
def test_invalid_scenarios_name_the_problem(data: dict, message: str) -> None:
    with pytest.raises(ScenarioError, match=message):
        parse_scenarios(data)


def test_plans_are_deterministic_and_rate_does_not_change_requests() -> None:
    mix = (RequestClass(weight=3), RequestClass(steps=4, guidance=1.0))
    scenario = Scenario("p", "open", mix, requests=50, load=0.7)
    slow, fast = plan(scenario, rate=2.0)[0], plan(scenario, rate=20.0)[0]
    assert [(r.id, r.prompt, r.seed, r.steps) for r in slow.requests] == \
           [(r.id, r.prompt, r.seed, r.steps) for r in fast.requests]
    assert slow.requests[-1].at == pytest.approx(fast.requests[-1].at * 10)
    arrivals = [r.at for r in slow.requests]
    assert arrivals == sorted(arrivals) and arrivals[0] > 0
    assert Plan.from_json(json.loads(json.dumps(slow.to_json()))) == slow
    closed = plan(Scenario("c", "closed", mix, concurrency=(2, 4), requests_per_client=3))
    assert [(p.name, p.concurrency, len(p.requests)) for p in closed] == [("c-c2", 2, 6), ("c-c4", 4, 12)]
    with pytest.raises(ScenarioError, match="rate is not known"):
        plan(scenario)


def test_same_mix_ignores_weight_scale() -> None:
    assert same_mix((RequestClass(weight=1), RequestClass(steps=4, weight=3)),
                    (RequestClass(steps=4, weight=6), RequestClass(weight=2)))
    assert not same_mix((RequestClass(),), (RequestClass(steps=4),))


def test_summary_pools_rounds() -> None:
    def outcome(i: int, start: float, latency: float, error: str | None = None) -> Outcome:
        return Outcome(f"r{i}", "m", 1, start, start, start + latency, start + latency / 2, error)

    first = [outcome(0, 10.0, 1.0), outcome(1, 10.0, 2.0)]
    second = [outcome(2, 50.0, 4.0), outcome(3, 50.0, 0.5, error="boom")]
    summary = summarize([(first, 10.0), (second, 50.0)])
    assert summary["requests"] == 4 and summary["requests_ok"] == 3 and summary["requests_failed"] == 1
    assert summary["images"] == 3
    assert summary["duration_s"] == pytest.approx(2.0 + 4.0)
    assert summary["images_per_s"] == pytest.approx(3 / 6.0)
    assert summary["images_per_s_by_round"] == pytest.approx([1.0, 0.25])
    assert summary["latencies_s"] == [1.0, 2.0, 4.0]
    assert summary["admission_s"]["max"] == pytest.approx(2.0)
    assert summary["errors"] == {"boom": 1}
    assert percentiles([]) is None
