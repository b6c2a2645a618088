"""`backend: auto` by measurement (engine/backends/auto.py), the openvino backend, and launches that cannot use a
backend (`unsupported`)."""

from __future__ import annotations

import pytest

from kiln.engine.backends import auto
from kiln.engine.backends.base import BackendUnavailable
from kiln.engine.backends.cache import EngineCache
from kiln.engine.backends.launch import launch_backend
from kiln.engine.backends.openvino import OpenVinoBackend
from kiln.engine.catalogue import get_spec
from kiln.engine.families import make_family
from kiln.engine.loading import load_model
from kiln.engine.options import parse_launch_options
from kiln.engine.requests import ImageRequest
from kiln.engine.runner import Runner

from .conftest import FAMILY_MODELS, PIXEL_TOLERANCE, max_diff, pixels, run_alone
from .test_backends import check_exported_backend

SD = FAMILY_MODELS["sd"]


# --- the choice (no model) --------------------------------------------------------------------------------------
def test_measured_batches_are_one_job_a_quarter_and_all_of_them():
    assert auto.measured_rows(2, 16) == [2, 8, 32]
    assert auto.measured_rows(1, 16) == [1, 4, 16]
    assert auto.measured_rows(2, 1) == [2]


def test_the_fastest_relative_to_the_best_at_each_batch_wins():
    timings = {"eager": {2: 10.0, 32: 30.0}, "onnx": {2: 2.0, 32: 33.0}, "openvino": {2: 3.0, 32: 24.0}}
    scores = auto.score(timings)
    assert scores == pytest.approx({"eager": (5.0 + 1.25) / 2, "onnx": (1.0 + 1.375) / 2, "openvino": (1.5 + 1.0) / 2})
    assert auto.pick(timings) == "onnx"


def test_another_backend_must_beat_eager_by_the_margin():
    assert auto.pick({"eager": {2: 1.0}, "onnx": {2: 1.0 / (1 + auto.MARGIN / 2)}}) == "eager"
    assert auto.pick({"eager": {2: 1.0}, "onnx": {2: 1.0 / (1 + 2 * auto.MARGIN)}}) == "onnx"


# --- openvino ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family_name", ["sd", "flux"])
def test_openvino_runner_is_batch_invariant_and_matches_eager(runner_for, family_name):
    check_exported_backend(runner_for, family_name, "openvino", OpenVinoBackend)


# --- auto at launch ---------------------------------------------------------------------------------------------
def test_auto_times_every_cpu_backend_and_a_restart_reuses_the_choice(tiny_root, tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_ENGINE_CACHE", str(tmp_path))
    spec = get_spec(SD)
    options = parse_launch_options(spec, {"tiny": True, "max_batch_size": 8})

    first = Runner("first", spec, options)
    first.load(start=False)
    chosen = first.backend_info["auto"]
    assert first.backend_info["requested"] == "auto" and not chosen["cached"]
    assert first.backend_info["backend"] == chosen["chosen"] and first.backend_info["warmup_size"] == "64x64"
    assert set(chosen["forward_ms"]) == {"eager", "onnx", "openvino"}
    assert set(chosen["forward_ms"]["eager"]) == {"2", "4", "16"}  # 1, 2 and 8 jobs of 2 CFG rows
    assert chosen["chosen"] in chosen["why"]
    first.close()

    def no_measuring(*args, **kwargs):
        raise AssertionError("a restart measured again")

    monkeypatch.setattr(auto, "measure", no_measuring)
    second = Runner("second", spec, options)
    second.load(start=False)
    again = second.backend_info["auto"]
    assert again["cached"] and again["chosen"] == chosen["chosen"] and again["forward_ms"] == chosen["forward_ms"]
    assert second.backend_info["backend"] == chosen["chosen"]
    request = lambda: ImageRequest("a red car", 64, 64, 4, 7.5, seed=5)  # noqa: E731
    assert max_diff(pixels(run_alone(second, request())), pixels(run_alone(make_eager(spec), request()))) <= PIXEL_TOLERANCE
    second.close()


def make_eager(spec) -> Runner:
    runner = Runner("eager", spec, parse_launch_options(spec, {"tiny": True, "backend": "eager"}))
    runner.load(start=False)
    return runner


@pytest.fixture
def sd_family(tiny_root):
    spec = get_spec(SD)
    loaded = load_model(spec, parse_launch_options(spec, {"tiny": True}))
    return make_family(spec.family, loaded.pipeline, loaded.device, loaded.dtype), loaded.source


def test_auto_skips_what_the_launch_cannot_use_and_says_why(sd_family, tmp_path):
    family, source = sd_family
    unsupported = {"onnx": "per-row LoRA runs on eager and compile only", "openvino": "ControlNet: eager only"}
    info = launch_backend("auto", family, model=SD, source=source, max_batch_size=2, warmup_size=(64, 64),
                          cache=EngineCache(tmp_path), unsupported=unsupported)
    assert info["backend"] == "eager" and info["auto"]["chosen"] == "eager"
    assert info["auto"]["skipped"] == unsupported and set(info["auto"]["forward_ms"]) == {"eager"}


def test_asking_for_a_backend_the_launch_cannot_use_fails_naming_one_that_can(sd_family, tmp_path):
    family, source = sd_family
    with pytest.raises(BackendUnavailable, match="backend 'onnx' cannot run this launch: per-row LoRA.*"
                                                 "launch with backend='eager'"):
        launch_backend("onnx", family, model=SD, source=source, max_batch_size=2, warmup_size=(64, 64),
                       cache=EngineCache(tmp_path), unsupported={"onnx": "per-row LoRA"})


def test_cpu_offload_leaves_auto_only_eager(sd_family, tmp_path):
    family, source = sd_family
    info = launch_backend("auto", family, model=SD, source=source, max_batch_size=2, warmup_size=(64, 64),
                          cpu_offload=True, cache=EngineCache(tmp_path))
    assert info["backend"] == "eager" and "cpu_offload" in info["auto"]["skipped"]["onnx"]
