"""ControlNet units without a model: a unit's own fields win over diffusers' kwargs, which win over the defaults;
per-unit kwarg lists; the one launched ControlNet as the default name; the launch option's shapes and refusals."""

import pytest
from PIL import Image

from kiln.engine.catalogue import get_spec
from kiln.engine.controlnet_units import ControlUnit, complete_units, read_units
from kiln.engine.errors import InvalidRequest
from kiln.engine.options import LaunchOptionError, parse_launch_options

IMAGE = Image.new("RGB", (8, 8))


def test_unit_fields_then_kwargs_then_defaults():
    units = [ControlUnit("canny", IMAGE, scale=0.3), ControlUnit("mlsd", IMAGE, end=0.5)]
    kwargs = {"controlnet_conditioning_scale": [0.9, 0.8], "control_guidance_start": 0.2, "guess_mode": True}
    first, second = complete_units(units, kwargs, ["canny", "mlsd"])
    assert (first.scale, first.start, first.end, first.guess_mode) == (0.3, 0.2, 1.0, True)
    assert (second.scale, second.start, second.end) == (0.8, 0.2, 0.5)
    (plain,) = complete_units([ControlUnit("canny", IMAGE)], {}, ["canny"])
    assert (plain.scale, plain.start, plain.end, plain.guess_mode) == (1.0, 0.0, 1.0, False)


def test_the_only_launched_controlnet_is_the_default_name():
    assert complete_units([ControlUnit(image=IMAGE)], {}, ["canny"])[0].name == "canny"
    with pytest.raises(InvalidRequest, match="name is required"):
        complete_units([ControlUnit(image=IMAGE)], {}, ["canny", "mlsd"])


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"controlnet_conditioning_scale": [1.0]}, "1 values for 2"),
    ({"control_guidance_start": 0.9, "control_guidance_end": 0.1}, "after end"),
])
def test_bad_kwargs(kwargs, words):
    with pytest.raises(InvalidRequest, match=words):
        complete_units([ControlUnit("canny", IMAGE), ControlUnit("canny", IMAGE)], kwargs, ["canny"])


def test_units_read_from_json_text_one_object_or_a_list():
    assert read_units('{"name": "canny"}') == (ControlUnit("canny"),)
    assert read_units([{"name": "a", "scale": "0.5"}, {"name": "b", "image": "aGk="}]) == (
        ControlUnit("a", scale=0.5), ControlUnit("b", image=b"hi"))
    with pytest.raises(InvalidRequest, match="low and high are the canny thresholds"):
        read_units([{"name": "a", "low": 10}])


def test_launch_option_shapes():
    spec = get_spec("stable-diffusion-v1.5")
    assert parse_launch_options(spec, {"controlnet": "canny,mlsd"}).controlnet == (("canny", None), ("mlsd", None))
    assert parse_launch_options(spec, {"controlnet": ["seg"]}).controlnet == (("seg", None),)
    assert parse_launch_options(spec, {"controlnet": {"mine": "/x"}}).controlnet == (("mine", "/x"),)
    with pytest.raises(LaunchOptionError, match="FLUX.1-dev"):
        parse_launch_options(get_spec("FLUX.1-schnell"), {"controlnet": "canny"})
    with pytest.raises(LaunchOptionError, match="accepted: canny, depth, hed, openpose, scribble"):
        parse_launch_options(get_spec("sd-turbo"), {"controlnet": "seg"})
