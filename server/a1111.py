"""AUTOMATIC1111's txt2img/img2img bodies in Kiln's terms: every field A1111's API (v1.10) takes, what Kiln does
with it, and the A1111 `info` of a result. HTTP-free and torch-free: `routes/sdapi.py` serves it, and the API
document is generated from the same declarations.

A field is one of:
- mapped onto a Kiln request parameter (`engine.schema.PARAMETERS`, which checks it): prompt, negative_prompt,
  seed, steps, cfg_scale, width, height, sampler_name, denoising_strength (img2img);
- read here: batch_size x n_iter images, scheduler (Karras), override_settings.sd_model_checkpoint, init images,
  the mask and its inversion, send_images, include_init_images, disable_extra_networks, and the prompt's
  `<lora:name:weight>` tags, which become the request's `lora` field;
- accepted and without effect: A1111's saving, UI and sampler-noise knobs, and the inpainting refinements Kiln
  does not run (its inpainting binarises the mask on the latent grid, as diffusers' pipelines do);
- accepted at its default only (anything else is a 400 naming it): hires fix, face restoration, tiling, variation
  seeds, styles, scripts and extensions, refiners. A field A1111 does not have is a 400 naming it too.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Mapping

from kiln.engine.coerce import to_bool, to_int
from kiln.engine.errors import InvalidRequest
from kiln.engine.samplers import sampler_names
from kiln.engine.schema import PARAMETERS, read_as

MAPPED = "mapped"
READ = "read"
IGNORED = "ignored"
DEFAULT_ONLY = "default_only"


@dataclass(frozen=True)
class Field:
    """One A1111 body field: its A1111 default, how Kiln treats it, and (mapped ones) the Kiln parameter."""

    default: Any
    treatment: str
    description: str = ""
    parameter: str | None = None  # the engine.schema parameter a mapped field sets
    schema: Mapping[str, Any] | None = None  # JSON schema; mapped fields take their parameter's

    def json_schema(self) -> dict[str, Any]:
        if self.parameter is not None:
            return dict(PARAMETERS[self.parameter].kind.json_schema)
        if self.schema is not None:
            return dict(self.schema)
        return {}


def _mapped(parameter: str, default: Any, note: str = "") -> Field:
    return Field(default, MAPPED, f"{PARAMETERS[parameter].description}{note}", parameter)


_INT = {"type": "integer"}
_POSITIVE = {"type": "integer", "minimum": 1}
_TEXT = {"type": ["string", "null"]}
_BOOL = {"type": ["boolean", "null"]}
_OBJECT = {"type": "object"}

COMMON: Mapping[str, Field] = {
    "prompt": _mapped("prompt", "", " <lora:name:weight> tags pick the model's LoRAs (its `lora` field) and are "
                      "removed from the text."),
    "negative_prompt": _mapped("negative_prompt", ""),
    "seed": _mapped("seed", -1, " Image i of the request gets seed + i."),
    "steps": _mapped("num_inference_steps", None, " (A1111's steps; absent: the model's default)"),
    "cfg_scale": _mapped("guidance_scale", None, " (A1111's cfg_scale; absent: the model's default)"),
    "width": _mapped("width", 512),
    "height": _mapped("height", 512),
    "sampler_name": _mapped("sampler_name", None, " On flow-matching models (SD3, FLUX) a sampler the family cannot "
                            "run falls back to Euler (flow matching), and info says so."),
    "batch_size": Field(1, READ, "Images per batch; batch_size x n_iter images in all.", schema=_POSITIVE),
    "n_iter": Field(1, READ, "Batches; they run together, each image in its own job.", schema=_POSITIVE),
    "scheduler": Field("automatic", READ, "automatic (the sampler's own), or Karras for samplers with a Karras "
                       "variant.", schema=_TEXT),
    "sampler_index": Field("Euler", IGNORED, "Deprecated by A1111 for sampler_name.", schema=_TEXT),
    "override_settings": Field({}, READ, "sd_model_checkpoint picks the model; no other setting is accepted.",
                               schema=_OBJECT),
    "model": Field(None, READ, "The model uid (Xinference's field); default: override_settings, then the current "
                   "checkpoint (options).", schema=_TEXT),
    "kwargs": Field(None, READ, "More Kiln generation parameters, as a JSON string or object (Xinference's).",
                    schema={"type": ["string", "object", "null"]}),
    "send_images": Field(True, READ, "false: the response has no images.", schema=_BOOL),
    "disable_extra_networks": Field(False, READ, "true: <lora:...> tags are removed from the prompt and ignored.",
                                    schema=_BOOL),
    "denoising_strength": Field(None, IGNORED, "txt2img: A1111's hires-fix strength; no effect.",
                                schema={"type": ["number", "null"]}),
    "styles": Field([], DEFAULT_ONLY, "Saved prompt styles: none exist here.", schema={"type": "array"}),
    "subseed": Field(-1, IGNORED, "Variation seed (no effect without subseed_strength).", schema=_INT),
    "subseed_strength": Field(0, DEFAULT_ONLY, "Variation seeds are not supported: 0 only.",
                              schema={"type": "number"}),
    "seed_resize_from_h": Field(-1, IGNORED, schema=_INT),
    "seed_resize_from_w": Field(-1, IGNORED, schema=_INT),
    "restore_faces": Field(None, DEFAULT_ONLY, "Face restoration is not supported.", schema=_BOOL),
    "tiling": Field(None, DEFAULT_ONLY, "Seamless tiling is not supported.", schema=_BOOL),
    "do_not_save_samples": Field(False, IGNORED, "Kiln keeps no samples on disk.", schema=_BOOL),
    "do_not_save_grid": Field(False, IGNORED, schema=_BOOL),
    "save_images": Field(False, IGNORED, schema=_BOOL),
    "eta": Field(None, IGNORED, "Sampler noise knobs: each sampler runs with diffusers' settings.",
                 schema={"type": ["number", "null"]}),
    "s_min_uncond": Field(None, IGNORED, schema={"type": ["number", "null"]}),
    "s_churn": Field(None, IGNORED, schema={"type": ["number", "null"]}),
    "s_tmax": Field(None, IGNORED, schema={"type": ["number", "null"]}),
    "s_tmin": Field(None, IGNORED, schema={"type": ["number", "null"]}),
    "s_noise": Field(None, IGNORED, schema={"type": ["number", "null"]}),
    "override_settings_restore_afterwards": Field(True, IGNORED, schema=_BOOL),
    "refiner_checkpoint": Field(None, DEFAULT_ONLY, "Refiners are not supported.", schema=_TEXT),
    "refiner_switch_at": Field(None, IGNORED, schema={"type": ["number", "null"]}),
    "comments": Field(None, IGNORED, schema={"type": ["object", "null"]}),
    "force_task_id": Field(None, IGNORED, schema=_TEXT),
    "infotext": Field(None, IGNORED, schema=_TEXT),
    "script_name": Field(None, DEFAULT_ONLY, "Scripts are not supported.", schema=_TEXT),
    "script_args": Field([], IGNORED, schema={"type": "array"}),
    "alwayson_scripts": Field({}, READ, "Extensions are not supported; entries that only disable one are accepted.",
                              schema=_OBJECT),
    "user": Field(None, IGNORED, schema=_TEXT),
}
TXT2IMG: Mapping[str, Field] = {
    **COMMON,
    "enable_hr": Field(False, DEFAULT_ONLY, "Hires fix is not supported: false only.", schema=_BOOL),
    "firstpass_image": Field(None, DEFAULT_ONLY, schema=_TEXT),
    **{name: Field(default, IGNORED, "Hires fix (off).", schema=schema) for name, default, schema in (
        ("firstphase_width", 0, _INT), ("firstphase_height", 0, _INT), ("hr_scale", 2.0, {"type": "number"}),
        ("hr_upscaler", None, _TEXT), ("hr_second_pass_steps", 0, _INT), ("hr_resize_x", 0, _INT),
        ("hr_resize_y", 0, _INT), ("hr_checkpoint_name", None, _TEXT), ("hr_additional_modules", None, {}),
        ("hr_sampler_name", None, _TEXT), ("hr_scheduler", None, _TEXT), ("hr_prompt", "", _TEXT),
        ("hr_negative_prompt", "", _TEXT), ("hr_cfg", None, {}), ("hr_distilled_cfg", None, {}),
    )},
}
IMG2IMG: Mapping[str, Field] = {
    **COMMON,
    "init_images": Field([], READ, "The input images, as data URIs or plain base64; image i of the request starts "
                         "from init image i modulo their number.", schema={"type": "array", "items": {"type": "string"},
                                                                          "minItems": 1}),
    "denoising_strength": _mapped("strength", 0.75, " (A1111's denoising_strength)"),
    "mask": Field(None, READ, "Inpainting mask (white = repaint), as a data URI or plain base64; resized to the init "
                  "image.", schema=_TEXT),
    "inpainting_mask_invert": Field(0, READ, "1: repaint the black part of the mask instead.",
                                    schema={"enum": [0, 1, True, False]}),
    "include_init_images": Field(False, READ, "Echo init_images and mask in parameters.", schema=_BOOL),
    "resize_mode": Field(0, DEFAULT_ONLY, "0 (just resize to width x height) only.", schema=_INT),
    "image_cfg_scale": Field(None, IGNORED, schema={"type": ["number", "null"]}),
    "mask_blur": Field(None, IGNORED, "Kiln binarises the mask on the latent grid (as diffusers' inpaint pipelines "
                       "do), so no blur is applied.", schema={"type": ["integer", "null"]}),
    "mask_blur_x": Field(4, IGNORED, schema=_INT),
    "mask_blur_y": Field(4, IGNORED, schema=_INT),
    "mask_round": Field(True, IGNORED, schema=_BOOL),
    "inpainting_fill": Field(0, IGNORED, "Kiln inpaints from the original content.", schema=_INT),
    "inpaint_full_res": Field(True, IGNORED, "Kiln inpaints the whole image.", schema=_BOOL),
    "inpaint_full_res_padding": Field(0, IGNORED, schema=_INT),
    "initial_noise_multiplier": Field(None, IGNORED, schema={"type": ["number", "null"]}),
    "latent_mask": Field(None, DEFAULT_ONLY, schema=_TEXT),
}


@dataclass(frozen=True)
class Reading:
    """An A1111 body in Kiln's terms: the fields for `parse_image_request` and what A1111's answer needs."""

    fields: dict[str, Any]  # Kiln parameters, for engine.schema
    count: int  # batch_size x n_iter
    batch_size: int
    model: str | None  # the uid asked for (model or override_settings), None: the current checkpoint
    sampler_requested: str | None
    scheduler: str
    send_images: bool
    init_images: list[str]
    mask: str | None
    invert_mask: bool
    include_init_images: bool


def read_body(body: Mapping[str, Any], fields: Mapping[str, Field], flow: bool) -> Reading:
    """Validate and map one txt2img (TXT2IMG) or img2img (IMG2IMG) body; InvalidRequest naming the field. `flow`:
    the model samples by flow matching (its sampler fallback)."""
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise InvalidRequest(f"unknown field {unknown[0]!r}; A1111's API has no such field (or Kiln does not take it)",
                             unknown[0], "unknown_parameter")
    for name, value in body.items():
        field = fields[name]
        if field.treatment == DEFAULT_ONLY and value not in (field.default, None, "", [], {}, 0, False):
            raise InvalidRequest(f"{name}={_short(value)} is not supported by Kiln ({field.description.rstrip('.')}); "
                                 f"send {field.default!r} or leave it out", name, "unsupported_option")
    _check_scripts(body.get("alwayson_scripts"))
    def value(name: str) -> Any:
        """The body's value, else A1111's default (None for a field this endpoint does not have)."""
        return body[name] if body.get(name) is not None else getattr(fields.get(name), "default", None)

    batch_size, n_iter = _count("batch_size", value("batch_size")), _count("n_iter", value("n_iter"))
    if not isinstance(value("prompt"), str) or not isinstance(value("negative_prompt"), str):
        name = "prompt" if not isinstance(value("prompt"), str) else "negative_prompt"
        raise InvalidRequest(f"{name} must be a string", name)
    prompt, loras = extra_networks(value("prompt"), read_as("disable_extra_networks", to_bool,
                                                            value("disable_extra_networks")))
    negative, _ = extra_networks(value("negative_prompt"), True)  # A1111 reads extra networks in the prompt only
    sampler, requested = _sampler(body.get("sampler_name"), value("scheduler"), flow)
    kiln = {"prompt": prompt, "negative_prompt": negative or None, "seed": value("seed"), "n": batch_size * n_iter,
            "sampler_name": sampler, "kwargs": body.get("kwargs"),
            "lora": [{"name": name, "scale": scale} for name, scale in loras] or None}
    for name, field in fields.items():
        if field.treatment == MAPPED and field.parameter not in kiln and body.get(name) is not None:
            kiln[field.parameter] = body[name]
        elif field.treatment == MAPPED and field.parameter not in kiln and field.default is not None:
            kiln[field.parameter] = field.default
    return Reading(
        fields={key: item for key, item in kiln.items() if item is not None}, count=batch_size * n_iter,
        batch_size=batch_size, model=requested_model(body), sampler_requested=requested,
        scheduler=str(value("scheduler")),
        send_images=read_as("send_images", to_bool, value("send_images")),
        init_images=_images(body.get("init_images")) if "init_images" in fields else [],
        mask=body.get("mask") or None, invert_mask=_invert(body.get("inpainting_mask_invert")),
        include_init_images=read_as("include_init_images", to_bool, value("include_init_images") or False),
    )


# The extra networks of A1111's prompt syntax: <lora:name:weight>, <lyco:...> (LyCORIS, read as LoRA files by
# later A1111 versions too), <hypernet:...>; a fourth part is A1111's separate UNet multiplier.
EXTRA_NETWORK = re.compile(r"<(lora|lyco|hypernet):([^:<>]+)(?::([^:<>]*))?(?::([^<>]*))?>")


def extra_networks(prompt: Any, disabled: bool) -> tuple[Any, list[tuple[str, float]]]:
    """The prompt without its extra-network tags, and the LoRAs they name (name, weight; weight 1 by default),
    for the request's `lora` field (the model's LoRA part checks the names). With disable_extra_networks the tags
    are dropped, as A1111 does. Kiln applies one scale per LoRA to the denoiser and text encoders alike and has
    no hypernetworks, so a separate UNet multiplier or a hypernet tag is a 400."""
    if not isinstance(prompt, str):
        return prompt, []
    tags = EXTRA_NETWORK.findall(prompt)
    if not tags:
        return prompt, []
    stripped = re.sub(r"\s{2,}", " ", EXTRA_NETWORK.sub("", prompt)).strip()
    if disabled:
        return stripped, []
    loras = []
    for kind, name, weight, unet in tags:
        if kind == "hypernet":
            raise InvalidRequest(f"<hypernet:{name}>: Kiln has no hypernetworks; remove the tag, or send "
                                 "disable_extra_networks: true to drop extra-network tags", "prompt",
                                 "unsupported_option")
        if unet.strip():
            raise InvalidRequest(f"<{kind}:{name}:{weight}:{unet}>: Kiln applies one weight per LoRA to the UNet and "
                                 f"text encoders alike; write <{kind}:{name}:{weight}>", "prompt", "unsupported_option")
        try:
            loras.append((name.strip(), float(weight) if weight.strip() else 1.0))
        except ValueError:
            raise InvalidRequest(f"<{kind}:{name}:{weight}>: the weight must be a number", "prompt") from None
    return stripped, loras


def _sampler(name: Any, scheduler: Any, flow: bool) -> tuple[str, str | None]:
    """Kiln's sampler name for A1111's sampler_name + scheduler, and the name asked for (for info)."""
    schedule = scheduler.strip().lower() if isinstance(scheduler, str) else "automatic"
    if schedule not in ("automatic", "", "karras"):
        raise InvalidRequest(f"scheduler {scheduler!r} is not supported; send automatic, or Karras", "scheduler")
    if name is None or name == "":
        return "default", None
    if not isinstance(name, str):
        raise InvalidRequest(f"sampler_name must be a string, got {_short(name)}", "sampler_name")
    kiln = name
    if schedule == "karras" and not name.endswith(" Karras"):
        kiln = f"{name} Karras"
        if kiln not in sampler_names(False):
            raise InvalidRequest(f"scheduler Karras: {name!r} has no Karras variant here; samplers with one: "
                                 f"{', '.join(s[:-7] for s in sampler_names(False) if s.endswith(' Karras'))}",
                                 "scheduler")
    if flow and kiln not in sampler_names(True):
        return "default", name  # the family's own flow-matching sampler; info says so
    return kiln, name


def _count(name: str, value: Any) -> int:
    number = read_as(name, to_int, value)
    if number < 1:
        raise InvalidRequest(f"{name} must be at least 1, got {number}", name)
    return number


def requested_model(body: Mapping[str, Any]) -> str | None:
    """The model uid a body asks for (`model`, else override_settings.sd_model_checkpoint), None for the current
    checkpoint."""
    overrides = body.get("override_settings") or {}
    if not isinstance(overrides, dict):
        raise InvalidRequest("override_settings must be an object", "override_settings")
    other = sorted(set(overrides) - {"sd_model_checkpoint"})
    if other:
        raise InvalidRequest(f"override_settings.{other[0]} is not supported; Kiln takes sd_model_checkpoint only",
                             f"override_settings.{other[0]}", "unsupported_option")
    model = body.get("model") or overrides.get("sd_model_checkpoint") or None
    if model is not None and not isinstance(model, str):
        raise InvalidRequest(f"the model must be a model uid string, got {_short(model)}", "model")
    return model


def _check_scripts(scripts: Any) -> None:
    """Extensions are not run; A1111 clients send `{"ControlNet": {"args": []}}` or `{"ADetailer": {"args":
    [False]}}` to say an extension is off, which is accepted."""
    if scripts in (None, {}):
        return
    if not isinstance(scripts, dict):
        raise InvalidRequest("alwayson_scripts must be an object", "alwayson_scripts")
    for name, entry in scripts.items():
        args = entry.get("args") if isinstance(entry, dict) else None
        if args not in ([], [False], None):
            raise InvalidRequest(f"alwayson_scripts.{name}: extensions are not supported by Kiln; leave it out",
                                 f"alwayson_scripts.{name}", "unsupported_option")


def _images(value: Any) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(item, str) and item for item in value):
        raise InvalidRequest("init_images must be a non-empty list of images (data URIs or plain base64)",
                             "init_images", "missing_parameter" if not value else "invalid_parameter")
    return value


def _invert(value: Any) -> bool:
    if value in (None, 0, 1, True, False):
        return bool(value)
    raise InvalidRequest(f"inpainting_mask_invert must be 0 or 1, got {_short(value)}", "inpainting_mask_invert")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --- the answer ------------------------------------------------------------------------------------------------
def parameters(body: Mapping[str, Any], fields: Mapping[str, Field], include_init_images: bool) -> dict[str, Any]:
    """A1111's `parameters`: the request with its defaults filled in; the input images only when asked."""
    echoed = {name: field.default for name, field in fields.items()}
    echoed.update(body)
    if "init_images" in fields and not include_init_images:
        echoed["init_images"], echoed["mask"] = None, None
    return echoed


@dataclass(frozen=True)
class Run:
    """What ran, for `info`: the parsed request's values and the images' seeds."""

    prompt: str
    negative_prompt: str
    seeds: list[int]
    width: int
    height: int
    steps: int
    cfg_scale: float
    sampler_name: str  # A1111's name of what ran
    scheduler: str
    model_name: str
    model_hash: str
    batch_size: int
    denoising_strength: float | None
    extra: Mapping[str, Any]
    timestamp: str
    version: str


def info(run: Run) -> str:
    """A1111's `info`: a JSON *string* (clients json.loads it) with the seeds and the infotext of each image."""
    texts = [infotext(run, seed) for seed in run.seeds]
    return json.dumps({
        "prompt": run.prompt, "all_prompts": [run.prompt] * len(run.seeds), "negative_prompt": run.negative_prompt,
        "all_negative_prompts": [run.negative_prompt] * len(run.seeds), "seed": run.seeds[0] if run.seeds else -1,
        "all_seeds": run.seeds, "subseed": -1, "all_subseeds": [-1] * len(run.seeds), "subseed_strength": 0,
        "width": run.width, "height": run.height, "sampler_name": run.sampler_name, "scheduler": run.scheduler,
        "cfg_scale": run.cfg_scale, "steps": run.steps, "batch_size": run.batch_size, "restore_faces": False,
        "face_restoration_model": None, "sd_model_name": run.model_name, "sd_model_hash": run.model_hash,
        "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": run.denoising_strength, "extra_generation_params": dict(run.extra),
        "index_of_first_image": 0, "infotexts": texts, "styles": [], "job_timestamp": run.timestamp,
        "clip_skip": 1, "is_using_inpainting_conditioning": False, "version": run.version,
    })


def infotext(run: Run, seed: int) -> str:
    """A1111's one-paragraph description of an image (what its PNGs carry as `parameters`)."""
    lines = [run.prompt] + ([f"Negative prompt: {run.negative_prompt}"] if run.negative_prompt else [])
    facts = {"Steps": run.steps, "Sampler": run.sampler_name, "Schedule type": run.scheduler,
             "CFG scale": run.cfg_scale, "Seed": seed, "Size": f"{run.width}x{run.height}",
             "Model hash": run.model_hash, "Model": run.model_name, "Denoising strength": run.denoising_strength,
             **run.extra, "Version": run.version}
    lines.append(", ".join(f"{key}: {value}" for key, value in facts.items() if value is not None))
    return "\n".join(lines)
