"""Generate in the browser against a real server: an image with its seed, previews before the final image, the
server's message for invalid input, and the batch panel while several prompts share steps."""

from __future__ import annotations

import re

from playwright.sync_api import expect

from .browser_helpers import (
    FINAL_IMAGE, SEED, fill_generate, final_images, open_playground, results, screenshot, shown_image,
)


def test_generate_shows_the_image_with_its_seed_and_reuse_seed_reproduces_it(page, ui_server) -> None:
    open_playground(page, ui_server.url)
    # The first text-to-image model, with its catalogue defaults (sd-turbo: 512x512, one step, no guidance).
    expect(page.get_by_label("Model", exact=True)).to_have_value("sd-turbo")
    expect(page.get_by_label("Size", exact=True)).to_have_value("512x512")
    expect(page.get_by_label("Steps", exact=True)).to_have_value("1")
    expect(page.get_by_label("Guidance", exact=True)).to_have_value("0")
    expect(page.get_by_label("Image to image", exact=True)).to_be_disabled()

    fill_generate(page, prompt="a lighthouse at dusk")
    page.get_by_role("button", name="Generate").click()
    expect(final_images(page)).to_have_count(1)
    first = final_images(page).first
    seed = int(SEED.search(first.get_attribute("alt")).group(1))
    card = results(page).get_by_role("listitem").first
    expect(card.get_by_text(f"seed {seed}", exact=True)).to_be_visible()
    expect(card).to_contain_text("sd-turbo · text to image · 64x64 · 1 steps · guidance 0 · sampler default")
    download = card.get_by_role("link", name=f"Download image 1, seed {seed}")
    expect(download).to_have_attribute("download", f"kiln-{seed}.png")
    image = shown_image(page, first)
    assert image.size == (64, 64)

    # Reuse seed, then generate again by keyboard (Ctrl+Enter in the prompt): the newest result comes first and
    # is the same image.
    card.get_by_role("button", name=f"Reuse seed {seed}").click()
    expect(page.get_by_label("Seed", exact=True)).to_have_value(str(seed))
    page.get_by_label("Prompt", exact=True).press("Control+Enter")
    expect(final_images(page)).to_have_count(2)
    newest = final_images(page).first
    expect(newest).to_have_attribute("alt", f"Image 1, seed {seed}")
    assert shown_image(page, newest).tobytes() == image.tobytes()
    screenshot(page, "generate")


def test_n_images_each_come_with_their_own_seed(page, ui_server) -> None:
    open_playground(page, ui_server.url)
    fill_generate(page, prompt="two foxes")
    page.get_by_label("Seed", exact=True).fill("7")
    page.get_by_label("Images", exact=True).fill("2")
    page.get_by_role("button", name="Generate").click()
    expect(final_images(page)).to_have_count(2)
    assert [image.get_attribute("alt") for image in final_images(page).all()] == ["Image 1, seed 7", "Image 2, seed 8"]


RECORD = """() => {
  window.seen = [];
  new MutationObserver((changes) => {
    for (const change of changes) {
      const node = change.type === "attributes" ? change.target : null;
      if (node && node.matches("figure > img") && change.attributeName === "alt") window.seen.push(node.alt);
      if (node && node.matches("progress") && change.attributeName === "value") window.seen.push(node.value);
    }
  }).observe(document.querySelector("#result-list"), {subtree: true, attributes: true});
}"""


def test_previews_arrive_before_the_final_image_and_the_progress_bar_moves(page, ui_server) -> None:
    open_playground(page, ui_server.url)
    page.evaluate(RECORD)  # what the page shows, in the order it shows it
    fill_generate(page, model="sd15", prompt="a slow harbour", steps=300, previews=3)
    page.get_by_role("button", name="Generate").click()
    preview = results(page).get_by_role("img", name=re.compile(r"^Preview \d, image 1$"))
    expect(preview).to_be_visible()
    screenshot(page, "previews")
    expect(final_images(page)).to_have_count(1)

    seen = page.evaluate("window.seen")
    alts = [item for item in seen if isinstance(item, str)]
    assert alts[:3] == ["Preview 1, image 1", "Preview 2, image 1", "Preview 3, image 1"], alts
    assert FINAL_IMAGE.match(alts[-1]) and len(alts) == 4, alts
    progress = [item for item in seen if not isinstance(item, str)]
    assert any(0 < value < 1 for value in progress) and progress[-1] == 1, progress
    assert progress == sorted(progress), progress
    card = results(page).get_by_role("listitem").first
    expect(card.get_by_label("Previews of image 1").get_by_role("img")).to_have_count(3)


def test_invalid_input_shows_the_servers_message(page, ui_server) -> None:
    open_playground(page, ui_server.url)
    body = {"model": "sd-turbo", "prompt": "x", "size": "65x64"}
    message = ui_server.http.post("/v1/images/generations", json=body).json()["error"]["message"]
    fill_generate(page, prompt="x", size="65x64")
    page.get_by_role("button", name="Generate").click()
    alert = page.get_by_role("alert")
    expect(alert).to_contain_text(message)
    expect(alert).to_contain_text("HTTP 400, invalid_size")
    expect(results(page).get_by_role("listitem")).to_have_count(0)
    screenshot(page, "error")
    alert.get_by_role("button", name="Dismiss").click()
    expect(alert).to_be_hidden()


def test_the_batch_panel_shows_several_prompts_sharing_steps(page, ui_server) -> None:
    open_playground(page, ui_server.url)
    row = page.get_by_role("region", name="Batch at work").locator('tr[data-model="sd-turbo"]')
    expect(row).to_be_visible()
    generate = page.get_by_role("button", name="Generate")
    for prompt in ("a red fox", "a blue whale", "a green owl"):
        fill_generate(page, prompt=prompt, steps=400, previews=0)
        generate.click()
    # Several images denoised together: more than one active job at once, more than one row per forward.
    expect(row.locator(".active .count")).to_have_text(re.compile(r"^([2-9]|\d\d+)$"))
    expect(row.locator(".rows")).to_have_text(re.compile(r"^([2-9]|\d\d+)\.\d$"))
    screenshot(page, "batch")
    expect(final_images(page)).to_have_count(3)
    expect(row.locator(".active .count")).to_have_text("0")
    assert int(row.locator(".peak").inner_text()) >= 2
