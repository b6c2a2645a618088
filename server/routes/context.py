"""Typed access to what `create_app` puts on `app.state`, so routes need no globals."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request

from kiln.engine.images import ImageStore

if TYPE_CHECKING:
    from ..app import Settings
    from ..registry import ModelRegistry
    from .sdapi import SdapiState


def registry(request: Request) -> "ModelRegistry":
    return request.app.state.registry


def settings(request: Request) -> "Settings":
    return request.app.state.settings


def store(request: Request) -> ImageStore:
    return request.app.state.store


def base_url(request: Request) -> str:
    """Where the `url`s Kiln hands out start: the configured public URL, else the request's own base (from its
    Host header, which TrustedHosts has checked against the allowed hosts)."""
    return settings(request).public_url or str(request.base_url)


def sdapi(request: Request) -> "SdapiState":
    return request.app.state.sdapi
