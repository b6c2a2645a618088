"""Property: whatever a client sends to the image endpoints, the answer is never a 5xx, and every error is in the
documented shape. Fuzzed against the real server: generation parameters in JSON bodies and `kwargs` (JSON
objects and strings, raw JSON that json.dumps cannot write), and multipart bodies with uploads in every mode and
format PIL writes, truncated or not images at all, as images, masks and OCR pages. Bounded to about a minute
here: a few hundred examples, valid ones kept to a few steps at small sizes (see fuzz_helpers)."""

from __future__ import annotations

from typing import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from .fuzz_helpers import as_text, parameters, sizes, texts, to_json, upload

FUZZ = settings(max_examples=300, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
BASE = {"prompt": "a kiln", "size": "64x64", "num_inference_steps": 2, "response_format": "b64_json"}
MODELS = st.sampled_from(["sd15", "flux"])  # UNet with CFG and stride 8; flow matching with stride 16


def assert_answered(response: httpx.Response) -> None:
    """Not a 5xx; an error carries the documented shape; a stream holds no 5xx error event."""
    event(f"HTTP {response.status_code}")  # pytest --hypothesis-show-statistics shows the mix
    assert response.status_code < 500, f"{response.status_code}: {response.text[:2000]}"
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error", "detail"}, body
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        assert body["error"]["message"] == body["detail"] and isinstance(body["detail"], str), body
    elif response.headers["content-type"].startswith("text/event-stream"):
        assert '"type":"server_error"' not in response.text, response.text[-2000:]


@FUZZ
@given(model=MODELS, fields=parameters())
def test_generations(http: httpx.Client, model: str, fields: dict) -> None:
    body = to_json({**BASE, "model": model, **fields}).encode()
    assert_answered(http.post("/v1/images/generations", content=body, headers={"Content-Type": "application/json"}))


@st.composite
def forms(draw: st.DrawFn) -> tuple[str, dict, list]:
    """An image endpoint, its text fields and its file parts (one or two images, maybe a mask)."""
    path, mask_field = draw(st.sampled_from([("/v1/images/variations", None), ("/v1/images/inpainting", "mask_image"),
                                             ("/v1/images/edits", "mask"), ("/v1/images/edits", None)]))
    fields = {**BASE, "model": draw(MODELS), **draw(parameters())}
    size = draw(sizes)
    files = [(draw(st.sampled_from(["image", "image[]"])), ("in", draw(upload(size)), "application/octet-stream"))
             for _ in range(draw(st.sampled_from([1, 1, 1, 2])))]
    if mask_field and draw(st.integers(0, 4)):
        mask_size = size if draw(st.booleans()) else None
        files.append((mask_field, ("mask", draw(upload(mask_size)), "image/png")))
    # Field names go in a part's header, which an HTTP client writes as UTF-8 text: a lone surrogate cannot be
    # sent there (values carry them as raw bytes).
    names = {name: name.encode("utf-8", "surrogatepass").decode("utf-8", "replace") for name in fields}
    return path, {names[name]: as_text(value).encode("utf-8", "surrogatepass") for name, value in fields.items()}, files


@FUZZ
@given(form=forms())
def test_multipart_uploads(http: httpx.Client, form: tuple[str, dict, list]) -> None:
    path, fields, files = form
    assert_answered(http.post(path, data=fields, files=files))


@pytest.fixture(scope="module")
def ocr_model(kiln) -> Iterator[str]:
    assert kiln.http.post("/v1/models", json={"model_name": "PP-OCR", "model_uid": "fuzz-ocr"}).status_code == 200
    yield "fuzz-ocr"
    kiln.http.delete("/v1/models/fuzz-ocr")


ocr_kwargs = st.dictionaries(st.one_of(st.sampled_from(["detail", "pages", "dpi", "ocr_type", "request_id"]), texts),
                             parameters(max_fields=1, nested=False).map(lambda fields: next(iter(fields.values()), 1)),
                             max_size=3)


@FUZZ
@given(page=upload(), kwargs=st.one_of(ocr_kwargs.map(to_json), texts), pdf=st.booleans())
def test_ocr_uploads(http: httpx.Client, ocr_model: str, page: bytes, kwargs: str, pdf: bool) -> None:
    files = {"image": ("page", page, "application/pdf" if pdf else "application/octet-stream")}
    data = {"model": ocr_model, "kwargs": kwargs.encode("utf-8", "surrogatepass")}
    assert_answered(http.post("/v1/images/ocr", data=data, files=files))
