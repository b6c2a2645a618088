"""Backends: the onnx export and runtime against eager for every family, onnx and compile runners held to the
batch-invariance check, compile's buckets (padding ignored, no recompiles after warm-up), the launch option and
its errors, the build script, and TensorRT where a GPU and TensorRT exist (skipped here)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import runpy
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from kiln.engine.backends import backend_unavailable
from kiln.engine.backends.launch import onnx_export_for
from kiln.engine.backends import onnx as onnx_module
from kiln.engine.backends.base import (
    ExampleInputs,
    batch_buckets,
    bucket_for,
    max_rows,
    pad_rows,
    split_rows,
    unwrap,
)
from kiln.engine.backends.cache import EngineCache
from kiln.engine.backends.compile import CompileBackend
from kiln.engine.backends.onnx import ONNX_FILE, OnnxBackend
from kiln.engine.catalogue import get_spec
from kiln.engine.errors import ModelLoadError
from kiln.engine.options import LaunchOptionError, parse_launch_options
from kiln.engine.requests import ImageRequest
from kiln.engine.runner import Runner

from .conftest import FAMILY_MODELS, PIXEL_TOLERANCE, max_diff, pixels, run_alone
from .test_batch_invariance import test_same_image_alone_and_in_a_changing_batch as same_image_check

ONNX_TOLERANCE = 1e-4
# A second lane size per family: latent 9x8 (odd, past the UNets' upsampling factor) for the UNets.
OTHER_SIZE = {"sd": (72, 64), "sdxl": (72, 64), "sd3": (96, 128), "flux": (96, 128)}
slow = pytest.mark.skipif(
    not os.environ.get("KILN_SLOW_TESTS"),
    reason="slow: torch.compile with inductor takes 1-2 minutes per bucket on 2 cores; set KILN_SLOW_TESTS=1",
)


def mixed_inputs(family, rows: int, size=(64, 64), seed=0) -> tuple[torch.Tensor, ...]:
    """Inputs whose rows all differ: own latents, timestep, guidance and (perturbed) conditioning."""
    named = ExampleInputs(family, *size, seed=seed).named(rows)
    generator = torch.Generator().manual_seed(seed + 1)
    denoiser = unwrap(family.denoiser)
    for name, tensor in named.items():
        if name not in denoiser.shared_inputs and name not in ("timestep", "guidance") and tensor.is_floating_point():
            named[name] = tensor + 0.1 * torch.randn(tensor.shape, generator=generator).to(tensor)
    return tuple(named[name] for name in denoiser.input_names)


def new_runner(name: str, warmup_size=(64, 64), **options) -> Runner:
    spec = get_spec(name)
    runner = Runner(name, spec, parse_launch_options(spec, {"tiny": True, **options}))
    runner.load(start=False, warmup_size=warmup_size)
    return runner


# --- buckets and padding (no model) -----------------------------------------------------------------------------
def test_buckets_are_powers_of_two_up_to_max_rows():
    assert batch_buckets(1) == (1,)
    assert batch_buckets(6) == (1, 2, 4, 6)
    assert batch_buckets(32) == (1, 2, 4, 8, 16, 32)
    assert [bucket_for(rows, (1, 2, 4, 6)) for rows in range(1, 7)] == [1, 2, 4, 4, 6, 6]
    with pytest.raises(ValueError):
        bucket_for(7, (1, 2, 4, 6))


def test_fine_buckets_pad_at_most_a_third():
    """CUDA graphs' buckets: padded rows cost real compute on a GPU, so 3, 6, 12, ... sit between the powers."""
    assert batch_buckets(32, fine=True) == (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
    assert batch_buckets(128, fine=True)[-4:] == (48, 64, 96, 128)
    buckets = batch_buckets(128, fine=True)
    assert max((bucket_for(rows, buckets) - rows) / bucket_for(rows, buckets) for rows in range(1, 129)) < 1 / 3


def test_padding_repeats_the_last_row_and_leaves_shared_inputs():
    x, ids = torch.arange(6.0).reshape(3, 2), torch.zeros(5, 3)
    padded, shared = pad_rows([x, ids], ["x", "ids"], frozenset({"ids"}), 5)
    assert torch.equal(padded, torch.tensor([[0.0, 1], [2, 3], [4, 5], [4, 5], [4, 5]])) and shared is ids
    chunks = split_rows([padded, ids], ["x", "ids"], frozenset({"ids"}), 2)
    assert [c[0].shape[0] for c in chunks] == [2, 2, 1] and all(c[1] is ids for c in chunks)


# --- onnx -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family_name", list(FAMILY_MODELS))
def test_onnx_export_matches_eager_at_any_batch_and_lane_size(runner_for, tmp_path, family_name):
    runner = runner_for(FAMILY_MODELS[family_name])
    family = runner.executor.family
    denoiser = unwrap(family.denoiser)
    _, entry = onnx_export_for(family, runner.spec.name, runner.loaded.source, EngineCache(tmp_path))
    backend = OnnxBackend(denoiser, entry.file(ONNX_FILE), family.device)
    assert {node.shape[0] for node in backend.session.get_inputs() if node.name not in denoiser.shared_inputs} \
        == {"batch"}
    for rows, size in ((1, (64, 64)), (3, (64, 64)), (8, (64, 64)), (3, OTHER_SIZE[family_name])):
        inputs = mixed_inputs(family, rows, size, seed=rows)
        timesteps = inputs[denoiser.input_names.index("timestep")]
        assert timesteps.unique().numel() == rows  # every row at its own timestep (and guidance for FLUX-dev)
        with torch.no_grad():
            expected = denoiser(*inputs)
        got = backend(*inputs)
        assert got.shape == expected.shape and got.dtype == expected.dtype
        difference = (got - expected).abs().max().item()
        assert difference <= ONNX_TOLERANCE, f"{rows} rows at {size}: {difference}"


def test_onnx_guidance_is_a_per_row_input(runner_for, tmp_path):
    """FLUX-dev's guidance reaches the exported graph row by row: changing one row's guidance changes that row
    of the output only."""
    runner = runner_for(FAMILY_MODELS["flux"])
    family = runner.executor.family
    denoiser = unwrap(family.denoiser)
    assert "guidance" in denoiser.input_names
    _, entry = onnx_export_for(family, runner.spec.name, runner.loaded.source, EngineCache(tmp_path))
    backend = OnnxBackend(denoiser, entry.file(ONNX_FILE), family.device)
    inputs = list(mixed_inputs(family, 3))
    before = backend(*inputs)
    index = denoiser.input_names.index("guidance")
    inputs[index] = inputs[index].clone()
    inputs[index][1] += 20.0
    after = backend(*inputs)
    assert torch.equal(before[0], after[0]) and torch.equal(before[2], after[2])
    assert not torch.allclose(before[1], after[1])


def test_onnx_export_is_reused_when_the_key_matches(runner_for, tmp_path, monkeypatch):
    runner = runner_for(FAMILY_MODELS["sd"])
    family, cache = runner.executor.family, EngineCache(tmp_path)
    key, first = onnx_export_for(family, runner.spec.name, runner.loaded.source, cache)
    assert first.info["dynamic_axes"]["sample"] == {"0": "batch", "2": "d16_24", "3": "d16_20"}

    def no_export(*args, **kwargs):
        raise AssertionError("exported again although the cache had it")

    monkeypatch.setattr(onnx_module, "export_onnx", no_export)
    again_key, again = onnx_export_for(family, runner.spec.name, runner.loaded.source, cache)
    assert again_key == key and again.path == first.path
    with pytest.raises(AssertionError, match="exported again"):  # another model name is another key
        onnx_export_for(family, "sd-turbo", runner.loaded.source, cache)


def check_exported_backend(runner_for, family_name: str, backend: str, backend_class: type) -> None:
    """A runner on an exported `backend` runs its denoiser through `backend_class`, is batch-invariant, and
    matches eager within the pixel tolerance."""
    name = FAMILY_MODELS[family_name]
    runner = runner_for(name, backend=backend)
    assert runner.backend_info["backend"] == backend
    assert isinstance(runner.executor.family.denoiser, backend_class)
    same_image_check(lambda model, **options: runner_for(model, backend=backend, **options), family_name)

    request = lambda: ImageRequest("a red car", 64, 64, 5, 3.0, seed=77, sampler="Euler")  # noqa: E731
    eager = run_alone(runner_for(name, backend="eager"), request())
    assert max_diff(pixels(eager), pixels(run_alone(runner, request()))) <= PIXEL_TOLERANCE


@pytest.mark.parametrize("family_name", list(FAMILY_MODELS))
def test_onnx_runner_is_batch_invariant_and_matches_eager(runner_for, family_name):
    check_exported_backend(runner_for, family_name, "onnx", OnnxBackend)


# --- compile ----------------------------------------------------------------------------------------------------
def test_compile_pads_to_buckets_and_never_recompiles_after_warmup(runner_for):
    """Dynamo's graph capture and guards decide recompiles whatever compiler runs the graphs; the cheap 'eager'
    compiler keeps this test in seconds (the inductor run is the slow test below)."""
    family = runner_for(FAMILY_MODELS["sd"]).executor.family
    denoiser = unwrap(family.denoiser)
    backend = CompileBackend(denoiser, max_rows=4, compiler="eager")
    assert backend.buckets == (1, 2, 4)
    seconds = backend.warmup(ExampleInputs(family, 64, 64), 4)
    assert seconds > 0 and backend.describe()["buckets"] == [1, 2, 4]
    graphs = counters["stats"]["unique_graphs"]
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for rows in range(1, 6):  # 3 pads to 4; 5 runs as 4 + 1
            inputs = mixed_inputs(family, rows, seed=10 + rows)
            expected = denoiser(*inputs)
            got = backend(*inputs)
            assert got.shape == expected.shape
            assert torch.allclose(got, expected, atol=1e-5), f"{rows} rows: {(got - expected).abs().max()}"
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled after warm-up


def test_compile_runner_is_batch_invariant_without_recompiling(tiny_root, monkeypatch):
    monkeypatch.setenv("KILN_COMPILE_BACKEND", "eager")
    runner = new_runner(FAMILY_MODELS["sd"], backend="compile", max_batch_size=4)
    try:
        info = runner.backend_info
        assert info["backend"] == "compile" and info["requested"] == "compile"
        assert info["buckets"] == [1, 2, 4, 8] and info["warmup_size"] == "64x64" and info["warmup_seconds"] > 0
        graphs = counters["stats"]["unique_graphs"]
        with torch._dynamo.config.patch(error_on_recompile=True):
            same_image_check(lambda model, **options: runner, "sd")
        assert counters["stats"]["unique_graphs"] == graphs
    finally:
        runner.close()


def test_a_shape_whose_cuda_graph_cannot_be_captured_runs_compiled_without_one(runner_for):
    """The fallback path of the CUDA-graph capture, exercised where every capture fails: on a CPU."""
    family = runner_for(FAMILY_MODELS["sd"]).executor.family
    denoiser = unwrap(family.denoiser)
    backend = CompileBackend(denoiser, max_rows=4, compiler="eager", graphs=True)
    assert backend.buckets == (1, 2, 3, 4)
    backend.warmup(ExampleInputs(family, 64, 64), 4)
    with torch.no_grad():
        for rows in (1, 3, 5):
            inputs = mixed_inputs(family, rows, seed=rows)
            assert torch.allclose(backend(*inputs), denoiser(*inputs), atol=1e-5)
    graphs = backend.describe()["cuda_graphs"]
    assert graphs["captured"] == 0 and len(graphs["failed"]) == 4  # one per bucket at 64x64, each with its reason
    assert all(reason for reason in graphs["failed"].values())


@slow
def test_inductor_compile_matches_eager(runner_for):
    family = runner_for(FAMILY_MODELS["sd"]).executor.family
    denoiser = unwrap(family.denoiser)
    backend = CompileBackend(denoiser, max_rows=2)
    backend.warmup(ExampleInputs(family, 64, 64), 2)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for rows in (1, 2, 3):
            inputs = mixed_inputs(family, rows, seed=rows)
            assert torch.allclose(backend(*inputs), denoiser(*inputs), atol=1e-4)


# --- the launch option ------------------------------------------------------------------------------------------
def test_auto_on_the_cpu_runs_the_backend_it_measured_fastest(runner_for):
    info = runner_for(FAMILY_MODELS["sd"]).backend_info
    assert info["requested"] == "auto" and info["backend"] == info["auto"]["chosen"] and info["attention"] == "sdpa"
    assert set(info["auto"]["forward_ms"]) == {"eager", "onnx", "openvino"}  # tests/engine/test_auto_backend.py


def test_rows_per_forward_follow_cfg(runner_for):
    assert max_rows(runner_for(FAMILY_MODELS["sd"]).executor.family, 16) == 32
    assert max_rows(runner_for(FAMILY_MODELS["flux"]).executor.family, 16) == 16


def _pretend_installed(monkeypatch, installed: set[str] = frozenset(), missing: set[str] = frozenset()):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name in missing:
            return None
        if name in installed:
            return importlib.machinery.ModuleSpec(name, None)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_onnx_without_onnxruntime_is_refused_at_launch(monkeypatch):
    spec = get_spec("sd-turbo")
    assert parse_launch_options(spec, {"backend": "onnx"}).backend == "onnx"
    _pretend_installed(monkeypatch, missing={"onnxruntime"})
    with pytest.raises(LaunchOptionError, match="'backend'.*'onnx' is not available.*onnxruntime not installed"):
        parse_launch_options(spec, {"backend": "onnx"})


def test_tensorrt_without_the_package_is_refused_at_launch(monkeypatch):
    _pretend_installed(monkeypatch, missing={"tensorrt"})
    with pytest.raises(LaunchOptionError, match="'tensorrt' is not available.*tensorrt package is not installed"):
        parse_launch_options(get_spec("sd-turbo"), {"backend": "tensorrt"})


def test_tensorrt_without_cuda_fails_the_load_with_the_reason(tiny_root, monkeypatch):
    _pretend_installed(monkeypatch, installed={"tensorrt"})
    spec = get_spec(FAMILY_MODELS["sd"])
    runner = Runner(spec.name, spec, parse_launch_options(spec, {"tiny": True, "backend": "tensorrt"}))
    with pytest.raises(ModelLoadError, match="'tensorrt' is not available on this machine: TensorRT needs a CUDA"):
        runner.load(start=False)
    assert runner.status == "failed"


def test_onnx_refuses_bfloat16_with_the_reason(tiny_root):
    with pytest.raises(ModelLoadError, match="bfloat16"):
        new_runner(FAMILY_MODELS["sd"], backend="onnx", torch_dtype="bfloat16")


def test_availability_reasons_on_this_machine():
    cpu = torch.device("cpu")
    assert backend_unavailable("eager", cpu, torch.float32) is None
    assert backend_unavailable("onnx", cpu, torch.float32) is None
    assert "bfloat16" in backend_unavailable("onnx", cpu, torch.bfloat16)
    assert backend_unavailable("tensorrt", cpu, torch.float16) is not None


# --- build-engines ----------------------------------------------------------------------------------------------
def test_build_engines_exports_onnx_and_says_what_it_would_build(tiny_root, tmp_path, capsys, monkeypatch):
    from kiln.server.cli import main as kiln

    arguments = ["build-engines", FAMILY_MODELS["sd"], "--tiny", "--size", "64x64", "--size", "128x96",
                 "--max-batch", "2", "--cache-dir", str(tmp_path)]
    assert kiln(arguments) == 0
    out = capsys.readouterr().out
    [entry] = EngineCache(tmp_path).entries("onnx", FAMILY_MODELS["sd"])
    assert f"ONNX: {entry.file(ONNX_FILE)}" in out and "exported in" in out
    assert "profile: 64x64,128x96;rows=1-2-4 (rows = images x 2); precision fp32" in out
    assert "sample: min [1, 4, 12, 16] opt [2, 4, 12, 16] max [4, 4, 12, 16]" in out
    if importlib.util.find_spec("tensorrt") is None or not torch.cuda.is_available():
        assert "TensorRT: not built here" in out and f"onnx={entry.key.digest}" in out

    # The script is the same command, and the export is now found in the cache.
    monkeypatch.setattr("sys.argv", ["build_engines.py", *arguments[1:]])
    script = Path(__file__).resolve().parents[2] / "scripts" / "build_engines.py"
    with pytest.raises(SystemExit) as exit_code:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_code.value.code == 0
    assert "found in cache" in capsys.readouterr().out

    assert kiln(["build-engines", FAMILY_MODELS["sd"], "--tiny", "--size", "65x64"]) == 2


# --- tensorrt (GPU only) ----------------------------------------------------------------------------------------
def test_tensorrt_engine_matches_eager_and_a_restart_reuses_it(tiny_root, tmp_path, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU; this machine has none")
    pytest.importorskip("tensorrt", reason="the tensorrt package is not installed")
    from kiln.engine.backends import tensorrt as trt_module

    monkeypatch.setenv("KILN_ENGINE_CACHE", str(tmp_path))
    options = {"backend": "tensorrt", "device": "cuda", "torch_dtype": "float16", "max_batch_size": 2}
    runner = new_runner(FAMILY_MODELS["sd"], **options)
    family = runner.executor.family
    backend = family.denoiser
    assert runner.backend_info["backend"] == "tensorrt" and isinstance(backend, trt_module.TensorRTBackend)
    for rows in (1, 3, 4, 5):  # 5 > max rows 4: two pieces
        inputs = mixed_inputs(family, rows, seed=rows)
        with torch.no_grad():
            expected = backend.denoiser(*inputs)
        got = backend(*inputs)
        assert got.shape == expected.shape
        assert torch.allclose(got.float(), expected.float(), atol=2e-2), (got - expected).abs().max()
    runner.close()

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt an engine the cache had")

    monkeypatch.setattr(trt_module, "build_engine", no_build)
    restarted = new_runner(FAMILY_MODELS["sd"], **options)
    assert restarted.backend_info["backend"] == "tensorrt"
    auto = new_runner(FAMILY_MODELS["sd"], **{**options, "backend": "auto"})
    assert auto.backend_info["backend"] == "tensorrt"  # a cached engine matches: auto takes it
    restarted.close()
    auto.close()
