"""`kiln launch` turns extra `--key value` pairs into launch options exactly as Xinference's CLI does."""

from __future__ import annotations

import pytest

from kiln.server.cli import build_parser, coerce_option, parse_extra_options


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("None", None),
        ("True", True),
        ("true", True),
        ("False", False),
        ("false", False),
        ("TRUE", "TRUE"),  # Xinference only knows these two spellings
        ("none", "none"),
        ("42", 42),
        ("-1", -1),
        ("3.5", 3.5),
        ("1e-3", 0.001),
        ("text_encoder_2", "text_encoder_2"),
        ("4steps-V1.0", "4steps-V1.0"),
        ('{"mode": 3, "sizes": [1, 2]}', {"mode": 3, "sizes": [1, 2]}),
        ("[1, 2, 4]", [1, 2, 4]),
        ("[not json", "[not json"),
        ("", ""),
    ],
)
def test_coerce_option(text: str, value: object) -> None:
    coerced = coerce_option(text)
    assert coerced == value
    assert type(coerced) is type(value)


def test_extra_options_accept_both_spellings_and_equals() -> None:
    options = parse_extra_options(
        ["--cpu-offload", "True", "--quantize_text_encoder", "text_encoder_2", "--text_encoder_3", "None",
         "--max_batch_size=4", "--seed", "-1"]
    )
    assert options == {
        "cpu_offload": True,
        "quantize_text_encoder": "text_encoder_2",
        "text_encoder_3": None,
        "max_batch_size": 4,
        "seed": -1,
    }


@pytest.mark.parametrize("args", [["cpu_offload", "True"], ["--cpu_offload"], ["-x", "1"], ["--", "1"]])
def test_extra_options_reject_malformed_pairs(args: list[str]) -> None:
    with pytest.raises(ValueError):
        parse_extra_options(args)


def test_launch_keeps_named_flags_out_of_the_options() -> None:
    """Named flags in either spelling land on their own attributes; unknown ones (even prefixes) become options."""
    args, extra = build_parser().parse_known_args(
        ["launch", "--model_name", "sd-turbo", "-t", "image", "--model-uid", "u1", "--model", "x", "--tiny", "True"]
    )
    assert (args.model_name, args.model_type, args.model_uid) == ("sd-turbo", "image", "u1")
    assert parse_extra_options(extra) == {"model": "x", "tiny": True}
