"""The `kiln` CLI against a real server: launch, list, generate, terminate, and the errors users will see."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .e2e_helpers import KilnServer, png_image, run_kiln


def _generate(server: KilnServer, output: Path, *args: str) -> tuple[np.ndarray, int]:
    """Run `kiln generate` on t1 at 64x64, 2 steps; return the written pixels and the printed seed."""
    result = run_kiln(
        "generate", "--model", "t1", "--prompt", "a red fox in snow", "--size", "64x64", "--steps", "2",
        "--output", str(output), *args, endpoint=server.endpoint,
    )
    assert result.returncode == 0, result.stderr
    match = re.fullmatch(rf"{re.escape(str(output))} seed=(\d+)\n", result.stdout)
    assert match, result.stdout
    image = png_image(output.read_bytes())
    assert image.size == (64, 64)
    return np.asarray(image.convert("RGB")), int(match.group(1))


@pytest.fixture(scope="module")
def launched(server: KilnServer) -> KilnServer:
    """sd-turbo's tiny checkpoint launched as t1 through `kiln launch`, with options in Xinference's form."""
    result = run_kiln(
        "launch", "--model-name", "sd-turbo", "--model-type", "image", "--model-uid", "t1", "--tiny", "True",
        "--max_batch_size", "4", endpoint=server.endpoint,
    )
    assert result.returncode == 0, result.stderr + server.log_tail()
    assert result.stdout.strip() == "Model uid: t1"
    return server


def test_list_shows_the_launched_model(launched: KilnServer) -> None:
    result = run_kiln("list", endpoint=launched.endpoint)
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["UID", "NAME", "ABILITIES", "STATUS"]
    assert ["t1", "sd-turbo", "text2image", "ready"] in [row.split() for row in rows]


def test_generate_writes_a_png_and_the_seed_reproduces_it(launched: KilnServer, tmp_path: Path) -> None:
    first, seed = _generate(launched, tmp_path / "x.png", "--seed", "7")
    assert seed == 7
    again, _ = _generate(launched, tmp_path / "y.png", "--seed", "7")
    assert np.array_equal(first, again)
    other, _ = _generate(launched, tmp_path / "z.png", "--seed", "8")
    assert not np.array_equal(first, other)


def test_a_drawn_seed_is_printed_and_reproduces_the_image(launched: KilnServer, tmp_path: Path) -> None:
    drawn, seed = _generate(launched, tmp_path / "drawn.png")
    replay, _ = _generate(launched, tmp_path / "replay.png", "--seed", str(seed))
    assert np.array_equal(drawn, replay)


def test_several_images_go_to_numbered_files(launched: KilnServer, tmp_path: Path) -> None:
    result = run_kiln(
        "generate", "--model", "t1", "--prompt", "fox", "--size", "64x64", "--steps", "1", "--n", "3",
        "--seed", "3", "--output", str(tmp_path / "out" / "many.png"), endpoint=launched.endpoint,
    )
    assert result.returncode == 0, result.stderr
    paths = [tmp_path / "out" / name for name in ("many.png", "many-1.png", "many-2.png")]
    assert [line.split(" seed=")[0] for line in result.stdout.splitlines()] == [str(path) for path in paths]
    assert all(png_image(path.read_bytes()).size == (64, 64) for path in paths)
    assert "100%" in result.stderr  # the progress bar finished


def test_the_output_suffix_picks_the_format(launched: KilnServer, tmp_path: Path) -> None:
    output = tmp_path / "pic.webp"
    result = run_kiln("generate", "--model", "t1", "--prompt", "fox", "--size", "64x64", "--steps", "1",
                      "--output", str(output), endpoint=launched.endpoint)
    assert result.returncode == 0, result.stderr
    with Image.open(output) as image:
        assert (image.format, image.size) == ("WEBP", (64, 64))


def test_generate_errors_exit_non_zero_with_the_server_message(launched: KilnServer, tmp_path: Path) -> None:
    output = tmp_path / "never.png"
    bad_size = run_kiln(
        "generate", "--model", "t1", "--prompt", "p", "--size", "65x64", "--output", str(output),
        endpoint=launched.endpoint,
    )
    assert bad_size.returncode != 0
    assert "400" in bad_size.stderr and "65" in bad_size.stderr and "multiple of 8" in bad_size.stderr
    unknown = run_kiln("generate", "--model", "nope", "--prompt", "p", "--output", str(output),
                       endpoint=launched.endpoint)
    assert unknown.returncode != 0
    assert "404" in unknown.stderr and "nope" in unknown.stderr
    assert not output.exists()


def test_launch_errors_exit_non_zero_with_the_server_message(server: KilnServer) -> None:
    unknown = run_kiln("launch", "--model-name", "no-such-model", "--model-type", "image", endpoint=server.endpoint)
    assert unknown.returncode != 0
    assert "400" in unknown.stderr and "no-such-model" in unknown.stderr
    malformed = run_kiln("launch", "--model-name", "sd-turbo", "--tiny", endpoint=server.endpoint)
    assert malformed.returncode == 2 and "--tiny needs a value" in malformed.stderr


def test_unreachable_server_is_a_clear_error() -> None:
    result = run_kiln("list", endpoint="http://127.0.0.1:9")
    assert result.returncode == 1
    assert "cannot reach http://127.0.0.1:9" in result.stderr


def test_terminate_removes_the_model(server: KilnServer) -> None:
    launch = run_kiln("launch", "-n", "sd-turbo", "-t", "image", "-u", "t-gone", "--tiny", "true",
                      endpoint=server.endpoint)
    assert launch.returncode == 0, launch.stderr
    result = run_kiln("terminate", "--model-uid", "t-gone", endpoint=server.endpoint)
    assert result.returncode == 0, result.stderr
    listing = run_kiln("list", endpoint=server.endpoint)
    assert "t-gone" not in listing.stdout
    again = run_kiln("terminate", "--model-uid", "t-gone", endpoint=server.endpoint)
    assert again.returncode != 0 and "404" in again.stderr


def test_a_failed_load_reports_its_error_and_frees_the_uid(server: KilnServer, tmp_path: Path) -> None:
    empty = tmp_path / "not-a-checkpoint"
    empty.mkdir()
    result = run_kiln("launch", "-n", "sd-turbo", "-u", "t-broken", "--model-path", str(empty),
                      endpoint=server.endpoint)
    assert result.returncode == 1
    assert "Failed to launch model: 400" in result.stderr and "not-a-checkpoint" in result.stderr
    offload = run_kiln("launch", "-n", "sd-turbo", "-u", "t-offload", "--tiny", "true", "--cpu_offload", "True",
                       endpoint=server.endpoint)
    assert offload.returncode == 1 and "Failed to launch model: 400" in offload.stderr, offload.stderr
    assert "cpu_offload" in offload.stderr
    listing = run_kiln("list", endpoint=server.endpoint).stdout
    assert "t-broken" not in listing and "t-offload" not in listing



def test_launch_draws_its_progress(launched: KilnServer) -> None:
    result = run_kiln("launch", "--model-name", "sd-turbo", "--model-uid", "t-progress", "--tiny", "True",
                      endpoint=launched.endpoint)
    assert result.returncode == 0, result.stderr
    assert "Launching t-progress" in result.stderr and "100%" in result.stderr
    assert run_kiln("terminate", "--model-uid", "t-progress", endpoint=launched.endpoint).returncode == 0


def test_register_launch_and_unregister_a_custom_model(server: KilnServer, tmp_path: Path) -> None:
    import json

    from kiln.engine.tiny import tiny_checkpoint

    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"model_name": "cli-sd", "model_ability": ["text2image"],
                                "model_uri": str(tiny_checkpoint("sd-turbo"))}))
    result = run_kiln("register", "--file", str(spec), "--persist", endpoint=server.endpoint)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Registered cli-sd (persisted)"
    again = run_kiln("register", "--file", str(spec), endpoint=server.endpoint)
    assert again.returncode == 1 and "already registered" in again.stderr
    launched = run_kiln("launch", "--model-name", "cli-sd", endpoint=server.endpoint)
    assert launched.stdout.strip() == "Model uid: cli-sd", launched.stderr
    running = run_kiln("unregister", "cli-sd", endpoint=server.endpoint)
    assert running.returncode == 1 and "terminate it first" in running.stderr
    assert run_kiln("terminate", "--model-uid", "cli-sd", endpoint=server.endpoint).returncode == 0
    result = run_kiln("unregister", "cli-sd", endpoint=server.endpoint)
    assert result.returncode == 0 and result.stdout.strip() == "Unregistered cli-sd", result.stderr
