"""What a launch's parts decide before any weights load: the backends the launch may use."""

from kiln.engine.catalogue import get_spec
from kiln.engine.options import parse_launch_options
from kiln.engine.parts import unsupported_backends


def test_a_part_that_runs_on_some_backends_rules_out_the_others_with_a_reason() -> None:
    spec = get_spec("stable-diffusion-v1.5")
    refused = unsupported_backends(spec, parse_launch_options(spec, {"tiny": True, "controlnet": "canny"}))
    assert set(refused) == {"onnx", "openvino", "tensorrt"}
    assert refused["onnx"] == "controlnet runs on compile or eager"
    assert unsupported_backends(spec, parse_launch_options(spec, {"tiny": True})) == {}
