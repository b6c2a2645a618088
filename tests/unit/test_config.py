"""`kiln serve` settings: the config file covers every Settings field, the README's example is valid and sets
the real defaults, mistakes are refused by name, and the command line wins over the file (server/config.py)."""

from __future__ import annotations

import re
from dataclasses import fields, replace
from pathlib import Path

import pytest

from kiln.server.app import Settings
from kiln.server.cli import build_parser, serve_overrides
from kiln.server.config import LIMITS_KEYS, SETTINGS_KEYS, ConfigError, ServeConfig, read_file, resolve
from kiln.engine.schema import Limits

README = Path(__file__).resolve().parents[2] / "README.md"


def serve_args(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def test_every_setting_has_a_config_key() -> None:
    assert {item.name for item in fields(Settings)} == {*SETTINGS_KEYS, "limits"}
    assert {item.name for item in fields(Limits)} == set(LIMITS_KEYS)


def test_the_readme_example_is_valid_and_shows_the_defaults(tmp_path: Path) -> None:
    example = re.search(r"## Running it for others.*?```toml\n(.*?)```", README.read_text(), re.S).group(1)
    path = tmp_path / "kiln.toml"
    path.write_text(example)
    config = resolve(read_file(path), {})
    expected = replace(Settings(), launch=({"model_name": "sd-turbo", "tiny": True},),
                       allowed_hosts=("127.0.0.1", "localhost"))
    assert config == ServeConfig(settings=expected)


@pytest.mark.parametrize(("text", "words"), [
    ("max_body_byte = 10", ["max_body_byte", "unknown"]),
    ("max_body_bytes = '10'", ["max_body_bytes", "integer"]),
    ("drain_timeout_seconds = -1", ["drain_timeout_seconds", ">= 0"]),
    ("[limits]\nmax_image = 2", ["max_image", "unknown"]),
    ("[limits]\nmax_images = 0", ["limits.max_images", ">= 1"]),
    ("allowed_hosts = ['exa*mple.com']", ["allowed_hosts", "wildcard"]),
    ("public_url = 'images.example.com'", ["public_url", "http"]),
    ("api_keys = [' padded ']", ["api_keys", "whitespace"]),
    ("api_key_file = 'missing.txt'", ["missing.txt"]),
    ("launch = {model_name = 'sd-turbo'}", ["launch", "list of tables"]),
    ("port = ", ["not valid TOML"]),
])
def test_mistakes_are_refused_by_name(tmp_path: Path, text: str, words: list[str]) -> None:
    path = tmp_path / "kiln.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        read_file(path)
    for word in words:
        assert word in str(error.value)


def test_the_command_line_wins_over_the_file(tmp_path: Path) -> None:
    (tmp_path / "keys.txt").write_text("# ops keys\nfile-key\n\n")
    path = tmp_path / "kiln.toml"
    path.write_text("port = 1234\nhost = '0.0.0.0'\napi_key_file = 'keys.txt'\ndrain_timeout_seconds = 9\n"
                    "public_url = 'https://file.example/'\n[limits]\nmax_images = 2\n")
    from_file = read_file(path)
    assert from_file["api_keys"] == {"file-key"}

    only_file = resolve(from_file, serve_overrides(serve_args(), {}))
    assert (only_file.port, only_file.settings.drain_timeout_seconds) == (1234, 9.0)
    assert only_file.settings.allowed_hosts == ("0.0.0.0", "localhost", "127.0.0.1", "file.example")

    args = serve_args("--port", "5678", "--api-key", "flag-key", "--drain-timeout", "0",
                      "--allowed-hosts", "a.example,b.example", "--allowed-hosts", "127.0.0.1", "--launch", "sd-turbo")
    both = resolve(from_file, serve_overrides(args, {"KILN_API_KEYS": "env-1, env-2"}))
    assert (both.port, both.host, both.settings.drain_timeout_seconds) == (5678, "0.0.0.0", 0.0)
    assert both.settings.api_keys == {"flag-key", "env-1", "env-2"}  # the command line's keys replace the file's
    assert both.settings.allowed_hosts == ("a.example", "b.example", "127.0.0.1")
    assert both.settings.limits == Limits(max_images=2) and both.settings.launch == ({"model_name": "sd-turbo"},)


def test_key_files_must_hold_a_key(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("# nothing yet\n\n")
    with pytest.raises(ConfigError, match="holds no key"):
        serve_overrides(serve_args("--api-key-file", str(tmp_path / "empty.txt")), {})
    with pytest.raises(ConfigError, match="non-empty"):
        serve_overrides(serve_args("--api-key", ""), {})


def test_the_bound_host_is_allowed_by_default() -> None:
    config = resolve({}, serve_overrides(serve_args("--host", "::1"), {}))
    assert config.settings.allowed_hosts == ("[::1]", "localhost", "127.0.0.1")
