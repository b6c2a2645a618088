"""The one request schema (engine/schema.py) and the conversions it shares with OCR requests and launch options
(engine/coerce.py), checked directly: no model, no server, no torch."""

from __future__ import annotations

import pytest

from kiln.engine.catalogue import get_spec
from kiln.engine.errors import InvalidRequest
from kiln.engine.requests import ImageRequest
from kiln.engine.schema import Limits, check_request, fit_size, merge_fields, parse_image_request, parse_size


def test_parse_size() -> None:
    assert parse_size("512x768") == (512, 768)
    assert parse_size(" 512*768 ") == (512, 768)
    assert parse_size("512 X 768") == (512, 768)
    for default in ("", "auto", "original"):
        assert parse_size(default) is None
    for bad in ("512", "512xx768", "x512", "-512x512", "512x512x512"):
        with pytest.raises(InvalidRequest):
            parse_size(bad)


def test_fit_size_rounds_down_and_clamps() -> None:
    flux = get_spec("FLUX.1-schnell")
    assert fit_size(flux, 1000, 700) == (992, 688)
    assert fit_size(flux, 10, 5000) == (flux.min_size, flux.max_size)


def test_merge_order_and_ignored_fields() -> None:
    merged = merge_fields({"kwargs": '{"seed": 1, "guidance_scale": 2}', "seed": "3", "quality": "hd",
                           "negative_prompt": None, "model": "m"})
    assert merged == {"seed": 3, "guidance_scale": 2.0}


def test_catalogue_defaults_apply() -> None:
    spec = get_spec("FLUX.1-dev")
    parsed = parse_image_request(spec, {"prompt": "x"}, limits=Limits())
    request, delivery = parsed.request, parsed.delivery
    assert (request.width, request.height) == spec.default_size
    assert request.steps == 28 and request.guidance_scale == 3.5 and request.sampler == "default"
    assert delivery.response_format == "url" and delivery.output_format == "png" and not delivery.stream


def test_request_carries_previews_only_when_streaming() -> None:
    spec = get_spec("sd-turbo")
    streamed = parse_image_request(spec, {"prompt": "x", "stream": True, "partial_images": 2}, limits=Limits())
    assert streamed.request.preview_count == 2
    plain = parse_image_request(spec, {"prompt": "x", "partial_images": 2}, limits=Limits())
    assert plain.request.preview_count == 0


BAD = [
    ({"n": 0}, "n"),
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"guidance_scale": 101}, "guidance_scale"),
    ({"strength": 1.5}, "strength"),
    ({"seed": 2**40}, "seed"),
    ({"sampler_name": "Warp Drive"}, "sampler_name"),
    ({"size": "72x64"}, "size"),
    ({"prompt": "x" * 4001}, "prompt"),
    ({"prompt": ["a"] * 4, "n": 3}, "n"),
]


@pytest.mark.parametrize(("change", "param"), BAD)
def test_the_engine_refuses_what_the_server_refuses_with_the_same_words(change: dict, param: str) -> None:
    """Both validators run from one set of declarations: the server's parse and the runner's check of an
    ImageRequest built by hand (as tests, benchmarks and replicas do) fail alike."""
    spec, limits = get_spec("sd3-medium"), Limits()
    with pytest.raises(InvalidRequest) as served:
        parse_image_request(spec, {"prompt": "x", "size": "64x64", **change}, limits=limits)
    fields = {"prompt": "x", "width": 64, "height": 64, "steps": 4, "guidance_scale": 1.0}
    names = {"num_inference_steps": "steps", "sampler_name": "sampler"}
    for name, value in change.items():
        if name == "size":
            fields["width"], fields["height"] = parse_size(value)
        else:
            fields[names.get(name, name)] = value
    with pytest.raises(InvalidRequest) as direct:
        check_request(spec, ImageRequest(**fields), limits)
    assert served.value.param == direct.value.param == param
    assert str(served.value) == str(direct.value)


def test_limits_bound_both_sides() -> None:
    spec, tight = get_spec("sd-turbo"), Limits(max_images=2, max_steps=3)
    with pytest.raises(InvalidRequest, match="between 1 and 2"):
        parse_image_request(spec, {"prompt": "x", "n": 3}, limits=tight)
    with pytest.raises(InvalidRequest, match="between 1 and 3"):
        check_request(spec, ImageRequest("x", 64, 64, 4, 0.0), tight)


def test_the_steps_an_image_to_image_request_keeps_are_rounded_as_its_family_rounds() -> None:
    """3 steps at strength 0.2: a UNet pipeline keeps int(0.6) = 0 steps (refused), a flow-matching one skips
    int(2.4) = 2 and runs the last."""
    image = object()  # any non-None image makes the request image to image; the check reads no pixels
    request = ImageRequest("x", 64, 64, 3, 1.0, image=image, strength=0.2)
    with pytest.raises(InvalidRequest, match="runs no denoising step") as refused:
        check_request(get_spec("sd-turbo"), request, Limits())
    assert refused.value.param == "num_inference_steps"
    check_request(get_spec("sd3-medium"), request, Limits())
    assert get_spec("FLUX.1-schnell").family.steps_kept(4, 0.3) == 2
    assert get_spec("stable-diffusion-v1.5").family.steps_kept(4, 0.3) == 1


def test_one_reading_of_integers_and_booleans_for_requests_ocr_and_launch_options() -> None:
    from kiln.engine.catalogue import OCR_CATALOGUE
    from kiln.engine.ocr import parse_ocr_params
    from kiln.engine.options import LaunchOptionError, parse_launch_options

    spec = get_spec("sd-turbo")
    parsed = parse_image_request(spec, {"prompt": "x", "n": "2", "num_inference_steps": 3.0, "stream": "yes"},
                                 limits=Limits())
    assert (parsed.request.n, parsed.request.steps, parsed.delivery.stream) == (2, 3, True)
    ocr = OCR_CATALOGUE["PP-OCR"]
    assert parse_ocr_params(ocr, {"detail": "on", "dpi": 300.0}).detail is True
    options = parse_launch_options(spec, {"cpu_offload": "no", "max_batch_size": "4", "max_queue_size": 8.0})
    assert (options.cpu_offload, options.max_batch_size, options.max_queue_size) == (False, 4, 8)
    for bad in (2.5, True, "two"):
        with pytest.raises(InvalidRequest, match="integer"):
            parse_image_request(spec, {"prompt": "x", "n": bad}, limits=Limits())
        with pytest.raises(InvalidRequest, match="integer"):
            parse_ocr_params(ocr, {"dpi": bad})
        with pytest.raises(LaunchOptionError, match="max_batch_size"):
            parse_launch_options(spec, {"max_batch_size": bad})
    for bad in ("maybe", 1, None.__class__):
        with pytest.raises(InvalidRequest, match="true or false"):
            parse_image_request(spec, {"prompt": "x", "stream": bad}, limits=Limits())


def test_the_schema_and_the_launch_options_load_without_torch() -> None:
    import subprocess
    import sys

    probe = ("import sys; import kiln.engine.schema, kiln.engine.options, kiln.engine.catalogue, "
             "kiln.engine.families, kiln.engine.backends, kiln.engine.errors; print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False", result.stderr
