"""LoRA in the browser against a real server: launched from the Models panel with per-row slots, a LoRA file and
a LoRA folder (a LoRA file without its path shows the server's message), the Generate form lists the registered
LoRAs with the launch default picked; a LoRA at scale 1 changes the image against none (in JSON and multipart
requests), at scale 0 it gives the plain image, and the stack stops at the model's bound."""

from __future__ import annotations

from playwright.sync_api import expect

from .browser_helpers import (
    fill_generate, final_images, max_diff, open_playground, screenshot, shown_image, upload,
)
from .test_images import INPUT

UID = "ui-lora"
MODEL = "stable-diffusion-v1.5"


def _generate(page):
    """Generate; the image shown and the `lora` field the page sent (JSON body)."""
    before = final_images(page).count()
    with page.expect_request(lambda sent: sent.url.endswith("/v1/images/generations")) as sent:
        page.get_by_role("button", name="Generate").click()
    expect(final_images(page)).to_have_count(before + 1)
    return shown_image(page, final_images(page).first), sent.value.post_data_json.get("lora")


def _generate_multipart(page):
    before = final_images(page).count()
    page.get_by_role("button", name="Generate").click()
    expect(final_images(page)).to_have_count(before + 1)
    return shown_image(page, final_images(page).first)


def test_loras_launched_from_the_models_panel_change_the_image_per_request(page, ui_server, tiny_lora_dir) -> None:
    folder = tiny_lora_dir(MODEL)
    open_playground(page, ui_server.url)
    models = page.get_by_role("region", name="Models")
    models.get_by_label("Catalogue model").select_option(MODEL)
    models.get_by_label("Model uid").fill(UID)
    launch = models.get_by_role("group", name="LoRAs to launch with")
    launch.get_by_label("Per-row LoRA slots").fill("2")
    launch.get_by_label("LoRA folder").fill(str(folder))
    launch.get_by_role("button", name="Add LoRA file").press("Enter")  # by keyboard: focus moves to the new name
    expect(launch.get_by_label("LoRA name")).to_be_focused()
    page.keyboard.type("mine")
    # Without its path the LoRA file reaches the server, which refuses the launch: its message shows.
    models.get_by_role("button", name="Launch").click()
    pathless = {"lora_list": [{"lora_name": "mine", "local_path": ""}]}
    refused = ui_server.http.post("/v1/models", json={"model_name": MODEL, "tiny": True, "peft_model_config": pathless})
    expect(page.get_by_role("alert")).to_contain_text(refused.json()["error"]["message"])
    launch.get_by_label("Local path").fill(str(folder / "style.safetensors"))
    models.get_by_role("button", name="Launch").click()
    expect(models.locator(f'tr[data-uid="{UID}"] .status')).to_have_text("ready")
    try:
        _pick_loras(page, ui_server.http.get(f"/v1/models/{UID}").json()["lora"])
    finally:
        assert ui_server.http.delete(f"/v1/models/{UID}").status_code == 200


def _pick_loras(page, described) -> None:
    fill_generate(page, model=UID, prompt="a red fox", steps=4, previews=0)
    page.get_by_label("Seed", exact=True).fill("5")
    section = page.get_by_role("group", name="LoRA", exact=True)
    expect(section.get_by_role("checkbox")).to_have_count(len(described["registered"]))
    mine = section.get_by_label("mine", exact=True)
    expect(mine).to_be_checked()  # the launch default: every launch LoRA
    with_default, sent = _generate(page)
    assert sent == [{"name": "mine", "scale": 1}]

    mine.uncheck()
    plain, sent = _generate(page)
    assert sent == []  # none, said explicitly: absent would mean the launch default
    assert max_diff(plain, with_default) > 8

    section.get_by_label("style", exact=True).check()
    section.get_by_label("Scale for style").fill("0")
    zero, sent = _generate(page)
    assert sent == [{"name": "style", "scale": 0}]
    assert max_diff(zero, plain) <= 2
    # "style" from the folder is the same file as "mine": at scale 1 it gives the launch default's image.
    section.get_by_label("Scale for style").fill("1")
    assert max_diff(_generate(page)[0], with_default) <= 2

    # Image to image sends the pick as the multipart form's `lora` JSON field.
    page.get_by_label("Image to image", exact=True).check()
    page.get_by_label("Input image").set_input_files(upload("red.png", INPUT))
    guided = _generate_multipart(page)
    section.get_by_label("style", exact=True).uncheck()
    assert max_diff(_generate_multipart(page), guided) > 8

    bound = described["max_loras_per_request"]
    for box in section.get_by_role("checkbox").all():
        if section.get_by_role("checkbox", checked=True).count() < bound:
            box.check()
    expect(section.get_by_role("checkbox", checked=False).first).to_be_disabled()
    screenshot(page, "lora")
