"""ControlNet in the browser against a real server: launched from the Models panel, its section appears on the
Generate form, a unit changes the image against the same seed without it (text to image as JSON, image to image
as multipart with the control image as a file), and a bad control image shows the server's message."""

from __future__ import annotations

import base64

from PIL import Image, ImageDraw
from playwright.sync_api import expect

from .browser_helpers import (
    fill_generate, final_images, max_diff, open_playground, png, screenshot, shown_image, upload,
)
from .test_images import INPUT, SentForms

UID = "ui-canny"


def _edges() -> Image.Image:
    """A photo-like control image for canny: a light square on a dark ground."""
    image = Image.new("RGB", (64, 64), (20, 20, 20))
    ImageDraw.Draw(image).rectangle((16, 16, 47, 47), fill=(230, 230, 230))
    return image


def _generate(page) -> Image.Image:
    before = final_images(page).count()
    page.get_by_role("button", name="Generate").click()
    expect(final_images(page)).to_have_count(before + 1)
    return shown_image(page, final_images(page).first)


def test_a_controlnet_launched_from_the_models_panel_guides_the_image(page, ui_server) -> None:
    open_playground(page, ui_server.url)
    section = page.get_by_role("group", name="ControlNet", exact=True)
    expect(section).to_be_hidden()  # sd-turbo, launched without ControlNet
    models = page.get_by_role("region", name="Models")
    models.get_by_label("Catalogue model").select_option("stable-diffusion-v1.5")
    models.get_by_role("group", name="ControlNets to launch with").get_by_label("canny", exact=True).check()
    models.get_by_label("Model uid").fill(UID)
    models.get_by_role("button", name="Launch").click()
    expect(models.locator(f'tr[data-uid="{UID}"] .status')).to_have_text("ready")
    try:
        assert [c["model_name"] for c in ui_server.http.get(f"/v1/models/{UID}").json()["controlnet"]] == ["canny"]
        _use_the_controlnet(page, section, ui_server.http)
    finally:
        assert ui_server.http.delete(f"/v1/models/{UID}").status_code == 200


def _use_the_controlnet(page, section, http) -> None:
    fill_generate(page, model=UID, prompt="a house", steps=4, previews=0)
    page.get_by_label("Seed", exact=True).fill("11")
    expect(section).to_be_visible()
    plain = _generate(page)

    unit = section.get_by_role("group", name="ControlNet unit 1")
    unit.get_by_label("ControlNet", exact=True).select_option("canny")
    unit.get_by_label("Control image").set_input_files(upload("square.png", _edges()))
    unit.get_by_label("Scale").fill("1.5")
    unit.get_by_label("Preprocess: canny").check()
    unit.get_by_label("Low").fill("50")
    # A second unit by keyboard, left at "none": it is not sent.
    section.get_by_role("button", name="Add ControlNet unit").press("Enter")
    second = section.get_by_role("group", name="ControlNet unit 2")
    expect(second.get_by_label("ControlNet", exact=True)).to_be_focused()
    with page.expect_request(lambda sent: sent.url.endswith("/v1/images/generations")) as sent:
        guided = _generate(page)
    (controlnet,) = sent.value.post_data_json["controlnet"]
    assert base64.b64decode(controlnet.pop("image").split(",", 1)[1]) == png(_edges())
    assert controlnet == {"name": "canny", "scale": 1.5, "start": 0, "end": 1, "guess_mode": False,
                          "preprocess": "canny", "low": 50, "high": 200}
    assert max_diff(plain, guided) > 8
    expect(page.get_by_role("region", name="Results").get_by_role("listitem").first).to_contain_text(
        "ControlNet canny scale 1.5")
    screenshot(page, "controlnet")

    # The same unit in image to image: multipart, the control image as a `control_image` file.
    page.get_by_label("Image to image", exact=True).check()
    page.get_by_label("Input image").set_input_files(upload("red.png", INPUT))
    page.get_by_label("Strength").fill("0.6")
    forms = SentForms(page)
    guided = _generate(page)
    assert forms.files("/v1/images/variations")["control_image"] == png(_edges())
    section.get_by_role("group", name="ControlNet unit 1").get_by_label("ControlNet", exact=True).select_option("")
    assert max_diff(_generate(page), guided) > 8

    # An undecodable control image reaches the server, which refuses it: its message shows in the error area.
    bad = {"name": "canny", "image": base64.b64encode(b"not an image").decode()}
    message = http.post("/v1/images/generations", json={"model": UID, "prompt": "x", "controlnet": [bad]}).json()
    page.get_by_label("Text to image", exact=True).check()
    unit.get_by_label("ControlNet", exact=True).select_option("canny")
    unit.get_by_label("Control image").set_input_files({"name": "bad.png", "mimeType": "image/png",
                                                        "buffer": b"not an image"})
    page.get_by_role("button", name="Generate").click()
    alert = page.get_by_role("alert")
    expect(alert).to_contain_text(message["error"]["message"])
    expect(alert).to_contain_text("(HTTP 415, not_an_image)")
