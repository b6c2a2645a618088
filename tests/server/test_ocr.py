"""`POST /v1/images/ocr` with the default OCR model (PP-OCR, real weights from the rapidocr wheel) over real HTTP:
text rendered with TrueType fonts reads back within the character error rate bound, PDFs page by page, detail
boxes, both clients' wire format, every kind of bad input as a 4xx in the error shape, and concurrency beside
image generation. Engine-level tests drive the OCR runner by hand where a test must choose what shares a step.

CER bound: on the clean renders below (several fonts, sizes, colours, rotations up to 3 degrees, a paragraph)
the aggregate character error rate must be <= 2% and no single render may exceed 5%.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import requests
from PIL import Image

from kiln.engine.catalogue import OCR_CATALOGUE
from kiln.engine.images import NotAnImage
from kiln.engine.errors import InvalidRequest, QueueFull, RequestAborted
from kiln.engine.ocr import (
    OcrRequest, OcrRunner, Segment, group_lines, open_document, parse_ocr_options, parse_ocr_params,
)
from kiln.server.client import Client, KilnError

from .ocr_helpers import CLEAN_RENDERS, build_tiny_got_ocr2, cer, page, pdf, png, render
from .server_helpers import Background, assert_error, metric, png_bytes

OCR_UID = "ocr"
MAX_AGGREGATE_CER = 0.02
MAX_RENDER_CER = 0.05
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ocr_server(kiln) -> Iterator[str]:
    """The session server with PP-OCR launched over HTTP as Xinference's client does; removed afterwards."""
    response = kiln.http.post("/v1/models", json={"model_name": "PP-OCR", "model_type": "image",
                                                  "model_uid": OCR_UID, "model_engine": None, "replica": 1})
    assert response.status_code == 200, response.text
    yield kiln.url
    kiln.http.delete(f"/v1/models/{OCR_UID}")


@pytest.fixture
def ocr_http(ocr_server: str, http: httpx.Client) -> httpx.Client:
    return http


def ocr(http: httpx.Client, data: bytes, kwargs: dict | None = None, *, model: str = OCR_UID,
        content_type: str = "application/octet-stream", **fields: str) -> httpx.Response:
    """One OCR call in Xinference's client's form: text parts `model` and `kwargs` (JSON), file part `image`."""
    form = {"model": model, "kwargs": json.dumps(kwargs or {}), **fields}
    return http.post("/v1/images/ocr", data=form, files={"image": ("image", data, content_type)})


def read(http: httpx.Client, data: bytes, kwargs: dict | None = None, **fields: str):
    response = ocr(http, data, kwargs, **fields)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    return response.json()


# --- reading text ----------------------------------------------------------------------------------------------
def test_launch_describes_an_ocr_model(ocr_http: httpx.Client) -> None:
    description = ocr_http.get(f"/v1/models/{OCR_UID}").json()
    assert description["model_type"] == "image"
    assert description["model_ability"] == ["ocr"]
    assert description["model_family"] == "ocr"
    assert description["model_name"] == "PP-OCR"
    assert description["model_engine"] == "onnxruntime"
    assert description["status"] == "ready"
    assert description["launch_options"]["intra_op_num_threads"] == 1


def test_clean_renders_read_back_within_the_cer_bound(ocr_http: httpx.Client) -> None:
    rates = {}
    for name, spec in CLEAN_RENDERS.items():
        drawn = render(**spec)
        got = read(ocr_http, png(drawn.image))
        assert isinstance(got, str)
        rates[name] = (cer(drawn.text, got), drawn.text, got)
    total = sum(len(text) for _, text, _ in rates.values())
    aggregate = sum(rate * len(text) for rate, text, _ in rates.values()) / total
    report = "\n".join(f"{name}: CER {rate:.3f}: {got!r} (drawn {text!r})" for name, (rate, text, got) in
                       rates.items())
    assert aggregate <= MAX_AGGREGATE_CER, report
    assert all(rate <= MAX_RENDER_CER for rate, _, _ in rates.values()), report


def test_paragraph_lines_come_in_reading_order(ocr_http: httpx.Client) -> None:
    lines = ["First line at the top", "Second line below it", "Third and last line"]
    got = read(ocr_http, png(render("\n".join(lines), "DejaVuSans", 30).image))
    assert got.split("\n") == lines


def test_segments_on_one_line_are_joined_left_to_right(ocr_http: httpx.Client) -> None:
    """Words far apart on one line are separate detections; they read as one line, left before right."""
    image = Image.new("RGB", (1400, 260), "white")
    left, right, below = render("Left words"), render("Right words"), render("Next line")
    image.paste(left.image, (0, 20))
    image.paste(right.image, (900, 26))  # a few pixels lower: still the same line
    image.paste(below.image, (0, 130))
    assert read(ocr_http, png(image)) == "Left words Right words\nNext line"


def test_detail_gives_plausible_line_boxes(ocr_http: httpx.Client) -> None:
    drawn = render("Alpha line one\nBravo line two\nCharlie line three", "DejaVuSans", 36)
    body = read(ocr_http, png(drawn.image), {"detail": True})
    assert set(body) == {"text", "lines"}
    assert body["text"] == "\n".join(line["text"] for line in body["lines"])
    assert [line["text"] for line in body["lines"]] == drawn.text.split("\n")
    width, height = drawn.image.size
    previous_bottom = -1
    for line, (x0, y0, x1, y1) in zip(body["lines"], drawn.line_boxes):
        assert set(line) == {"text", "box", "score"}
        assert 0.5 <= line["score"] <= 1
        box = line["box"]
        assert len(box) == 4 and all(len(point) == 2 for point in box)
        xs, ys = [p[0] for p in box], [p[1] for p in box]
        assert all(0 <= x <= width for x in xs) and all(0 <= y <= height for y in ys)
        assert box[0][0] < box[1][0] and box[3][1] > box[0][1]  # clockwise from top-left
        # the box covers the drawn text and is not much larger than it
        overlap_w = max(0, min(max(xs), x1) - max(min(xs), x0))
        overlap_h = max(0, min(max(ys), y1) - max(min(ys), y0))
        assert overlap_w * overlap_h >= 0.9 * (x1 - x0) * (y1 - y0)
        assert (max(xs) - min(xs)) * (max(ys) - min(ys)) <= 3 * (x1 - x0) * (y1 - y0)
        assert min(ys) > previous_bottom - 5  # top to bottom
        previous_bottom = max(ys)


def test_image_without_text_reads_empty(ocr_http: httpx.Client) -> None:
    assert read(ocr_http, png_bytes((200, 120), (255, 255, 255))) == ""
    assert read(ocr_http, png_bytes((200, 120), (255, 255, 255)), {"detail": True}) == {"text": "", "lines": []}


def test_transparent_jpeg_and_mislabelled_uploads(ocr_http: httpx.Client) -> None:
    drawn = render("Transparent background", "DejaVuSans", 30)
    rgba = drawn.image.convert("RGBA")
    rgba.putalpha(drawn.image.convert("L").point(lambda v: 0 if v > 128 else 255))  # black text, clear ground
    assert read(ocr_http, png(rgba)) == drawn.text
    import io

    buffer = io.BytesIO()
    render("Compressed as JPEG", "DejaVuSerif", 30).image.save(buffer, format="JPEG", quality=85)
    assert read(ocr_http, buffer.getvalue()) == "Compressed as JPEG"
    # image bytes win over a wrong declared content type
    assert read(ocr_http, buffer.getvalue(), content_type="application/pdf") == "Compressed as JPEG"


# --- PDFs ------------------------------------------------------------------------------------------------------
PAGE_TEXTS = ["Page one says hello\nand has two lines", "Page two says goodbye"]


@pytest.fixture(scope="module")
def two_pages() -> bytes:
    return pdf([page(text) for text in PAGE_TEXTS])


def test_pdf_pages_are_joined_with_a_blank_line(ocr_http: httpx.Client, two_pages: bytes) -> None:
    assert two_pages.startswith(b"%PDF")
    got = read(ocr_http, two_pages)
    assert cer("\n\n".join(PAGE_TEXTS), got) <= MAX_AGGREGATE_CER, got
    assert got.count("\n\n") == 1


def test_pdf_detail_is_per_page_at_the_asked_dpi(ocr_http: httpx.Client, two_pages: bytes) -> None:
    body = read(ocr_http, two_pages, {"detail": True, "dpi": 100})
    assert set(body) == {"text", "pages"}
    assert [p["page"] for p in body["pages"]] == [1, 2]
    for item, text in zip(body["pages"], PAGE_TEXTS):
        assert (item["width"], item["height"]) == (850, 1100)  # letter size at 100 dpi
        assert cer(text, item["text"]) <= MAX_AGGREGATE_CER, item["text"]
        assert item["text"] == "\n".join(line["text"] for line in item["lines"])
        for line in item["lines"]:
            assert all(0 <= x <= 850 and 0 <= y <= 1100 for x, y in line["box"])
    assert body["text"] == "\n\n".join(item["text"] for item in body["pages"])
    default = read(ocr_http, two_pages, {"detail": True, "pages": 2})
    assert [(p["page"], p["width"], p["height"]) for p in default["pages"]] == [(2, 1700, 2200)]  # 200 dpi


def test_pdf_pages_choose_and_order(ocr_http: httpx.Client, two_pages: bytes) -> None:
    assert cer(PAGE_TEXTS[1], read(ocr_http, two_pages, {"pages": [2], "dpi": 100})) <= MAX_AGGREGATE_CER
    both = read(ocr_http, two_pages, {"pages": [2, 1], "detail": True, "dpi": 100})
    assert [p["page"] for p in both["pages"]] == [2, 1]
    # by content type alone, and the pages as a top-level text field
    first = read(ocr_http, two_pages, content_type="application/pdf", pages="1", dpi="100")
    assert cer(PAGE_TEXTS[0], first) <= MAX_AGGREGATE_CER


def test_pdf_of_many_blank_pages_reads_chosen_pages_only(ocr_http: httpx.Client) -> None:
    blank = pdf([Image.new("RGB", (20, 20), "white")] * 201, resolution=72)
    error = assert_error(ocr(ocr_http, blank), 400, "201 pages", "200")
    assert error["param"] == "pages"
    assert read(ocr_http, blank, {"pages": [1, 201], "dpi": 72}) == "\n\n"  # two blank pages


# --- clients -----------------------------------------------------------------------------------------------------
def test_kiln_client_ocr(ocr_server: str) -> None:
    drawn = render("Read by the Kiln client", "DejaVuSans", 30)
    with Client(ocr_server) as client:
        handle = client.get_model(OCR_UID)
        assert handle.ocr(png(drawn.image)) == drawn.text
        detail = handle.ocr(png(drawn.image), detail=True)
        assert detail["text"] == drawn.text and len(detail["lines"]) == 1
        with pytest.raises(KilnError) as raised:
            handle.ocr(b"not an image at all")
        assert raised.value.status_code == 415


def test_xinference_client_wire_format(ocr_server: str) -> None:
    """Exactly what xinference-client's RESTfulImageModelHandle.ocr sends, with `requests` as it does."""
    drawn = render("Read by the Xinference client", "DejaVuSerif", 30)
    files = [("model", (None, OCR_UID)), ("kwargs", (None, json.dumps({}))),
             ("image", ("image", png(drawn.image), "application/octet-stream"))]
    response = requests.post(f"{ocr_server}/v1/images/ocr", files=files, timeout=120)
    assert response.status_code == 200, response.text
    assert response.json() == drawn.text


# --- bad input ---------------------------------------------------------------------------------------------------
def test_bad_uploads_are_4xx(ocr_http: httpx.Client) -> None:
    assert_error(ocr(ocr_http, b""), 400, "empty")
    assert_error(ocr(ocr_http, b"hello, this is plain text"), 415, "not a readable image")
    truncated = png(render("Truncated").image)[:200]
    assert_error(ocr(ocr_http, truncated), 415, "not a readable image")
    huge = png_bytes((5000, 4000), 255)  # 20 MP, over the 16.7 MP upload bound, checked before decoding
    assert_error(ocr(ocr_http, huge), 413, "pixels")
    assert_error(ocr(ocr_http, b"%PDF-1.7\nthis is not really a PDF"), 400, "not a readable PDF")
    response = ocr_http.post("/v1/images/ocr", data={"model": OCR_UID})
    assert_error(response, 400, "image is required")
    two = [("image", ("a", png_bytes(), "image/png")), ("image", ("b", png_bytes(), "image/png"))]
    assert_error(ocr_http.post("/v1/images/ocr", data={"model": OCR_UID}, files=two), 400, "one file")
    assert_error(ocr_http.post("/v1/images/ocr", json={"model": OCR_UID}), 415, "multipart")


@pytest.mark.parametrize(("kwargs", "status", "words", "param"), [
    ({"pages": [3]}, 400, ["[3]", "1 to 2"], "pages"),
    ({"pages": 0}, 400, ["1-based"], "pages"),
    ({"pages": "abc"}, 400, ["page number"], "pages"),
    ({"pages": []}, 400, ["empty"], "pages"),
    ({"dpi": 601}, 400, ["between 50 and 600"], "dpi"),
    ({"dpi": 10}, 400, ["between 50 and 600"], "dpi"),
    ({"dpi": "high"}, 400, ["integer"], "dpi"),
    ({"detail": "maybe"}, 400, ["true or false"], "detail"),
    ({"colour": "red", "lang": "en"}, 400, ["'colour'", "'lang'", "accepted"], "colour"),
    ({"ocr_type": "format"}, 400, ["plain text", "GOT-OCR2_0"], "ocr_type"),
])
def test_bad_parameters_are_400_naming_them(ocr_http: httpx.Client, two_pages: bytes, kwargs, status, words,
                                            param) -> None:
    error = assert_error(ocr(ocr_http, two_pages, kwargs), status, *words)
    assert error["param"] == param


def test_more_bad_requests(ocr_http: httpx.Client, two_pages: bytes) -> None:
    image = png(render("Some text").image)
    assert_error(ocr(ocr_http, image, {"pages": [1]}), 400, "PDF uploads only")
    assert_error(ocr(ocr_http, image, {"dpi": 100}), 400, "PDF uploads only")
    response = ocr_http.post("/v1/images/ocr", data={"model": OCR_UID, "kwargs": "{not json"},
                             files={"image": ("image", image, "image/png")})
    assert_error(response, 400, "kwargs", "JSON")
    response = ocr_http.post("/v1/images/ocr", data={"model": OCR_UID, "kwargs": "[1, 2]"},
                             files={"image": ("image", image, "image/png")})
    assert_error(response, 400, "kwargs must be a JSON object")
    assert_error(ocr(ocr_http, image, model="ghost"), 404, "ghost")
    assert_error(ocr(ocr_http, image, model="sd"), 400, "cannot do ocr")
    giant = pdf([Image.new("RGB", (2000, 2000), "white")], resolution=20)  # a 100 x 100 inch page
    assert_error(ocr(ocr_http, giant), 400, "pixels", "lower dpi")  # 20000 x 20000 px at 200 dpi
    assert read(ocr_http, giant, {"dpi": 50}) == ""  # 5000 x 5000 px: within the bound


def test_bad_launches_are_400(http: httpx.Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert_error(http.post("/v1/models", json={"model_name": "PP-OCR", "model_uid": "x1", "torch_dtype": "float16"}),
                 400, "torch_dtype", "intra_op_num_threads")
    assert_error(http.post("/v1/models", json={"model_name": "PP-OCR", "model_uid": "x2", "tiny": True}),
                 400, "no tiny checkpoint")
    assert_error(http.post("/v1/models", json={"model_name": "PP-OCR", "model_uid": "x3", "model_engine": "vllm"}),
                 400, "model_engine", "onnxruntime")
    assert_error(http.post("/v1/models", json={"model_name": "PP-OCR", "model_uid": "x4",
                                               "model_path": str(tmp_path)}), 400, "no *det*.onnx")
    # GOT-OCR2 without weights: a clear load error, and the uid is not left behind
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    error = assert_error(http.post("/v1/models", json={"model_name": "GOT-OCR2_0", "model_uid": "got"}), 400,
                         "GOT-OCR2_0", "Hugging Face cache", "model_path", "does not download")
    assert error["code"] == "model_load_failed"
    assert_error(http.post("/v1/models", json={"model_name": "GOT-OCR2_0", "model_uid": "got2",
                                               "model_path": str(tmp_path)}), 400, "no config.json")
    assert {item["id"] for item in http.get("/v1/models").json()["data"]}.isdisjoint({"x1", "x2", "x3", "x4",
                                                                                        "got", "got2"})


def test_got_ocr2_native_layout_loads_and_reads(http: httpx.Client, tmp_path: Path, two_pages: bytes) -> None:
    """GOT-OCR2 from a tiny random-weight checkpoint in the -hf layout, launched and called over HTTP: the real
    loader, per-request options and the batched generate/decode run (the text itself is meaningless). The real
    weights and the original remote-code checkpoint are not exercised (no weights offline, no GPU)."""
    checkpoint = build_tiny_got_ocr2(tmp_path / "tiny-got")
    body = {"model_name": "GOT-OCR2_0", "model_uid": "tiny-got", "model_path": str(checkpoint),
            "model_engine": "transformers", "max_new_tokens": 4, "max_batch_size": 2, "device": "cpu"}
    response = http.post("/v1/models", json=body)
    assert response.status_code == 200, response.text
    try:
        description = http.get("/v1/models/tiny-got").json()
        assert (description["model_engine"], description["model_family"]) == ("transformers", "ocr")
        image = png(render("Anything").image)
        for kwargs in ({}, {"ocr_type": "format"}, {"ocr_box": [0, 0, 40, 30], "ocr_color": "red"}):
            assert isinstance(read(http, image, kwargs, model="tiny-got"), str)
        assert read(http, two_pages, {"dpi": 50}, model="tiny-got").count("\n\n") >= 1  # two pages, joined
        assert_error(ocr(http, image, {"detail": True}, model="tiny-got"), 400, "detail", "PP-OCR")
        assert_error(ocr(http, image, {"ocr_color": "purple"}, model="tiny-got"), 400, "ocr_color")
        assert_error(ocr(http, image, {"ocr_box": [5, 5, 1, 1]}, model="tiny-got"), 400, "ocr_box")
        assert metric(http, "kiln_images_generated_total", "tiny-got") == 5  # pages through generate
        assert metric(http, "kiln_forward_seconds_total", "tiny-got") > 0
    finally:
        http.delete("/v1/models/tiny-got")


# --- concurrency -------------------------------------------------------------------------------------------------
def test_sixteen_concurrent_requests_beside_image_generation(ocr_server: str, ocr_http: httpx.Client) -> None:
    renders = [render(**spec) for spec in CLEAN_RENDERS.values()]
    cases = [renders[index % len(renders)] for index in range(16)]
    generation = Background(lambda: httpx.post(
        f"{ocr_server}/v1/images/generations", timeout=300,
        json={"model": "sd", "prompt": "beside OCR", "size": "64x64", "num_inference_steps": 30,
              "response_format": "b64_json", "seed": 3},
    ))

    def call(drawn) -> str:
        with httpx.Client(base_url=ocr_server, timeout=300) as client:
            return read(client, png(drawn.image))

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, cases))
    for drawn, got in zip(cases, results):
        assert cer(drawn.text, got) <= MAX_RENDER_CER, (drawn.text, got)
    image = generation.join()
    assert image.status_code == 200, image.text
    assert image.json()["data"][0]["seed"] == 3
    metrics = ocr_http.get("/metrics").text
    assert f'kiln_images_generated_total{{model="{OCR_UID}"}}' in metrics
    assert f'kiln_queue_depth{{model="{OCR_UID}"}} 0' in metrics


# --- the runner, driven by hand ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def manual_runner() -> Iterator[OcrRunner]:
    """A PP-OCR runner without its thread: `iterate()` runs one step on the test's thread."""
    spec = OCR_CATALOGUE["PP-OCR"]
    runner = OcrRunner("manual", spec, parse_ocr_options(spec, {"max_batch_size": 8, "max_queue_size": 6}))
    runner.load(start=False)
    yield runner
    runner.close()


def test_recognition_batches_crops_across_requests(manual_runner: OcrRunner) -> None:
    spec = manual_runner.spec
    drawn = render("Batched with its neighbours", "DejaVuSans", 30)
    handles = [manual_runner.submit(OcrRequest(open_document(png(drawn.image)), parse_ocr_params(spec, {})))
               for _ in range(4)]
    assert manual_runner.queue_depth == 4
    before = manual_runner.counters.forward_rows.copy()
    manual_runner.iterate()  # one step takes all four
    assert all(handle.future.done() for handle in handles)
    assert [handle.result() for handle in handles] == [drawn.text] * 4
    assert manual_runner.counters.forward_rows - before == {4: 1}  # one recognition forward of four requests' crops
    assert manual_runner.queue_depth == 0


def test_queue_bound_abort_and_progress(manual_runner: OcrRunner, two_pages: bytes) -> None:
    spec = manual_runner.spec
    handles = [manual_runner.submit(OcrRequest(open_document(two_pages, dpi=100), parse_ocr_params(spec, {})))
               for _ in range(6)]
    with pytest.raises(QueueFull):
        manual_runner.submit(OcrRequest(open_document(two_pages, dpi=100)))
    assert manual_runner.abort(handles[0].request.request_id) == "DONE"
    assert manual_runner.abort(handles[0].request.request_id) == "NO_OP"
    assert manual_runner.abort("never-sent") == "NOT_FOUND"
    with pytest.raises(RequestAborted):
        handles[0].result(0)
    while any(not handle.future.done() for handle in handles):
        manual_runner.iterate()
        progress = [handle.progress for handle in handles[1:]]
        assert all(value in (0.5, 1.0) for value in progress)  # two pages: half done, then done
    for handle in handles[1:]:
        assert cer("\n\n".join(PAGE_TEXTS), handle.result(0)) <= MAX_AGGREGATE_CER


def test_a_failing_page_fails_only_its_own_request(manual_runner: OcrRunner) -> None:
    spec = manual_runner.spec
    good = manual_runner.submit(OcrRequest(open_document(png(render("Still fine").image)), parse_ocr_params(spec, {})))
    bad_document = open_document(png(render("Broken").image))
    bad_document.render = lambda index: (_ for _ in ()).throw(OSError("disk on fire"))  # type: ignore[method-assign]
    bad = manual_runner.submit(OcrRequest(bad_document))
    manual_runner.iterate()
    assert good.result(0) == "Still fine"
    with pytest.raises(Exception, match="disk on fire"):
        bad.result(0)


# --- pure pieces -------------------------------------------------------------------------------------------------
def _segment(text: str, x: float, y: float, width: float, height: float = 30, slope: float = 0.0) -> Segment:
    dy = slope * width
    return Segment(text, 0.9, ((x, y), (x + width, y + dy), (x + width, y + dy + height), (x, y + height)))


def test_group_lines_follows_a_rotated_page() -> None:
    """On a page tilted by 3 degrees, each line's right end is lower than the next line's left end; grouping
    along the text's slope still keeps lines apart and in order."""
    slope = 0.0524  # tan(3 degrees)
    segments = [_segment(f"line{i}", 10, 10 + 45 * i, 900, slope=slope) for i in range(4)]
    segments.append(_segment("tail", 950, 10 + 45 * 1 + slope * 940, 80, slope=slope))  # after line1, same line
    lines = group_lines(list(reversed(segments)))
    assert [[s.text for s in line] for line in lines] == [["line0"], ["line1", "tail"], ["line2"], ["line3"]]


def test_document_refusals_without_http() -> None:
    with pytest.raises(InvalidRequest, match="empty"):
        open_document(b"")
    with pytest.raises(NotAnImage):
        open_document(b"GIF89a-but-not-really")
    with pytest.raises(InvalidRequest, match="between 50 and 600"):
        open_document(pdf([page("x")]), dpi=700)


# --- offline -----------------------------------------------------------------------------------------------------
OFFLINE_SCRIPT = """
import json, socket, sys
def refuse(*args, **kwargs):
    raise OSError("network disabled by the test")
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.create_connection = refuse
socket.getaddrinfo = refuse
import rapidocr.utils.download_file as download
download.DownloadFile.run = classmethod(lambda cls, *a, **k: sys.exit("rapidocr tried to download " + repr(a)))
from kiln.engine.catalogue import OCR_CATALOGUE
from kiln.engine.ocr import OcrRequest, OcrRunner, open_document, parse_ocr_options
spec = OCR_CATALOGUE["PP-OCR"]
runner = OcrRunner("offline", spec, parse_ocr_options(spec, {}))
runner.load()
print(json.dumps(runner.submit(OcrRequest(open_document(sys.stdin.buffer.read()))).result(120)))
runner.close()
"""


def test_pp_ocr_loads_and_reads_with_the_network_disabled(tmp_path: Path) -> None:
    """In a fresh process whose sockets refuse to connect, with a fresh HOME and an empty cache: nothing is
    fetched; the weights come from the rapidocr wheel."""
    drawn = render("Offline and fine", "DejaVuSans", 30)
    env = {**os.environ, "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT], input=png(drawn.image), capture_output=True,
                          cwd=REPO, env=env, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert json.loads(done.stdout.decode().strip().splitlines()[-1]) == drawn.text
    assert not list(tmp_path.rglob("*.onnx"))  # nothing was fetched into HOME or a cache
