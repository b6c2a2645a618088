"""`kiln launch` with Xinference's LoRA flags (-lm NAME PATH, -fd K V) against a real server."""

from __future__ import annotations

import httpx

from .e2e_helpers import KilnServer, run_kiln


def test_launch_with_lora_modules_and_fuse_kwargs(server: KilnServer, tiny_lora_dir) -> None:
    folder = tiny_lora_dir("sd-turbo")
    result = run_kiln("launch", "-n", "sd-turbo", "-t", "image", "-u", "t-lora", "--tiny", "True",
                      "-lm", "style", str(folder / "style.safetensors"), "--lora-modules", "text",
                      str(folder / "text.safetensors"), "-fd", "lora_scale", "0.5", "--max_loras", "2",
                      endpoint=server.endpoint)
    assert result.returncode == 0, result.stderr + server.log_tail()
    try:
        lora = httpx.get(f"{server.endpoint}/v1/models/t-lora").json()["lora"]
        assert lora["mode"] == "per-row" and lora["registered"] == ["style", "text"]
        assert lora["default"] == [{"name": "style", "scale": 0.5}, {"name": "text", "scale": 0.5}]
        assert set(lora["resident"]) == {"style", "text"}
    finally:
        run_kiln("terminate", "-u", "t-lora", endpoint=server.endpoint)
