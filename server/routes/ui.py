"""The web playground: `/` redirects to `/ui`, which serves the page; its scripts and styles are static files in
`server/ui/` (no build step, nothing fetched from elsewhere, so it works offline).

The page talks to the public API only, like any client. `/ui/config.json` adds the few facts the API does not
publish per model (sampler names, request limits, launch choices), so the page never hard-codes them. None of
this holds a secret, so API keys do not guard it (`server.app.ApiKeyAuth`): the page asks for a key and sends it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.staticfiles import StaticFiles

from kiln.engine.catalogue import CATALOGUE
from kiln.engine.options import BACKENDS, DTYPES
from kiln.engine.samplers import sampler_names

from . import context

UI_DIR = Path(__file__).resolve().parent.parent / "ui"


def static_files() -> StaticFiles:
    """The page's assets, mounted at `/ui/`."""
    return StaticFiles(directory=UI_DIR)


async def home(request: Request) -> Response:
    return RedirectResponse(request.url_for("ui"), status_code=307)


async def page(request: Request) -> Response:
    return FileResponse(UI_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def config(request: Request) -> Response:
    limits = context.settings(request).limits
    return JSONResponse({
        "samplers": {name: list(sampler_names(spec.family.flow)) for name, spec in CATALOGUE.items()},
        "limits": dataclasses.asdict(limits),
        "launch": {"backends": list(BACKENDS), "dtypes": list(DTYPES)},
    })
