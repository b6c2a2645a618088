"""Uploads in the browser against a real server: image to image, inpainting with a mask drawn with the mouse (the
mask the page sends is read off the wire), and OCR of rendered text with its boxes drawn over the image."""

from __future__ import annotations

import base64
import io
from email.parser import BytesParser
from email.policy import HTTP

import numpy as np
from PIL import Image
from playwright.sync_api import expect

from tests.server.ocr_helpers import render

from .browser_helpers import fill_generate, final_images, open_playground, results, screenshot, upload

INPUT = Image.new("RGB", (64, 64), (200, 40, 40))


class SentForms:
    """The multipart bodies the page sends, read through Chrome's DevTools protocol (Playwright's request
    objects leave out bodies that carry blobs)."""

    def __init__(self, page):
        self.cdp = page.context.new_cdp_session(page)
        self.cdp.send("Network.enable", {"maxPostDataSize": 16 * 1024 * 1024})
        self.sent: list[tuple[str, str, str]] = []  # (request id, url, content type)
        self.cdp.on("Network.requestWillBeSent", self._record)

    def _record(self, event: dict) -> None:
        request = event["request"]
        if request["method"] == "POST":
            headers = {name.lower(): value for name, value in request["headers"].items()}
            self.sent.append((event["requestId"], request["url"], headers.get("content-type", "")))

    def files(self, path: str) -> dict[str, bytes]:
        """The file parts of the last form posted to `path`, by field name."""
        request_id, _, content_type = [sent for sent in self.sent if sent[1].endswith(path)][-1]
        answer = self.cdp.send("Network.getRequestPostData", {"requestId": request_id})
        data = answer["postData"]
        body = base64.b64decode(data) if answer.get("base64Encoded", True) else data.encode("latin-1")
        message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
        return {part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
                for part in message.iter_parts() if part.get_filename()}


def test_image_to_image(page, ui_server) -> None:
    open_playground(page, ui_server.url)
    fill_generate(page, model="sd15", mode="Image to image", prompt="the same, in blue", size="", steps=4)
    expect(page.get_by_label("Size", exact=True)).to_have_attribute("placeholder", "the input's size")
    page.get_by_label("Input image").set_input_files(upload("red.png", INPUT))
    page.get_by_label("Strength").fill("0.5")
    sent = SentForms(page)
    page.get_by_role("button", name="Generate").click()
    expect(final_images(page)).to_have_count(1)
    assert sent.files("/v1/images/variations")["image"] == upload("red.png", INPUT)["buffer"]
    expect(results(page).get_by_role("listitem").first).to_contain_text("image to image · default size · 4 steps")
    expect(results(page).get_by_role("listitem").first).to_contain_text("strength 0.5")
    screenshot(page, "image-to-image")


def test_inpainting_with_a_mask_drawn_with_the_mouse(page, ui_server) -> None:
    open_playground(page, ui_server.url)
    fill_generate(page, model="sd15", mode="Inpainting", prompt="a window", size="", steps=4)
    page.get_by_label("Input image").set_input_files(upload("red.png", INPUT))
    canvas = page.get_by_label("Mask: drag the mouse over the parts to repaint")
    expect(canvas).to_have_attribute("width", "64")
    box = canvas.bounding_box()
    # One stroke across the left third of the image, at mid height.
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] * 0.1, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.3, y, steps=8)
    page.mouse.up()
    sent = SentForms(page)
    page.get_by_role("button", name="Generate").click()
    expect(final_images(page)).to_have_count(1)
    mask = np.asarray(Image.open(io.BytesIO(sent.files("/v1/images/inpainting")["mask_image"])).convert("L"))
    assert mask.shape == (64, 64)
    assert mask[32, 10:19].min() == 255, mask[32]  # painted: repaint
    assert mask[:, 40:].max() == 0 and mask[:10].max() == 0  # untouched: keep
    expect(results(page).get_by_role("listitem").first).to_contain_text("inpainting")
    screenshot(page, "inpainting")


def test_ocr_shows_the_text_and_its_boxes(page, ui_server) -> None:
    drawn = render("KILN PLAYGROUND\nhello 2026", size=40)
    open_playground(page, ui_server.url)
    ocr = page.get_by_role("region", name="OCR")
    expect(ocr.get_by_label("OCR model")).to_have_value("PP-OCR")
    ocr.get_by_label("Image to read").set_input_files(upload("text.png", drawn.image))
    ocr.get_by_role("button", name="Read text").click()
    text = ocr.get_by_label("Recognised text")
    expect(text).to_have_text("KILN PLAYGROUND\nhello 2026")
    boxes = ocr.locator("#ocr-boxes polygon")
    expect(boxes).to_have_count(2)
    expect(ocr.get_by_label("Lines").get_by_role("listitem").first).to_contain_text("KILN PLAYGROUND score")
    # Each box lies around its line as drawn (in image pixels, the SVG's viewBox).
    expect(ocr.locator("#ocr-boxes")).to_have_attribute("viewBox", f"0 0 {drawn.image.width} {drawn.image.height}")
    for polygon, (left, top, right, bottom) in zip(boxes.all(), drawn.line_boxes):
        xs, ys = zip(*(map(float, point.split(",")) for point in polygon.get_attribute("points").split()))
        assert min(xs) <= left + 8 and max(xs) >= right - 8 and min(ys) <= top + 8 and max(ys) >= bottom - 8
    screenshot(page, "ocr")
