"""POST /v1/images/generations: every family, both parameter styles, response and output formats, seeds."""

from __future__ import annotations

import json

import httpx
import pytest

from .server_helpers import SIZE, assert_idle, b64_image, pixels, same_image


def generate(http: httpx.Client, model: str, **fields) -> dict:
    body = {"model": model, "prompt": "a red barn", "size": f"{SIZE}x{SIZE}", "response_format": "b64_json", **fields}
    response = http.post("/v1/images/generations", json=body)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("model", ["sd", "sd15", "sdxl", "sd3", "flux"])
def test_every_family_generates(http: httpx.Client, model: str) -> None:
    body = generate(http, model, n=2, num_inference_steps=2)
    assert isinstance(body["created"], int) and len(body["data"]) == 2
    for item in body["data"]:
        assert set(item) == {"url", "b64_json", "seed"} and item["url"] is None
        assert b64_image(item).size == (SIZE, SIZE)
        assert isinstance(item["seed"], int)


def test_seed_reproduces_the_image_and_seeds_follow_n(http: httpx.Client) -> None:
    first = generate(http, "sd15", n=2, seed=1234, num_inference_steps=2, guidance_scale=3.0)
    assert [item["seed"] for item in first["data"]] == [1234, 1235]
    # The second image alone, from its reported seed: same pixels.
    again = generate(http, "sd15", seed=1235, num_inference_steps=2, guidance_scale=3.0)
    assert same_image(pixels(b64_image(first["data"][1])), pixels(b64_image(again["data"][0])))
    different = generate(http, "sd15", seed=99, num_inference_steps=2, guidance_scale=3.0)
    assert not same_image(pixels(b64_image(again["data"][0])), pixels(b64_image(different["data"][0])))


def test_seed_list_and_random_seeds_are_reported(http: httpx.Client) -> None:
    body = generate(http, "sd", n=3, seed=[7, -1])
    seeds = [item["seed"] for item in body["data"]]
    assert seeds[0] == 7 and all(isinstance(seed, int) and seed >= 0 for seed in seeds)


def test_prompt_list_makes_n_images_per_prompt(http: httpx.Client) -> None:
    body = generate(http, "sd", prompt=["a cat", "a dog"], n=2)
    assert len(body["data"]) == 4


def test_kwargs_string_object_and_top_level_merge_with_top_level_winning(http: httpx.Client) -> None:
    as_string = generate(http, "sd15", kwargs=json.dumps({"seed": 5, "num_inference_steps": 2}))
    as_object = generate(http, "sd15", kwargs={"seed": 5, "num_inference_steps": 2})
    top_wins = generate(http, "sd15", kwargs={"seed": 6, "num_inference_steps": 2}, seed=5)
    assert [body["data"][0]["seed"] for body in (as_string, as_object, top_wins)] == [5, 5, 5]
    reference = pixels(b64_image(as_string["data"][0]))
    for body in (as_object, top_wins):
        assert same_image(reference, pixels(b64_image(body["data"][0])))


def test_top_level_parameters_are_honoured(http: httpx.Client) -> None:
    """Xinference drops top-level negative_prompt and friends; Kiln uses them (different image)."""
    common = {"seed": 3, "num_inference_steps": 2, "guidance_scale": 4.0}
    plain = generate(http, "sd15", **common)
    negative = generate(http, "sd15", negative_prompt="blurry", **common)
    assert not same_image(pixels(b64_image(plain["data"][0])), pixels(b64_image(negative["data"][0])))


@pytest.mark.parametrize("size_fields", [{"size": "64*64"}, {"size": "64 x 64"}, {"size": None, "width": 64,
                                                                                   "height": 64}])
def test_size_spellings(http: httpx.Client, size_fields: dict) -> None:
    body = generate(http, "sd", **size_fields)
    assert b64_image(body["data"][0]).size == (64, 64)


def test_width_and_height_override_size(http: httpx.Client) -> None:
    body = generate(http, "sd", size="64x64", width=72)
    assert b64_image(body["data"][0]).size == (72, 64)


@pytest.mark.parametrize(("output_format", "pil_format"), [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_output_formats(http: httpx.Client, output_format: str, pil_format: str) -> None:
    body = generate(http, "sd", output_format=output_format, output_compression=80)
    assert b64_image(body["data"][0], pil_format).size == (64, 64)


def test_samplers_by_name(http: httpx.Client) -> None:
    for sampler in ("Euler a", "DPM++ 2M Karras"):
        generate(http, "sd15", sampler_name=sampler, num_inference_steps=2)
    generate(http, "flux", sampler_name="Euler")


def test_ignored_openai_fields_are_accepted(http: httpx.Client) -> None:
    generate(http, "sd", quality="hd", style="vivid", user="me", background="auto", moderation="low")


def test_model_may_be_omitted(http: httpx.Client) -> None:
    response = http.post("/v1/images/generations", json={"prompt": "x", "size": "64x64",
                                                         "response_format": "b64_json", "model": None})
    assert response.status_code == 200, response.text


def test_numeric_text_values_parse_like_numbers(http: httpx.Client) -> None:
    """Text values (what multipart forms carry) follow the same rules as JSON numbers: "2" is n=2."""
    response = http.post("/v1/images/generations", json={"model": "sd", "prompt": "x", "n": "2", "seed": "11",
                                                         "size": "64x64", "response_format": "b64_json"})
    assert [item["seed"] for item in response.json()["data"]] == [11, 12]
    assert_idle(http, "sd")
