"""User-registered image models (Xinference's `POST /v1/model_registrations/image`): validated, kept by name, and
persisted under Kiln's home folder when asked, so they survive restarts.

A registration body is untrusted: it is checked field by field (names like model uids, the family, abilities, the
default launch options and request parameters by the same parsers a launch and a request use), and the only thing
it makes Kiln look at on disk is whether its folder exists. What is in the folder is read at launch
(`engine.custom`). Persisted registrations are `$KILN_HOME/registrations/image/<name>.json` (default `~/.kiln`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from kiln.engine.catalogue import CATALOGUE, IMAGE2IMAGE, INPAINTING, OCR_CATALOGUE, TEXT2IMAGE, ModelSpec
from kiln.engine.coerce import Unparsable, to_bool, to_json_object
from kiln.engine.custom import FAMILY_NAMES, GENERIC_FAMILY, custom_spec
from kiln.engine.errors import InvalidRequest
from kiln.engine.options import LAUNCH_OPTIONS
from kiln.engine.schema import merge_fields

log = logging.getLogger("kiln.server")

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # the model uid rule: a name is a uid by default
ABILITIES = (TEXT2IMAGE, IMAGE2IMAGE, INPAINTING)
# Fields of Xinference's custom image spec that Kiln reads, and those it accepts only empty (hub and packaging
# fields that mean nothing for a local folder).
_READ = ("model_name", "model_family", "model_ability", "model_uri", "default_model_config",
         "default_generate_config", "controlnet")
_EMPTY_ONLY = ("version", "model_id", "model_revision", "model_hub", "model_src", "model_description",
               "virtualenv", "featured", "updated_at")
# A ControlNet entry of the spec (Xinference's controlnet family dict): its name and local folder are read; the
# hub fields are accepted and ignored, since the folder is what loads.
_CONTROLNET_READ = ("model_name", "model_uri", "model_family")
_CONTROLNET_IGNORED = ("version", "model_id", "model_revision", "model_hub", "model_src", "model_description",
                       "model_ability")
_NOT_DEFAULTS = ("prompt", "request_id", "stream", "partial_images")  # per request, never a model's default
_LAUNCH_ONLY = ("model_path", "tiny")  # the folder is model_uri; a registered model has no tiny stand-in


def kiln_home() -> Path:
    """Kiln's home folder: $KILN_HOME, else ~/.kiln (read now, so a launcher or a test can set it late)."""
    return Path(os.environ.get("KILN_HOME") or Path.home() / ".kiln").expanduser()


def _bad(message: str, field: str) -> InvalidRequest:
    return InvalidRequest(message, field, "invalid_registration")


@dataclass(frozen=True)
class Registration:
    """One registered model, as validated: what `spec()` turns into a ModelSpec at launch."""

    name: str
    family: str  # a Kiln family name, or "stable_diffusion": detected at launch
    abilities: tuple[str, ...]
    path: Path
    launch: Mapping[str, Any]  # default_model_config
    parameters: Mapping[str, Any]  # default_generate_config
    persist: bool
    controlnets: Mapping[str, Path] = dataclasses.field(default_factory=lambda: MappingProxyType({}))  # name -> folder

    def spec(self) -> ModelSpec:
        """The launchable spec; reads the folder's model_index.json (InvalidRequest naming model_uri)."""
        return custom_spec(self.name, self.family, self.abilities, self.path, self.launch, self.parameters,
                           {name: str(folder) for name, folder in self.controlnets.items()})

    def describe(self) -> dict[str, Any]:
        """Xinference's registration shape, as `GET /v1/model_registrations/image/{name}` returns it."""
        return {"model_name": self.name, "model_family": self.family, "model_ability": list(self.abilities),
                "model_uri": str(self.path), "default_model_config": dict(self.launch),
                "default_generate_config": dict(self.parameters),
                "controlnet": [{"model_family": "controlnet", "model_name": name, "model_uri": str(folder)}
                               for name, folder in self.controlnets.items()] or None, "model_type": "image",
                "is_builtin": False, "persist": self.persist}


def parse_registration(model: Any, persist: Any, *, check_folder: bool = True) -> Registration:
    """Xinference's body fields: `model` (a JSON string of a spec, or the object) and `persist`. InvalidRequest
    naming the field at fault."""
    try:
        spec = to_json_object(model)
    except Unparsable as error:
        raise _bad(f"model must be {error.expected}: the model spec, as Xinference's client sends it",
                   "model") from None
    try:
        keep = to_bool(persist) if persist is not None else False
    except Unparsable:
        raise _bad(f"persist must be true or false, got {persist!r}", "persist") from None
    unknown = sorted(set(spec) - {*_READ, *_EMPTY_ONLY})
    if unknown:
        raise _bad(f"unknown field {unknown[0]!r} in the model spec; Kiln reads: {', '.join(_READ)}", unknown[0])
    for name in _EMPTY_ONLY:
        if spec.get(name) not in (None, "", [], {}) and name != "version":
            raise _bad(f"{name} is not supported for a registered image model (Kiln loads the local folder "
                       "model_uri)", name)
    if spec.get("version") not in (None, 1, 2):
        raise _bad(f"version must be 1 or 2 (Xinference's spec versions), got {spec.get('version')!r}", "version")
    return Registration(
        name=_name(spec.get("model_name")), family=_family(spec.get("model_family")),
        abilities=_abilities(spec.get("model_ability")), path=_folder(spec.get("model_uri"), check_folder),
        launch=_launch(spec.get("default_model_config")), parameters=_parameters(spec.get("default_generate_config")),
        persist=keep, controlnets=_controlnets(spec.get("controlnet"), check_folder),
    )


def _name(value: Any) -> str:
    if not isinstance(value, str) or not NAME.match(value):
        raise _bad(f"model_name {value!r} must be 1-128 characters of letters, digits, '.', '_' or '-' (as a model "
                   "uid)", "model_name")
    if value in CATALOGUE or value in OCR_CATALOGUE:
        raise _bad(f"model_name {value!r} is a built-in model; register under another name", "model_name")
    return value


def _family(value: Any) -> str:
    if value is None:
        return GENERIC_FAMILY
    if not isinstance(value, str) or value not in FAMILY_NAMES:
        raise _bad(f"model_family {value!r} is not a family Kiln runs; accepted: {', '.join(FAMILY_NAMES)} "
                   f"({GENERIC_FAMILY!r} or none: detected from the checkpoint's model_index.json)", "model_family")
    return value


def _abilities(value: Any) -> tuple[str, ...]:
    """A list of abilities; missing or empty means whatever the family can do."""
    if value is None or value == []:
        return ()
    if not isinstance(value, list) or not all(isinstance(item, str) and item in ABILITIES for item in value):
        raise _bad(f"model_ability must be a list of {', '.join(ABILITIES)}; got {value!r}", "model_ability")
    return tuple(dict.fromkeys(value))


def _folder(value: Any, check: bool, field: str = "model_uri", holds: str = "model_index.json") -> Path:
    """An absolute local folder (file:// URIs accepted). Only its existence is looked at."""
    if not isinstance(value, str) or not value.strip():
        raise _bad(f"{field} is required: the absolute path of a local diffusers checkpoint folder", field)
    path = Path(value.strip().removeprefix("file://"))
    if not path.is_absolute():
        raise _bad(f"{field} {value!r} must be an absolute path (or a file:// URI) of a local folder", field)
    if check and not path.is_dir():
        raise _bad(f"{field} {value!r} is not a folder on this server; register the folder that holds the "
                   f"checkpoint's {holds}", field)
    return path


def _controlnets(value: Any, check: bool) -> dict[str, Path]:
    """Xinference's `controlnet` list: one ControlNet family dict per ControlNet, each a local folder by name."""
    if value in (None, []):
        return {}
    if not isinstance(value, list):
        raise _bad("controlnet must be a list of ControlNet specs ({\"model_name\", \"model_uri\"})", "controlnet")
    found: dict[str, Path] = {}
    for index, entry in enumerate(value):
        where = f"controlnet[{index}]"
        if not isinstance(entry, dict):
            raise _bad(f"{where} must be a ControlNet spec object with model_name and model_uri", where)
        unknown = sorted(set(entry) - {*_CONTROLNET_READ, *_CONTROLNET_IGNORED})
        if unknown:
            raise _bad(f"{where}: unknown field {unknown[0]!r}; Kiln reads: {', '.join(_CONTROLNET_READ)}",
                       f"{where}.{unknown[0]}")
        if entry.get("model_family", "controlnet") != "controlnet":
            raise _bad(f"{where}.model_family must be 'controlnet'", f"{where}.model_family")
        name = entry.get("model_name")
        if not isinstance(name, str) or not NAME.match(name) or name in found:
            raise _bad(f"{where}.model_name {name!r} must be a new name of letters, digits, '.', '_' or '-'",
                       f"{where}.model_name")
        found[name] = _folder(entry.get("model_uri"), check, f"{where}.model_uri", "config.json")
    return found


def _launch(value: Any) -> Mapping[str, Any]:
    config = _object(value, "default_model_config")
    for name in config:
        if name not in LAUNCH_OPTIONS or name in _LAUNCH_ONLY:
            accepted = [option for option in LAUNCH_OPTIONS if option not in _LAUNCH_ONLY]
            raise _bad(f"default_model_config: unknown launch option {name!r}; accepted: {', '.join(accepted)}",
                       f"default_model_config.{name}")
        try:
            LAUNCH_OPTIONS[name].parse(name, config[name])
        except InvalidRequest as error:
            raise _bad(f"default_model_config: {error}", f"default_model_config.{name}") from None
    return config


def _parameters(value: Any) -> Mapping[str, Any]:
    config = _object(value, "default_generate_config")
    for name in config:
        if name in _NOT_DEFAULTS:
            raise _bad(f"default_generate_config: {name} is per request, not a model default",
                       f"default_generate_config.{name}")
    try:
        merge_fields(config)
    except InvalidRequest as error:
        raise _bad(f"default_generate_config: {error}", f"default_generate_config.{error.param}") from None
    return config


def _object(value: Any, field: str) -> dict[str, Any]:
    try:
        return to_json_object(value)
    except Unparsable as error:
        raise _bad(f"{field} must be {error.expected}", field) from None


class Registrations:
    """The registered models of one server, by name; persisted ones are read from `home` at construction."""

    def __init__(self, home: Path | None = None):
        self.folder = (home if home is not None else kiln_home()) / "registrations" / "image"
        self._by_name: dict[str, Registration] = {}
        for file in sorted(self.folder.glob("*.json")) if self.folder.is_dir() else ():
            try:
                saved = json.loads(file.read_text(encoding="utf-8"))
                registration = parse_registration(saved, True, check_folder=False)
            except (OSError, ValueError) as error:
                log.warning("skipping the persisted registration %s: %s", file, error)
                continue
            self._by_name[registration.name] = registration

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def __iter__(self):
        return iter(sorted(self._by_name))

    def get(self, name: str) -> Registration | None:
        return self._by_name.get(name)

    def add(self, registration: Registration) -> None:
        """Keep it (and write it under the home folder when it persists); a taken name is a 400."""
        if registration.name in self._by_name:
            raise _bad(f"model_name {registration.name!r} is already registered; unregister it first",
                       "model_name")
        if registration.persist:
            self.folder.mkdir(parents=True, exist_ok=True)
            saved = {**registration.describe(), "model_uri": str(registration.path)}
            for field in ("model_type", "is_builtin", "persist"):
                saved.pop(field)
            self._file(registration.name).write_text(json.dumps(saved, indent=2), encoding="utf-8")
        self._by_name[registration.name] = registration

    def remove(self, name: str) -> None:
        registration = self._by_name.pop(name)
        if registration.persist:
            self._file(name).unlink(missing_ok=True)

    def _file(self, name: str) -> Path:
        return self.folder / f"{name}.json"  # the name is a validated uid: no separators, never '..'
