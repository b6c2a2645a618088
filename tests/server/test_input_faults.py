"""Every class of input an independent fuzzer turned into a 500 is a 4xx in the error shape, handled where the
whole class is: one strict JSON reader (`engine.textinput`) for request bodies, launch bodies and JSON text
fields (lone surrogates, numbers past the int-string limit or past float range, deep nesting, NaN); one decimal
parser for numeric text fields; one upload decoder (modes with no conversion to RGB or L); the OCR detector's
resize (very thin pages); launch mistakes the user can fix, also when the load failed in the background."""

from __future__ import annotations

import io
import json

import httpx
import pytest
import torch
from PIL import Image

from .ocr_helpers import render
from .server_helpers import assert_error, png_bytes, wait_until

GOOD = {"model": "sd15", "prompt": "a barn", "size": "64x64", "num_inference_steps": 2, "response_format": "b64_json"}
DIGITS = "7" * 5000  # past Python's int-string conversion limit (4300 digits)
DEEP = "[" * 100_000 + "]" * 100_000

# Raw JSON texts (bytes), each one member of a fault class, and a word the message must contain.
BAD_JSON = {
    "surrogate key": (b'{"\\ud800": 1}', "surrogate"),
    "surrogate in a string": (b'{"prompt": "a \\udfff barn"}', "surrogate"),
    "raw CESU-8 surrogate bytes": (b'{"prompt": "a \xed\xa0\x80 barn"}', "surrogate"),
    "integer past the conversion limit": (b'{"n": ' + DIGITS.encode() + b"}", "4300 digits"),
    "float past float range": (b'{"guidance_scale": 1e999}', "finite"),
    "NaN": (b'{"guidance_scale": NaN}', "NaN"),
    "nesting past the recursion limit": (b'{"prompt": ' + DEEP.encode() + b"}", "nested"),
    "nesting past 64 levels": (b'{"prompt": ' + b"[" * 65 + b"]" * 65 + b"}", "nested"),
}


def _json_body(fields: bytes) -> bytes:
    """GOOD with `fields` (a JSON object text) merged in, as raw bytes (json.dumps cannot write the faults)."""
    return json.dumps(GOOD)[:-1].encode() + b", " + fields[1:]


@pytest.mark.parametrize("case", BAD_JSON)
def test_generation_bodies(http: httpx.Client, case: str) -> None:
    text, word = BAD_JSON[case]
    response = http.post("/v1/images/generations", content=_json_body(text),
                         headers={"Content-Type": "application/json"})
    assert_error(response, 400, "not valid JSON", word)


@pytest.mark.parametrize("case", [case for case, (text, _) in BAD_JSON.items() if text.isascii()])
def test_kwargs_strings(http: httpx.Client, case: str) -> None:
    """`kwargs` as a JSON string inside a JSON body and as a multipart text field (OCR's too)."""
    text, word = BAD_JSON[case]
    kwargs = text.decode()
    error = assert_error(http.post("/v1/images/generations", json={**GOOD, "kwargs": kwargs}), 400, "kwargs", word)
    assert error["param"] == "kwargs"
    form = http.post("/v1/images/variations", data={"model": "sd15", "kwargs": kwargs},
                     files={"image": ("in.png", png_bytes(), "image/png")})
    assert assert_error(form, 400, "kwargs", word)["param"] == "kwargs"


@pytest.mark.parametrize("case", BAD_JSON)
def test_launch_bodies(http: httpx.Client, case: str) -> None:
    text, word = BAD_JSON[case]
    body = b'{"model_name": "sd-turbo", "model_uid": "fuzzed", "tiny": true, ' + text[1:]
    assert_error(http.post("/v1/models", content=body), 400, "not valid JSON", word)
    assert_error(http.get("/v1/models/fuzzed"), 404, "fuzzed")


@pytest.mark.parametrize(("field", "value"), [("n", DIGITS), ("num_inference_steps", "-" + DIGITS),
                                              ("size", f"{DIGITS}x64"), ("seed", f"[{DIGITS}]")])
def test_numeric_text_fields_past_the_conversion_limit(http: httpx.Client, field: str, value: str) -> None:
    response = http.post("/v1/images/variations", data={"model": "sd15", field: value},
                         files={"image": ("in.png", png_bytes(), "image/png")})
    assert assert_error(response, 400)["param"] == field


def test_launch_option_text_past_the_conversion_limit(http: httpx.Client) -> None:
    body = {"model_name": "sd-turbo", "model_uid": "fuzzed", "tiny": True, "max_batch_size": DIGITS}
    assert_error(http.post("/v1/models", json=body), 400, "max_batch_size")


def _lab_tiff() -> bytes:
    buffer = io.BytesIO()
    Image.new("LAB", (64, 64), (50, 0, 0)).save(buffer, format="TIFF")
    return buffer.getvalue()


@pytest.mark.parametrize(("path", "mask_field"), [("/v1/images/inpainting", "mask_image"), ("/v1/images/edits", "mask")])
def test_a_mask_with_no_conversion_to_greyscale(http: httpx.Client, path: str, mask_field: str) -> None:
    files = {"image": ("in.png", png_bytes(), "image/png"), mask_field: ("m.tif", _lab_tiff(), "image/tiff")}
    error = assert_error(http.post(path, data={"model": "sd15", "prompt": "x"}, files=files), 415, "LAB", "convert")
    assert error["param"] == mask_field


@pytest.fixture(scope="module")
def ocr_model(kiln) -> str:
    response = kiln.http.post("/v1/models", json={"model_name": "PP-OCR", "model_uid": "ocr-faults"})
    assert response.status_code == 200, response.text
    yield "ocr-faults"
    kiln.http.delete("/v1/models/ocr-faults")


@pytest.mark.parametrize("size", [(2, 4000), (4000, 2), (1, 16_000)])
def test_ocr_of_very_thin_pages(http: httpx.Client, ocr_model: str, size: tuple[int, int]) -> None:
    response = http.post("/v1/images/ocr", data={"model": ocr_model},
                         files={"image": ("thin.png", png_bytes(size, (255, 255, 255)), "image/png")})
    assert response.status_code == 200, response.text
    assert response.json() == ""


def test_ocr_of_a_thin_page_reads_its_text_where_it_is(http: httpx.Client, ocr_model: str) -> None:
    """Past the aspect bound (62.5) a page is scaled and padded before detection; the box still maps back onto the
    text. (The page is thin enough to take that path but not so thin that its text becomes illegible.)"""
    line = render("KILN 2026", size=48).image  # 342 x 144
    strip = Image.new("RGB", (line.height, line.height * 70), (255, 255, 255))  # 144 x 10080
    strip.paste(line.rotate(90, expand=True), (0, 9000))
    buffer = io.BytesIO()
    strip.save(buffer, format="PNG")
    response = http.post("/v1/images/ocr", data={"model": ocr_model, "kwargs": '{"detail": true}'},
                         files={"image": ("strip.png", buffer.getvalue(), "image/png")})
    assert response.status_code == 200, response.text
    (found,) = response.json()["lines"]
    assert found["text"] == "KILN 2026"
    xs, ys = [x for x, _ in found["box"]], [y for _, y in found["box"]]
    assert 0 <= min(xs) and max(xs) <= line.height and 9000 - 20 <= min(ys) and max(ys) <= 9000 + line.width + 20


@pytest.mark.parametrize(("options", "words"), [
    ({"model_path": "/nonexistent/checkpoint"}, ["/nonexistent/checkpoint", "model_index.json"]),
    pytest.param({"tiny": True, "cpu_offload": True}, ["cpu_offload", "GPU"],
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="cpu_offload loads with a GPU")),
])
def test_a_load_that_failed_in_the_background_is_the_users_400(http: httpx.Client, options: dict,
                                                                words: list[str]) -> None:
    """wait_ready=false (as `kiln serve --launch` and `kiln launch` start models): the later request gets the
    launch's own 400, not a 500."""
    body = {"model_name": "sd-turbo", "model_uid": "later", **options}

    def generate() -> httpx.Response:
        return http.post("/v1/images/generations", json={**GOOD, "model": "later"})

    assert http.post("/v1/models?wait_ready=false", json=body).status_code == 200
    try:
        wait_until(lambda: generate().status_code != 503, "the load to fail")
        error = assert_error(generate(), 400, "later", "failed to load", *words)
        assert error["code"] == "model_load_failed"
    finally:
        http.delete("/v1/models/later")
