"""The playground's routes over real HTTP: `/` redirects to `/ui`, the page and its files are served from the
package (no key needed, as they hold no secrets), the API behind them still needs one. The page itself is
tested in a browser in tests/browser."""

from __future__ import annotations

import dataclasses

from kiln.engine.catalogue import CATALOGUE
from kiln.engine.schema import Limits
from kiln.server.app import Settings
from kiln.server.routes.ui import UI_DIR

from .server_helpers import assert_error


def test_root_redirects_to_the_page_and_the_page_loads_its_own_files(server_factory) -> None:
    server = server_factory()
    redirect = server.http.get("/", follow_redirects=False)
    assert redirect.status_code == 307 and redirect.headers["location"] == f"{server.url}/ui"
    page = server.http.get("/", follow_redirects=True)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="/ui/app.js">' in page.text
    for name in sorted(path.name for path in UI_DIR.iterdir()):
        asset = server.http.get(f"/ui/{name}")
        assert asset.status_code == 200, name
        assert asset.content == (UI_DIR / name).read_bytes()
    assert server.http.get("/ui/app.js").headers["content-type"].startswith("text/javascript")
    assert_error(server.http.get("/ui/nothing.js"), 404)


def test_config_lists_each_catalogue_models_samplers_and_the_limits(server_factory) -> None:
    config = server_factory().http.get("/ui/config.json").json()
    assert set(config["samplers"]) == set(CATALOGUE)
    assert config["samplers"]["FLUX.1-schnell"] == ["default", "Euler"]
    assert "DPM++ 2M Karras" in config["samplers"]["stable-diffusion-v1.5"]
    assert config["limits"] == dataclasses.asdict(Limits())
    assert "onnx" in config["launch"]["backends"] and "float32" in config["launch"]["dtypes"]


def test_with_api_keys_the_page_loads_without_one_and_the_api_still_needs_one(server_factory) -> None:
    server = server_factory(settings=Settings(api_keys=frozenset({"k"})))
    for path in ("/", "/ui", "/ui/app.js", "/ui/style.css", "/ui/config.json"):
        assert server.http.get(path, follow_redirects=True).status_code == 200, path
    assert server.http.get("/v1/cluster/auth").json() == {"auth": True}
    for path in ("/metrics", "/v1/models", "/uix"):
        assert_error(server.http.get(path), 401, "API key")
    assert server.http.get("/metrics", headers={"Authorization": "Bearer k"}).status_code == 200
