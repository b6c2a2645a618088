"""Model management and API keys in the browser against a real server: launch a catalogue model with launch
options, see it ready and usable, terminate it; with keys on, the page asks for one, refuses a wrong one with
the server's message, and works with the right one."""

from __future__ import annotations

import re
from typing import Iterator

import pytest

from playwright.sync_api import expect

from kiln.server.app import Settings
from tests.server.conftest import RunningServer, start_server

from .browser_helpers import fill_generate, final_images, open_playground, screenshot


def test_launch_a_model_with_options_use_it_and_terminate_it(page, ui_server) -> None:
    open_playground(page, ui_server.url)
    models = page.get_by_role("region", name="Models")
    models.get_by_label("Catalogue model").select_option("sdxl-turbo")
    models.get_by_label("Model uid").fill("ui-sdxl")
    models.get_by_label("Max batch size").fill("4")
    models.get_by_label("Backend").select_option("eager")
    expect(models.get_by_label("Tiny demo weights")).to_be_checked()
    models.get_by_role("button", name="Launch").click()
    row = models.locator('tr[data-uid="ui-sdxl"]')
    expect(row.locator(".status")).to_have_text("ready")
    expect(row).to_contain_text("sdxl-turbo")
    expect(row.locator("td").nth(3)).to_have_text("4")  # max batch, as launched
    described = ui_server.http.get("/v1/models/ui-sdxl").json()
    options = described["launch_options"]
    assert options["tiny"] is True and options["backend"] == "eager" and options["max_batch_size"] == 4
    # Memory, when the description has it: "—" until then.
    memory = re.compile(r"^\d+(\.\d)? (B|KiB|MiB|GiB|TiB)$") if described.get("memory_bytes") is not None else "—"
    expect(row.locator("td").nth(4)).to_have_text(memory)
    screenshot(page, "models")

    # The new model is in the picker and generates.
    fill_generate(page, model="ui-sdxl", prompt="a new model")
    page.get_by_role("button", name="Generate").click()
    expect(final_images(page)).to_have_count(1)

    models.get_by_role("button", name="Terminate ui-sdxl").click()
    expect(row).to_have_count(0)
    expect(page.get_by_label("Model", exact=True).locator('option[value="ui-sdxl"]')).to_have_count(0)
    assert "ui-sdxl" not in [model["id"] for model in ui_server.http.get("/v1/models").json()["data"]]


def test_models_launched_and_terminated_by_other_clients_show_up(page, ui_server) -> None:
    open_playground(page, ui_server.url)
    launched = ui_server.http.post("/v1/models", json={"model_name": "sd-turbo", "model_uid": "elsewhere", "tiny": True})
    assert launched.status_code == 200, launched.text
    row = page.get_by_role("region", name="Models").locator('tr[data-uid="elsewhere"]')
    expect(row.locator(".status")).to_have_text("ready")
    expect(page.get_by_label("Model", exact=True).locator('option[value="elsewhere"]')).to_have_count(1)
    assert ui_server.http.delete("/v1/models/elsewhere").status_code == 200
    expect(row).to_have_count(0)


def test_a_bad_launch_option_shows_the_servers_message(page, ui_server) -> None:
    open_playground(page, ui_server.url)
    models = page.get_by_role("region", name="Models")
    models.get_by_label("Catalogue model").select_option("sd-turbo")
    models.get_by_label("Model uid").fill("never")
    models.get_by_label("Max batch size").fill("lots")
    models.get_by_role("button", name="Launch").click()
    expect(page.get_by_role("alert")).to_contain_text("launch option 'max_batch_size': got 'lots'")
    expect(models.locator('tr[data-uid="never"]')).to_have_count(0)


@pytest.fixture
def keyed_server(ui_server) -> Iterator[RunningServer]:
    """A second app on the same models, with API keys on (requested before `page`, so it outlives the page)."""
    keyed = start_server(ui_server.app.state.registry, Settings(api_keys=frozenset({"k"})))
    yield keyed
    keyed.stop()


def test_with_api_keys_the_page_asks_for_a_key_and_sends_it(keyed_server, page) -> None:
    page.goto(f"{keyed_server.url}/")
    key = page.get_by_label("API key")
    expect(key).to_be_focused()
    screenshot(page, "api-key")
    key.fill("wrong")
    page.get_by_role("button", name="Use key").click()
    expect(page.get_by_role("alert")).to_contain_text("missing or wrong API key")
    expect(key).to_be_visible()

    key.fill("k")
    key.press("Enter")
    expect(page.get_by_role("alert")).to_be_hidden()
    expect(page.get_by_text("API key set")).to_be_visible()
    expect(page.get_by_label("Model", exact=True)).to_have_value("sd-turbo")
    fill_generate(page, prompt="behind a key")
    page.get_by_role("button", name="Generate").click()
    expect(final_images(page)).to_have_count(1)
    batch = page.get_by_role("region", name="Batch at work").locator('tr[data-model="sd-turbo"] .generated')
    expect(batch).to_have_text(re.compile(r"^[1-9]\d*$"))  # /metrics answered with the key
