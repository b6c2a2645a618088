"""Which Host headers Kiln answers.

Image URLs are built from the request's Host header unless a public URL is set, so a server answering any Host
would hand a client a link on whatever host it named (`Host: evil.example` -> `http://evil.example/v1/images/
files/...`), and a browser page on a foreign name rebound to this address could read the API. Starlette's
`TrustedHostMiddleware` decides; `TrustedHosts` only words its refusal in Kiln's error shape.
"""

from __future__ import annotations

from typing import Sequence

from starlette.datastructures import Headers
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import error_response

LOCAL_HOSTS = ("localhost", "127.0.0.1")
_TRUSTED = "kiln.trusted_host"  # scope key: set when Starlette's check let the request through


def default_allowed_hosts(bound_host: str, public_host: str | None = None) -> tuple[str, ...]:
    """The bound host (IPv6 in brackets, as Host headers write it), localhost and 127.0.0.1, and the public URL's
    host when one is set."""
    bound = f"[{bound_host}]" if ":" in bound_host else bound_host
    return tuple(dict.fromkeys(host.lower() for host in (bound, *LOCAL_HOSTS, *filter(None, [public_host]))))


def check_patterns(patterns: Sequence[str]) -> None:
    """ValueError for a pattern TrustedHostMiddleware refuses (`*` alone, or a leading `*.` wildcard only)."""
    try:
        TrustedHostMiddleware(_mark_trusted, allowed_hosts=list(patterns))
    except AssertionError as error:
        raise ValueError(f"allowed hosts {list(patterns)}: {error}") from None


class TrustedHosts:
    """A Host header not in `allowed_hosts` (`*` trusts every host) gets a 400 in the error shape, and the
    request goes no further."""

    def __init__(self, app: ASGIApp, allowed_hosts: Sequence[str]):
        self.app = app
        self.check = TrustedHostMiddleware(_mark_trusted, allowed_hosts=list(allowed_hosts), www_redirect=False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.check(scope, receive, _discard)
        if scope.pop(_TRUSTED, False):
            await self.app(scope, receive, send)
            return
        host = Headers(scope=scope).get("host", "")
        await error_response(400, f"this server does not answer to the Host {host!r}; its operator can add it with "
                             "`kiln serve --allowed-hosts`", param="Host", code="invalid_host")(scope, receive, send)


async def _mark_trusted(scope: Scope, receive: Receive, send: Send) -> None:
    scope[_TRUSTED] = True


async def _discard(message: dict) -> None:
    """Starlette's own text/plain refusal goes nowhere; TrustedHosts answers instead."""
