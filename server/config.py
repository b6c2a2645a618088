"""What `kiln serve` runs with: a TOML file (`--config kiln.toml`) where an operator sees and sets every bound,
under the command line, which wins over the file; the file wins over the defaults. README.md shows a file.

Every field of `server.app.Settings` has its key (the `[limits]` table holds `Limits`), beside the serve
options (`host`, `port`, `log_level`, `threads`, `forwarded_allow_ips`) and `api_key_file`. An unknown key or a
value of the wrong kind is a ConfigError naming it, so a typo never leaves a bound at its default unnoticed.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

from .app import DEFAULT_HOST, DEFAULT_PORT, Settings
from .errors import ApiError
from .hosts import check_patterns, default_allowed_hosts
from kiln.engine.schema import Limits
from .registry import ModelRegistry

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


class ConfigError(ValueError):
    """A setting is unknown or invalid; the message names it and where it came from."""


@dataclass(frozen=True)
class ServeConfig:
    """Where to listen, how to treat a proxy in front, and the app's Settings."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    log_level: str = "info"
    threads: int | None = None  # torch intra-op threads; None: torch's choice
    # uvicorn's: the proxies whose X-Forwarded-For/-Proto are trusted; None: $FORWARDED_ALLOW_IPS or loopback
    forwarded_allow_ips: str | None = None
    settings: Settings = field(default_factory=Settings)


# --- value parsers: (key, value) -> value, ConfigError otherwise ----------------------------------------------------
def _integer(low: int) -> Callable[[str, Any], int]:
    def parse(key: str, value: Any) -> int:
        if isinstance(value, int) and not isinstance(value, bool) and value >= low:
            return value
        raise ConfigError(f"{key} must be an integer >= {low}, got {value!r}")

    return parse


def _non_negative(what: str) -> Callable[[str, Any], float]:
    def parse(key: str, value: Any) -> float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < float("inf"):
            return float(value)
        raise ConfigError(f"{key} must be {what} >= 0, got {value!r}")

    return parse


_seconds = _non_negative("a number of seconds")


def _text(key: str, value: Any) -> str:
    if isinstance(value, str) and value:
        return value
    raise ConfigError(f"{key} must be a non-empty string, got {value!r}")


def _texts(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, list):
        return tuple(_text(key, item) for item in value)
    raise ConfigError(f"{key} must be a list of strings, got {value!r}")


def _log_level(key: str, value: Any) -> str:
    if value in LOG_LEVELS:
        return value
    raise ConfigError(f"{key} must be one of {', '.join(LOG_LEVELS)}, got {value!r}")


def _hosts(key: str, value: Any) -> tuple[str, ...]:
    hosts = tuple(host.strip().lower() for host in _texts(key, value))
    try:
        check_patterns(hosts)
    except ValueError as error:
        raise ConfigError(f"{key}: {error}") from None
    return hosts


def _url(key: str, value: Any) -> str:
    """An http(s) URL with a host and no query or fragment, ending in '/' (paths are joined onto it)."""
    text = _text(key, value)
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ConfigError(f"{key} must be an http(s) URL such as https://images.example.com or "
                          f"https://example.com/kiln, got {value!r}")
    return text.rstrip("/") + "/"


def _launches(key: str, value: Any) -> tuple[dict, ...]:
    if isinstance(value, list) and all(isinstance(item, dict) for item in value):
        return tuple(value)
    raise ConfigError(f"{key} must be a list of tables (launch bodies, as POST /v1/models takes), got {value!r}")


def _keys(key: str, value: Any) -> frozenset[str]:
    keys = frozenset(_texts(key, value))
    if any(item != item.strip() for item in keys):
        raise ConfigError(f"{key}: an API key cannot begin or end with whitespace")
    return keys


SERVE_KEYS: Mapping[str, Callable[[str, Any], Any]] = {
    "host": _text, "port": _integer(0), "log_level": _log_level, "threads": _integer(1),
    "forwarded_allow_ips": _text,
}
SETTINGS_KEYS: Mapping[str, Callable[[str, Any], Any]] = {
    "max_body_bytes": _integer(1), "max_upload_bytes": _integer(1), "max_image_pixels": _integer(1),
    "file_ttl_seconds": _seconds, "file_dir": _text, "retry_after_seconds": _integer(0), "api_keys": _keys,
    "launch": _launches, "allowed_hosts": _hosts, "public_url": _url, "drain_timeout_seconds": _seconds,
}
LIMITS_KEYS: Mapping[str, Callable[[str, Any], Any]] = {
    "max_images": _integer(1), "max_prompt_chars": _integer(1), "max_partial_images": _integer(0),
    "max_steps": _integer(1), "max_guidance": _non_negative("a number"), "max_request_id_chars": _integer(1),
}


# --- sources -----------------------------------------------------------------------------------------------------
def read_file(path: Path) -> dict[str, Any]:
    """A config file's settings (unknown keys refused); `api_key_file` is read, relative to the file."""
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as error:
        raise ConfigError(f"cannot read the config file {str(path)!r}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"the config file {str(path)!r} is not valid TOML: {error}") from None
    known = {*SERVE_KEYS, *SETTINGS_KEYS, "limits", "api_key_file"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    values = {key: (SERVE_KEYS | SETTINGS_KEYS)[key](key, value) for key, value in raw.items()
              if key not in ("limits", "api_key_file")}
    if "limits" in raw:
        values["limits"] = _limits(raw["limits"])
    if "api_key_file" in raw:
        keys = read_key_file(path.parent / _text("api_key_file", raw["api_key_file"]))
        values["api_keys"] = values.get("api_keys", frozenset()) | keys
    return values


def read_key_file(path: Path) -> frozenset[str]:
    """API keys, one per line; blank lines and lines starting with '#' are skipped. A file without any key is
    an error: an operator who meant to require keys must not get an open server."""
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise ConfigError(f"cannot read the API key file {str(path)!r}: {error.strerror}") from None
    keys = frozenset(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
    if not keys:
        raise ConfigError(f"the API key file {str(path)!r} holds no key (one per line)")
    return keys


def _limits(value: Any) -> Limits:
    if not isinstance(value, dict):
        raise ConfigError(f"limits must be a table, got {value!r}")
    unknown = sorted(set(value) - set(LIMITS_KEYS))
    if unknown:
        raise ConfigError(f"unknown limit(s) {', '.join(unknown)}; known: {', '.join(LIMITS_KEYS)}")
    return Limits(**{key: LIMITS_KEYS[key](f"limits.{key}", item) for key, item in value.items()})


def parse_option(key: str, value: Any) -> Any:
    """One setting from the command line, checked by the same rule as in the file."""
    return (SERVE_KEYS | SETTINGS_KEYS)[key](key, value)


def check_launches(bodies: tuple[Mapping[str, Any], ...]) -> None:
    """Each startup launch as POST /v1/models would check it, and no uid twice: a mistake stops `kiln serve`
    with its message rather than failing the app's startup with a traceback."""
    registry, uids = ModelRegistry(), set()
    for body in bodies:
        try:
            uid, _, _ = registry.parse_launch(body)
        except ApiError as error:
            raise ConfigError(f"launch {dict(body)}: {error.message}") from None
        if uid in uids:
            raise ConfigError(f"launch: model uid {uid!r} is launched twice; give one of them a model_uid")
        uids.add(uid)


def resolve(file_values: Mapping[str, Any], overrides: Mapping[str, Any]) -> ServeConfig:
    """The command line's values over the file's over the defaults. Without `allowed_hosts` anywhere, the
    server answers to its bound host, localhost, 127.0.0.1 and the public URL's host."""
    values = {**file_values, **overrides}
    serve = {key: values[key] for key in SERVE_KEYS if key in values}
    settings = {key: values[key] for key in (*SETTINGS_KEYS, "limits") if key in values}
    if "allowed_hosts" not in settings:
        public = urlsplit(settings["public_url"]).hostname if "public_url" in settings else None
        settings["allowed_hosts"] = default_allowed_hosts(serve.get("host", DEFAULT_HOST), public)
    return ServeConfig(**serve, settings=Settings(**settings))

