"""Weight resolution, loading as the launch options ask, and launch-option validation."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from kiln.engine import loading
from kiln.engine.catalogue import get_spec
from kiln.engine.loading import load_model, resolve_weights
from kiln.engine.errors import ModelLoadError
from kiln.engine.options import LaunchOptionError, LaunchOptions, parse_launch_options, resolve_dtype
from kiln.engine.tiny import tiny_checkpoint

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")


def _generate(pipeline) -> np.ndarray:
    image = pipeline(
        "a photograph of a cat", height=64, width=64, num_inference_steps=2,
        generator=torch.Generator().manual_seed(0), output_type="np",
    ).images
    assert np.isfinite(image).all() and image.std() > 0.05
    return image


def _fake_hub_cache(hub: Path, repo_id: str, checkpoint: Path) -> Path:
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<sha>/...}."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / sha
    shutil.copytree(checkpoint, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    return snapshot


@pytest.mark.parametrize("variable", ["HF_HUB_CACHE", "HF_HOME"])
def test_loads_from_the_hugging_face_cache(
    tiny_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    spec = get_spec("sd-turbo")
    hub = tmp_path / "hub"
    snapshot = _fake_hub_cache(hub, spec.hub_id, tiny_checkpoint(spec.name, cache_root=tiny_root))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv(variable, str(hub if variable == "HF_HUB_CACHE" else tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    loaded = load_model(spec, LaunchOptions(device="cpu"))
    assert loaded.source == str(snapshot)
    assert type(loaded.pipeline).__name__ == "StableDiffusionPipeline"


def test_missing_weights_say_where_they_were_looked_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as error:
        resolve_weights(get_spec("FLUX.1-dev"), LaunchOptions())
    message = str(error.value)
    assert "black-forest-labs/FLUX.1-dev" in message and "not in the Hugging Face cache" in message
    assert str(tmp_path) in message and "model_path" in message and "tiny" in message


def test_model_path_must_be_a_diffusers_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        load_model(get_spec("sd-turbo"), LaunchOptions(model_path=str(tmp_path), device="cpu"))


def test_checkpoint_of_another_family_is_refused(tiny_root: Path) -> None:
    sd_checkpoint = tiny_checkpoint("sd-turbo", cache_root=tiny_root)
    with pytest.raises(ModelLoadError, match="StableDiffusionPipeline.*needs a StableDiffusionXLPipeline"):
        load_model(get_spec("sdxl-turbo"), LaunchOptions(model_path=str(sd_checkpoint), device="cpu"))


def test_sd3_without_t5_loads_and_generates(tiny_root: Path) -> None:
    spec = get_spec("sd3-medium")
    options = parse_launch_options(spec, {"tiny": True, "device": "cpu", "text_encoder_3": None})
    assert options.drop_text_encoder_3 and options.quantize_text_encoder == ()  # the default T5 quantization goes
    pipeline = load_model(spec, options).pipeline
    assert pipeline.text_encoder_3 is None and pipeline.tokenizer_3 is None
    _generate(pipeline)


def test_catalogue_default_quantizes_t5_in_8_bit_on_cpu(tiny_root: Path) -> None:
    import bitsandbytes

    spec = get_spec("sd3-medium")
    options = parse_launch_options(spec, {"tiny": True, "device": "cpu"})
    assert options.quantize_text_encoder == ("text_encoder_3",)
    pipeline = load_model(spec, options).pipeline
    linears = [m for m in pipeline.text_encoder_3.modules() if isinstance(m, bitsandbytes.nn.Linear8bitLt)]
    assert linears and all(m.weight.dtype == torch.int8 for m in linears)
    assert not any(isinstance(m, bitsandbytes.nn.Linear8bitLt) for m in pipeline.text_encoder.modules())
    _generate(pipeline)


def test_text_encoder_quantizes_in_4_bit_on_cpu(tiny_root: Path) -> None:
    import bitsandbytes

    spec = get_spec("FLUX.1-schnell")
    options = parse_launch_options(spec, {"tiny": True, "device": "cpu", "text_encoder_quantization": "4-bit"})
    pipeline = load_model(spec, options).pipeline
    assert any(isinstance(m, bitsandbytes.nn.Linear4bit) for m in pipeline.text_encoder_2.modules())
    _generate(pipeline)


def test_quantization_without_bitsandbytes_says_how_to_install(
    tiny_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a))
    options = LaunchOptions(tiny=True, device="cpu", quantize_text_encoder=("text_encoder",))
    with pytest.raises(ModelLoadError, match=r"bitsandbytes.*pip install"):
        load_model(get_spec("sd-turbo"), options)


@NO_CUDA
def test_cpu_offload_without_a_gpu_is_an_error(tiny_root: Path) -> None:
    with pytest.raises(ModelLoadError, match="cpu_offload.*runs on the CPU.*no CUDA device"):
        load_model(get_spec("sd-turbo"), LaunchOptions(tiny=True, cpu_offload=True))


@NO_CUDA
def test_cuda_device_without_cuda_is_an_error(tiny_root: Path) -> None:
    with pytest.raises(ModelLoadError, match="device='cuda:1'.*no CUDA device"):
        load_model(get_spec("sd-turbo"), LaunchOptions(tiny=True, device="cuda:1"))


def test_dtype_default_becomes_float32_on_cpu_but_explicit_dtype_is_honoured(tiny_root: Path) -> None:
    spec = get_spec("FLUX.1-schnell")
    assert resolve_dtype(spec, LaunchOptions(), "cpu") == "float32"
    assert resolve_dtype(spec, LaunchOptions(), "cuda") == "bfloat16"
    loaded = load_model(spec, LaunchOptions(tiny=True, device="cpu", torch_dtype="bfloat16"))
    assert loaded.dtype == torch.bfloat16 and loaded.pipeline.transformer.dtype == torch.bfloat16


def test_launch_options_parse_cli_strings_and_merge_catalogue_defaults() -> None:
    options = parse_launch_options(get_spec("FLUX.1-dev"), {
        "tiny": "True", "cpu_offload": "false", "max_batch_size": "8", "max_queue_size": 3,
        "quantize_text_encoder": "text_encoder, text_encoder_2", "torch_dtype": "torch.float16", "device": "CUDA:0",
    })
    assert options == LaunchOptions(
        torch_dtype="float16", device="cuda:0", cpu_offload=False, tiny=True, max_batch_size=8, max_queue_size=3,
        quantize_text_encoder=("text_encoder", "text_encoder_2"),
    )
    assert parse_launch_options(get_spec("FLUX.1-dev"), {}).quantize_text_encoder == ("text_encoder_2",)
    assert parse_launch_options(get_spec("FLUX.1-dev"), {"quantize_text_encoder": ""}).quantize_text_encoder == ()


@pytest.mark.parametrize(("model", "raw", "option"), [
    ("sd-turbo", {"no_such_option": 1}, "no_such_option"),
    ("sd-turbo", {"max_batch_size": 0}, "max_batch_size"),
    ("sd-turbo", {"max_batch_size": 2.5}, "max_batch_size"),
    ("sd-turbo", {"max_batch_size": "most"}, "max_batch_size"),
    ("sd-turbo", {"max_queue_size": True}, "max_queue_size"),
    ("sd-turbo", {"cpu_offload": "sometimes"}, "cpu_offload"),
    ("sd-turbo", {"tiny": 1}, "tiny"),
    ("sd-turbo", {"torch_dtype": "float8"}, "torch_dtype"),
    ("sd-turbo", {"device": "gpu"}, "device"),
    ("sd-turbo", {"backend": "tensorrt"}, "backend"),
    ("sd-turbo", {"backend": "magic"}, "backend"),
    ("sd-turbo", {"text_encoder_quantization": "2-bit"}, "text_encoder_quantization"),
    ("sd-turbo", {"quantize_text_encoder": "text_encoder_2"}, "quantize_text_encoder"),
    ("sd-turbo", {"quantize_text_encoder": 3}, "quantize_text_encoder"),
    ("sd-turbo", {"text_encoder_3": None}, "text_encoder_3"),
    ("sd3-medium", {"text_encoder_3": "t5"}, "text_encoder_3"),
    ("sd3-medium", {"text_encoder_3": None, "quantize_text_encoder": "text_encoder_3"}, "text_encoder_3"),
    ("sd-turbo", {"model_path": ""}, "model_path"),
])
def test_bad_launch_options_name_the_option(model: str, raw: dict, option: str) -> None:
    with pytest.raises(LaunchOptionError, match=f"'{option}'.*(accepted|only|not available|conflict)"):
        parse_launch_options(get_spec(model), raw)


def test_backend_option_accepts_the_installed_backends() -> None:
    assert parse_launch_options(get_spec("sd-turbo"), {"backend": "onnx"}).backend == "onnx"
    assert parse_launch_options(get_spec("sd-turbo"), {}).backend == "auto"


def test_loading_module_reads_hub_variables_at_call_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert loading.hub_cache_dir() == tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert loading.hub_cache_dir() == tmp_path / "elsewhere"
