"""LoRA's launch options and request fields, torch-free: Xinference's peft_model_config (body and CLI), vLLM's
slot options, and a request's `lora` / `lora_name` + `lora_scale` in every spelling, with the issue's 400s."""

from __future__ import annotations

import math

import pytest

from kiln.engine.catalogue import get_spec
from kiln.engine.errors import InvalidRequest
from kiln.engine.lora_options import requested
from kiln.engine.options import parse_launch_options
from kiln.engine.schema import Limits, parse_image_request
from kiln.server.cli import build_parser, peft_model_config

SPEC = get_spec("stable-diffusion-v1.5")
LIST = [{"lora_name": "pixel", "local_path": "/loras/pixel.safetensors"},
        {"lora_name": "ink", "local_path": "~/ink", "lora_scale": 0.5}]


def launch(**raw):
    return parse_launch_options(SPEC, raw).lora


def test_xinference_launch_field_and_defaults():
    lora = launch(peft_model_config={"lora_list": LIST, "image_lora_load_kwargs": {"weight_name": "w.safetensors"},
                                     "image_lora_fuse_kwargs": {"lora_scale": 0.8}})
    assert [(s.name, s.scale) for s in lora.loras] == [("pixel", 1.0), ("ink", 0.5)]
    assert lora.loras[1].path.endswith("/ink") and not lora.loras[1].path.startswith("~")
    assert dict(lora.load_kwargs) == {"weight_name": "w.safetensors"}
    assert not lora.per_row and lora.max_lora_rank == 64 and lora.max_loras_per_request == 3
    assert lora.default_selection() == (("pixel", 0.8), ("ink", 0.4))  # entry scale x fuse scale, as diffusers
    assert launch(peft_model_config=None) == launch() and not launch().configured


def test_per_row_options():
    lora = launch(peft_model_config={"lora_list": LIST}, max_loras="4", max_lora_rank=16, lora_default="none")
    assert lora.per_row and lora.max_loras == 4 and lora.host_capacity == 4
    assert lora.default_selection() == ()


@pytest.mark.parametrize(("raw", "words"), [
    ({"peft_model_config": {"lora_list": [{"lora_name": "a/b", "local_path": "x"}]}}, "path separators"),
    ({"peft_model_config": {"lora_list": [{"lora_name": "a", "local_path": "x"}] * 2}}, "twice"),
    ({"peft_model_config": {"lora_list": LIST, "image_lora_fuse_kwargs": {"lora_scale": math.inf}}}, "finite"),
    ({"peft_model_config": {"lora_list": LIST, "image_lora_fuse_kwargs": {"hotswap": True}}}, "cannot honour"),
    ({"peft_model_config": {"lora_list": LIST, "image_lora_load_kwargs": {"adapter_name": "x"}}}, "cannot honour"),
    ({"peft_model_config": {"lora_list": LIST, "image_lora_fuse_kwargs": {"adapter_names": ["nope"]}}}, "nope"),
    ({"peft_model_config": {"loras": []}}, "unknown field"),
    ({"max_loras": -1}, "max_loras"),
    ({"max_loras": 4, "max_cpu_loras": 2}, "at least max_loras"),
    ({"lora_dir": "/definitely/not/here"}, "not a directory"),
    ({"lora_dir": "/tmp"}, "needs per-row mode"),
    ({"peft_model_config": {"lora_list": LIST}, "lora_default": "none"}, "needs per-row mode"),
    ({"lora_default": "some"}, "'all' or 'none'"),
    ({"peft_model_config": {"lora_list": LIST}, "max_loras": 1}, "raise them or set lora_default 'none'"),
])
def test_bad_launch_options_name_the_option(raw, words):
    with pytest.raises(InvalidRequest, match=words):
        launch(**raw)


def test_cli_builds_xinferences_launch_field():
    args, extra = build_parser().parse_known_args([
        "launch", "-n", "stable-diffusion-v1.5", "-lm", "pixel", "/l/pixel.safetensors", "--lora-modules", "ink",
        "/l/ink", "-ld", "weight_name", "w.safetensors", "--image-lora-fuse-kwargs", "lora_scale", "0.5",
        "-fd", "safe_fusing", "True", "--max_loras", "2"])
    assert peft_model_config(args) == {
        "lora_list": [{"lora_name": "pixel", "local_path": "/l/pixel.safetensors"},
                      {"lora_name": "ink", "local_path": "/l/ink"}],
        "image_lora_load_kwargs": {"weight_name": "w.safetensors"},
        "image_lora_fuse_kwargs": {"lora_scale": 0.5, "safe_fusing": True},
    }
    assert extra == ["--max_loras", "2"]
    assert peft_model_config(build_parser().parse_known_args(["launch", "-n", "x"])[0]) is None


def parsed(fields, **kw):
    return parse_image_request(SPEC, {"prompt": "x", **fields}, limits=Limits(), **kw).request.part_inputs.get("lora", {})


@pytest.mark.parametrize(("fields", "selection"), [
    ({"lora": {"name": "pixel", "scale": 0.5}}, (("pixel", 0.5),)),
    ({"lora": [{"name": "pixel"}, {"name": "ink", "scale": -2}]}, (("pixel", 1.0), ("ink", -2.0))),
    ({"lora": []}, ()),
    ({"lora": "pixel"}, (("pixel", 1.0),)),
    ({"lora": '[{"name": "pixel", "scale": "0.25"}]'}, (("pixel", 0.25),)),  # a multipart form's text
    ({"kwargs": '{"lora": [{"name": "ink", "scale": 2}]}'}, (("ink", 2.0),)),  # Xinference's kwargs string
    ({"lora_name": "ink", "lora_scale": "0.7"}, (("ink", 0.7),)),  # Dify's aliases
    ({"lora_name": "ink"}, (("ink", 1.0),)),
    ({}, (("default", 1.0),)),
])
def test_request_lora_spellings(fields, selection):
    assert requested(parsed(fields), (("default", 1.0),)) == selection


@pytest.mark.parametrize(("fields", "words"), [
    ({"lora": {"name": "../etc/passwd"}}, "path separators"),
    ({"lora": {"name": "a\\b"}}, "path separators"),
    ({"lora": {"name": "pixel", "scale": math.nan}}, "finite number between -10 and 10"),
    ({"lora": {"name": "pixel", "scale": math.inf}}, "finite number"),
    ({"lora": {"name": "pixel", "scale": 10.5}}, "between -10 and 10"),
    ({"lora_name": "pixel", "lora_scale": -11}, "lora_scale .*between -10"),
    ({"lora": {"name": "pixel", "weight": 1}}, "unknown field"),
    ({"lora": [{"name": "pixel"}, {"name": "pixel"}]}, "twice"),
    ({"lora": 5}, "objects like"),
    ({"lora": "[not json"}, "lora must be"),
])
def test_bad_request_loras_are_400s(fields, words):
    with pytest.raises(InvalidRequest, match=words):
        requested(parsed(fields), ())


@pytest.mark.parametrize(("fields", "words"), [
    ({"lora": [], "lora_name": "ink"}, "not both"),
    ({"lora_scale": 0.5}, "lora_scale goes with lora_name"),
])
def test_conflicting_aliases(fields, words):
    with pytest.raises(InvalidRequest, match=words):
        requested(parsed(fields), ())
