"""`kiln tiny build` writes diffusers-layout checkpoints for the requested models."""

from __future__ import annotations

import json
from pathlib import Path

from .e2e_helpers import run_kiln


def test_tiny_build_writes_the_requested_checkpoints(tmp_path: Path) -> None:
    result = run_kiln("tiny", "build", str(tmp_path), "--model", "sd-turbo", "FLUX.1-schnell", "--no-loras")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [str(tmp_path / "sd-turbo"), str(tmp_path / "FLUX.1-schnell")]
    assert json.loads((tmp_path / "sd-turbo" / "model_index.json").read_text())["_class_name"] == (
        "StableDiffusionPipeline"
    )
    assert json.loads((tmp_path / "FLUX.1-schnell" / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["FLUX.1-schnell", "sd-turbo"]
    # A tiny ControlNet for each of the model's catalogue ControlNets (FLUX.1-schnell has none).
    controlnets = tmp_path / "sd-turbo" / "controlnets"
    assert sorted(path.name for path in controlnets.iterdir()) == ["canny", "depth", "hed", "openpose", "scribble"]
    assert json.loads((controlnets / "canny" / "config.json").read_text())["_class_name"] == "ControlNetModel"
    assert not (tmp_path / "FLUX.1-schnell" / "controlnets").exists()


def test_tiny_build_writes_tiny_loras_made_for_each_checkpoint(tmp_path: Path) -> None:
    result = run_kiln("tiny", "build", str(tmp_path), "--model", "stable-diffusion-v1.5")
    assert result.returncode == 0, result.stderr
    loras = tmp_path / "loras" / "stable-diffusion-v1.5"
    assert result.stdout.splitlines() == [str(tmp_path / "stable-diffusion-v1.5"), str(loras)]
    assert sorted(path.name for path in loras.iterdir()) == [
        "detail.safetensors", "kohya.safetensors", "style.safetensors", "text.safetensors"]


def test_tiny_build_rejects_unknown_names(tmp_path: Path) -> None:
    result = run_kiln("tiny", "build", str(tmp_path), "--model", "no-such-model")
    assert result.returncode == 2
    assert "no-such-model" in result.stderr
    assert not any(tmp_path.iterdir())
