"""AUTOMATIC1111's API (`/sdapi/v1/*`), as Dify's Stable Diffusion tool and the `webuiapi` client use it, served
by Kiln's engine: txt2img, img2img (init images, mask), options (the current checkpoint), sd-models, samplers,
progress, interrupt, scripts.

An A1111 call of batch_size x n_iter images becomes that many one-image requests with seeds seed, seed+1, ...
(A1111's numbering), submitted together, so they share the model's denoising steps like any other requests, and
an interrupted call still answers with the images that finished (A1111 does the same). The body is mapped onto
Kiln's request schema by `server.a1111`; every check is the schema's, and nothing is queued until all pass.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hashlib
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageOps
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from kiln.engine.catalogue import IMAGE2IMAGE, INPAINTING, TEXT2IMAGE, ModelSpec
from kiln.engine.coerce import Unparsable, to_bool
from kiln.engine.endpoint import ModelEndpoint
from kiln.engine.errors import RequestAborted
from kiln.engine.images import encode
from kiln.engine.requests import GeneratedImage, RequestHandle, draw_seeds
from kiln.engine.samplers import sampler_names
from kiln.engine.schema import parse_image_request

from .. import a1111
from ..errors import ApiError, bad_request
from . import context
from .bodies import read_json_object
from .images import read_upload
from .waiting import ClientGone, client_gone_response, result_or_cancel

PREVIEWS = 3  # previews taken per image while it denoises: progress's current_image
VERSION = "kiln"


@dataclass
class Job:
    """One A1111 call in flight: its one-image requests and the latest preview any of them produced."""

    runner: ModelEndpoint
    handles: list[RequestHandle]
    steps: int
    started: float = field(default_factory=time.monotonic)
    timestamp: str = field(default_factory=lambda: time.strftime("%Y%m%d%H%M%S"))
    interrupted: bool = False
    preview: Image.Image | None = None

    def on_preview(self, index: int, number: int, image: Image.Image) -> None:
        self.preview = image  # from the scheduler thread; one reference swap

    @property
    def progress(self) -> float:
        return sum(handle.progress for handle in self.handles) / len(self.handles) if self.handles else 0.0

    def stop(self) -> None:
        for handle in self.handles:
            self.runner.abort(handle.request.request_id)


@dataclass
class SdapiState:
    """A1111's server-wide state: the checkpoint `options` set (None: the first ready image model) and the calls
    in flight, oldest first (what `progress` shows and `interrupt` stops)."""

    checkpoint: str | None = None
    jobs: list[Job] = field(default_factory=list)


# --- generation ------------------------------------------------------------------------------------------------
async def txt2img(request: Request) -> Response:
    return await _generate(request, a1111.TXT2IMG)


async def img2img(request: Request) -> Response:
    return await _generate(request, a1111.IMG2IMG)


async def _generate(request: Request, table: dict) -> Response:
    body = await read_json_object(request)
    image2image = table is a1111.IMG2IMG
    ability = (INPAINTING if body.get("mask") else IMAGE2IMAGE) if image2image else TEXT2IMAGE
    runner = _model(request, a1111.requested_model(body), ability)
    spec: ModelSpec = runner.spec
    reading = a1111.read_body(body, table, spec.family.flow)
    # Image i starts from init image i modulo their number: those past the image count are never used (nor read).
    images = [await _image(request, data, f"init_images[{i}]")
              for i, data in enumerate(reading.init_images[:reading.count])]
    mask = await _mask(request, reading, images[0]) if reading.mask else None
    parsed = parse_image_request(spec, reading.fields, limits=context.settings(request).limits, mode=ability,
                                 default_size=(512, 512), prompt_required=False,
                                 image=images[0] if images else None, mask=mask)
    first = parsed.request
    seeds = draw_seeds(first.seed, reading.count)
    requests = [dataclasses.replace(first, n=1, seed=seed, image=images[i % len(images)] if images else None,
                                    request_id=f"{first.request_id}-{i}", preview_count=min(PREVIEWS, first.steps - 1))
                for i, seed in enumerate(seeds)]
    job = Job(runner, [], first.steps)
    try:
        for item in requests:
            job.handles.append(runner.submit(item, on_preview=job.on_preview))
    except Exception:
        job.stop()  # nothing of a refused call stays queued
        raise
    state = context.sdapi(request)
    state.jobs.append(job)
    try:
        await result_or_cancel(request, _all_done(job.handles), job.stop)
    except ClientGone:
        return client_gone_response()
    finally:
        state.jobs.remove(job)
    finished = _finished(job)
    data = await asyncio.to_thread(lambda: [base64.b64encode(encode(item.image, "png")).decode() for item in finished])
    run = a1111.Run(
        prompt=first.prompt, negative_prompt=first.negative_prompt or "", seeds=[item.seed for item in finished],
        width=first.width, height=first.height, steps=first.steps, cfg_scale=first.guidance_scale,
        sampler_name=_sampler_ran(spec, reading, first.sampler), scheduler=reading.scheduler, model_name=spec.name,
        model_hash=_checkpoint(runner)["hash"], batch_size=reading.batch_size,
        denoising_strength=first.strength if image2image else None, extra=_extra(spec, reading, job),
        timestamp=job.timestamp, version=VERSION,
    )
    return JSONResponse({"images": data if reading.send_images else [],
                         "parameters": a1111.parameters(body, table, reading.include_init_images),
                         "info": a1111.info(run)})


def _all_done(handles: list[RequestHandle]) -> Future:
    """A future that completes once every handle's future has (whatever their outcomes)."""
    done: Future = Future()
    remaining = [len(handles)]

    def one_done(_: Future) -> None:
        remaining[0] -= 1
        if remaining[0] == 0:
            done.set_result(None)

    for handle in handles:
        handle.future.add_done_callback(one_done)
    return done


def _finished(job: Job) -> list[GeneratedImage]:
    """The images, in order; an interrupted call keeps those that finished (409 when none did). Any other failure
    is raised as it is."""
    images, aborted = [], None
    for handle in job.handles:
        error = handle.future.exception()
        if error is None:
            images.extend(handle.future.result())
        elif isinstance(error, RequestAborted):
            aborted = error
        else:
            raise error
    if aborted is not None and not (job.interrupted and images):
        if job.interrupted:
            raise ApiError(409, "interrupted (POST /sdapi/v1/interrupt) before any image finished",
                           code="request_aborted")
        raise aborted
    return images


def _sampler_ran(spec: ModelSpec, reading: a1111.Reading, kiln_name: str) -> str:
    """A1111's name of the sampler that ran: flow-matching families run Euler (flow matching)."""
    if spec.family.flow:
        return "Euler"
    return reading.sampler_requested or kiln_name


def _extra(spec: ModelSpec, reading: a1111.Reading, job: Job) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    requested = reading.sampler_requested
    if spec.family.flow and requested is not None and requested not in sampler_names(True):
        extra["Sampler fallback"] = (f"{requested} cannot run on {spec.name} (flow matching); Euler (flow matching) "
                                     "ran")
    if job.interrupted:
        extra["Interrupted"] = True
    return extra


async def _image(request: Request, data: str, field_name: str, mode: str = "RGB") -> Image.Image:
    """A data URI (`data:image/png;base64,...`) or plain base64, decoded within the upload bounds."""
    text = data.split(",", 1)[1] if data.startswith("data:") and "," in data else data
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{field_name} is not base64 (send a data URI or plain base64 of a PNG or JPEG)",
                          field_name) from None
    return await read_upload(request, raw, field_name, mode)


async def _mask(request: Request, reading: a1111.Reading, image: Image.Image) -> Image.Image:
    """White repaints (black with inpainting_mask_invert); resized to the init image, as A1111 does."""
    mask = await _image(request, reading.mask, "mask", mode="L")
    if mask.size != image.size:
        mask = mask.resize(image.size, Image.Resampling.LANCZOS)
    return ImageOps.invert(mask) if reading.invert_mask else mask


# --- models and options ----------------------------------------------------------------------------------------
def _image_models(request: Request) -> list[ModelEndpoint]:
    return [runner for runner in context.registry(request).runners() if isinstance(runner.spec, ModelSpec)]


def _current(request: Request) -> ModelEndpoint | None:
    """The checkpoint options set while it still runs, else the first ready image model."""
    models = _image_models(request)
    chosen = context.sdapi(request).checkpoint
    return next((r for r in models if r.uid == chosen), None) or next((r for r in models if r.status == "ready"),
                                                                      None)


def _model(request: Request, uid: str | None, ability: str) -> ModelEndpoint:
    registry = context.registry(request)
    if uid is None:
        current = _current(request)
        if current is not None and ability in current.spec.abilities:
            uid = current.uid
    return registry.pick(uid, ability)


def _checkpoint(runner: ModelEndpoint) -> dict[str, Any]:
    """A1111's sd-models item. Its hash identifies the launched model (uid, name, weights location), not the
    weights' bytes: hashing gigabytes to list models is not worth it."""
    launch = runner.describe().get("launch_options", {})
    filename = launch.get("model_path") or runner.spec.hub_id
    digest = hashlib.sha256(f"{runner.uid}\n{runner.spec.name}\n{filename}".encode()).hexdigest()
    return {"title": runner.uid, "model_name": runner.uid, "hash": digest[:10], "sha256": digest,
            "filename": filename, "config": None}


def _options(request: Request) -> dict[str, Any]:
    current = _current(request)
    described = _checkpoint(current) if current is not None else None
    return {"sd_model_checkpoint": described["title"] if described else None,
            "sd_checkpoint_hash": described["sha256"] if described else None, "samples_format": "png"}


async def get_options(request: Request) -> Response:
    return JSONResponse(_options(request))


async def set_options(request: Request) -> Response:
    """Only sd_model_checkpoint can be set: a launched image model's uid (503 while it loads). Answers the options
    as they now are."""
    body = await read_json_object(request)
    other = sorted(set(body) - {"sd_model_checkpoint"})
    if other:
        raise bad_request(f"option {other[0]!r} cannot be set here; Kiln's A1111 options: sd_model_checkpoint",
                          other[0], "unsupported_option")
    uid = body.get("sd_model_checkpoint")
    titles = [runner.uid for runner in _image_models(request)]
    if not isinstance(uid, str) or uid not in titles:
        raise bad_request(f"sd_model_checkpoint {uid!r} is not a launched image model; launched: {titles}",
                          "sd_model_checkpoint", "model_not_found")
    context.registry(request).ready(context.registry(request).runner(uid))
    context.sdapi(request).checkpoint = uid
    return JSONResponse(_options(request))


async def sd_models(request: Request) -> Response:
    return JSONResponse([_checkpoint(runner) for runner in _image_models(request)])


async def samplers(request: Request) -> Response:
    """Every sampler name Kiln runs (flow-matching models fall back to Euler for the others)."""
    return JSONResponse([{"name": name, "aliases": [], "options": {}} for name in sampler_names(False)
                         if name != "default"])


async def scripts(request: Request) -> Response:
    """No scripts or extensions (A1111 clients ask at start-up)."""
    return JSONResponse({"txt2img": [], "img2img": []})


# --- progress and interrupt ------------------------------------------------------------------------------------
async def progress(request: Request) -> Response:
    """A1111's progress of the oldest call in flight (all zero when idle), with its latest preview as
    current_image unless skip_current_image=true."""
    try:
        skip = to_bool(request.query_params.get("skip_current_image", "false"))
    except Unparsable:
        raise bad_request("skip_current_image must be true or false", "skip_current_image") from None
    jobs = context.sdapi(request).jobs
    job = jobs[0] if jobs else None
    done = job.progress if job else 0.0
    elapsed = time.monotonic() - job.started if job else 0.0
    image = None
    if job is not None and job.preview is not None and not skip:
        preview = job.preview
        image = await asyncio.to_thread(lambda: base64.b64encode(encode(preview, "png")).decode())
    state = {"skipped": False, "interrupted": bool(job and job.interrupted), "stopping_generation": False,
             "job": f"task({job.timestamp})" if job else "", "job_count": len(jobs),
             "job_timestamp": job.timestamp if job else "0", "job_no": 0,
             "sampling_step": round(done * job.steps) if job else 0, "sampling_steps": job.steps if job else 0}
    return JSONResponse({"progress": done, "eta_relative": elapsed / done - elapsed if done > 0 else 0.0,
                         "state": state, "current_image": image, "textinfo": None})


async def interrupt(request: Request) -> Response:
    """Stop every A1111 call in flight at its next step; each answers with the images already finished."""
    for job in context.sdapi(request).jobs:
        job.interrupted = True
        job.stop()
    return JSONResponse({})
