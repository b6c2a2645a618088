"""LoRA: every tiny LoRA changes the image; per-row images equal diffusers' set_adapters and fused ones its
fuse_lora; rows with different LoRAs share forwards and each image equals its solo one; nothing leaks to rows
without LoRA; a job waits for its slot; lora_dir and bad files fail the way the issue says."""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from kiln.engine.catalogue import get_spec
from kiln.engine.errors import InvalidRequest, ModelLoadError
from kiln.engine.options import parse_launch_options
from kiln.engine.requests import ImageRequest
from kiln.engine.runner import Runner
from kiln.engine.tiny import tiny_checkpoint, tiny_lora_recipes

from .conftest import FAMILY_MODELS, PIXEL_TOLERANCE, drive, make_runner, max_diff, pixels, run_alone
from .test_equivalence import diffusers_image

SD = FAMILY_MODELS["sd"]
# The catalogue quantizes SD3's and FLUX's T5 to 8 bits; diffusers' reference pipelines load it in float32.
UNQUANTIZED = {"quantize_text_encoder": ""}


def lora_list(folder, *names) -> list[dict]:
    return [{"lora_name": name, "local_path": str(folder / f"{name}.safetensors")} for name in names]


def with_loras(*pairs: tuple[str, float]) -> dict:
    """A request's part inputs asking for these (name, scale) LoRAs."""
    return {"lora": {"lora": [{"name": name, "scale": scale} for name, scale in pairs]}}


@pytest.fixture(scope="module")
def lora_runner(tiny_lora_dir):
    """A stepped per-row runner per (model, options) with every tiny LoRA of the model registered, none by
    default; shared by the module."""
    runners = {}

    def get(name: str, **options):
        key = (name, json.dumps(options, sort_keys=True))
        if key not in runners:
            folder = tiny_lora_dir(name)
            launch = {"peft_model_config": {"lora_list": lora_list(folder, *tiny_lora_recipes(name))},
                      "max_loras": 4, "lora_default": "none", **UNQUANTIZED, **options}
            runners[key] = make_runner(name, **launch)
        return runners[key]

    yield get
    for runner in runners.values():
        runner.close()


def request(prompt="a lighthouse", steps=4, guidance=None, seed=5, loras=(), name=SD, **fields) -> ImageRequest:
    spec = get_spec(name)
    guidance = spec.default_guidance if guidance is None else guidance
    return ImageRequest(prompt, 64, 64, steps, guidance, seed=seed, part_inputs=with_loras(*loras) if loras else {},
                        **fields)


def drive_loading(runner, handle, seconds=120.0):
    """Iterate a stepped runner until the request ends, sleeping while a LoRA is read in the background."""
    deadline = time.monotonic() + seconds
    while not handle.future.done():
        assert time.monotonic() < deadline, "the request did not finish"
        runner.iterate()
        time.sleep(0.005)


def lora_part(runner):
    return next(part for part in runner.parts if part.name == "lora")


def reference_pipeline(tiny_root, tiny_lora_dir, name, loras, fuse_scale=None):
    """diffusers' own pipeline on the tiny checkpoint with the LoRAs loaded: set_adapters(names, weights), or
    fuse_lora(lora_scale) over them at weight 1."""
    pipeline = DiffusionPipeline.from_pretrained(tiny_checkpoint(name, tiny_root))
    pipeline.set_progress_bar_config(disable=True)
    folder = tiny_lora_dir(name)
    for lora, _ in loras:
        pipeline.load_lora_weights(str(folder / f"{lora}.safetensors"), adapter_name=lora)
    if fuse_scale is None:
        pipeline.set_adapters([lora for lora, _ in loras], [scale for _, scale in loras])
    else:
        pipeline.fuse_lora(lora_scale=fuse_scale)
    return pipeline


def reference_image(pipeline, name, steps=4, seed=5, prompt="a lighthouse"):
    spec = get_spec(name)
    return diffusers_image(pipeline, "default", spec.family.flow, seed, prompt=prompt, height=64, width=64,
                           num_inference_steps=steps, guidance_scale=spec.default_guidance)


# --- the tiny LoRAs are real ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(FAMILY_MODELS.values()))
def test_every_tiny_lora_is_random_and_changes_the_image(lora_runner, tiny_lora_dir, name):
    """peft's default init (B = 0) would make every LoRA test pass vacuously: each file's up/B weights are
    non-zero, each LoRA alone moves the image far beyond the tolerance, and the text-encoder LoRA, which has no
    denoiser weights, does so through the prompt encoding alone."""
    runner = lora_runner(name)
    base = pixels(run_alone(runner, request(name=name)))
    part = lora_part(runner)
    for lora in tiny_lora_recipes(name):
        weights = load_file(tiny_lora_dir(name) / f"{lora}.safetensors")
        ups = [t for key, t in weights.items() if any(up in key for up in ("lora_B", "lora_up", ".up."))]
        assert ups and all(t.abs().max() > 0 for t in ups), lora
        changed = pixels(run_alone(runner, request(name=name, loras=[(lora, 1.0)])))
        assert max_diff(changed, base) > 10 * PIXEL_TOLERANCE, lora
        assert np.abs(changed - base).mean() > 1.0, lora
    text = part.slots.by_name["text"]
    assert text.components and get_spec(name).family.denoiser not in text.components


# --- equivalence with diffusers --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(FAMILY_MODELS.values()))
def test_per_row_matches_diffusers_set_adapters(lora_runner, tiny_root, tiny_lora_dir, name):
    """Three stacked LoRAs (one negative, one only in the text encoders) at their own scales."""
    loras = [("style", 0.7), ("detail", -0.5), ("text", 1.2)]
    kiln = pixels(run_alone(lora_runner(name), request(name=name, loras=loras)))
    reference = reference_image(reference_pipeline(tiny_root, tiny_lora_dir, name, loras), name)
    assert max_diff(kiln, reference) <= PIXEL_TOLERANCE


def test_kohya_file_matches_diffusers(lora_runner, tiny_root, tiny_lora_dir):
    """A kohya/A1111-keyed SD1.5 file (UNet and text encoder) is read by diffusers' conversion like diffusers."""
    loras = [("kohya", 0.8)]
    kiln = pixels(run_alone(lora_runner(SD), request(loras=loras)))
    reference = reference_image(reference_pipeline(tiny_root, tiny_lora_dir, SD, loras), SD)
    assert max_diff(kiln, reference) <= PIXEL_TOLERANCE


def test_xlabs_flux_file_matches_diffusers(lora_runner, tiny_root, tiny_lora_dir):
    """An XLabs-keyed FLUX file (shared q/k/v down weights, both attention streams of every double block) is
    read by diffusers' conversion like diffusers, per row beside a diffusers-format LoRA."""
    flux = FAMILY_MODELS["flux"]
    loras = [("xlabs", 0.9), ("detail", 0.5)]
    kiln = pixels(run_alone(lora_runner(flux), request(name=flux, loras=loras)))
    reference = reference_image(reference_pipeline(tiny_root, tiny_lora_dir, flux, loras), flux)
    assert max_diff(kiln, reference) <= PIXEL_TOLERANCE


@pytest.mark.parametrize("name", [SD, FAMILY_MODELS["flux"]])
def test_fused_mode_matches_diffusers_fuse_lora(tiny_root, tiny_lora_dir, name):
    """Xinference's way (max_loras 0): load_lora_weights of the launch list, then fuse_lora(lora_scale=0.8) over
    the mixin's default components (FLUX's: the transformer alone, its text-encoder LoRA stays at 1.0). Both
    merge in float32; the tolerance is the same 2/255 (measured: 0-1)."""
    runner = make_runner(name, peft_model_config={"lora_list": lora_list(tiny_lora_dir(name), "style", "text"),
                                                  "image_lora_fuse_kwargs": {"lora_scale": 0.8}}, **UNQUANTIZED)
    try:
        kiln = pixels(run_alone(runner, request(name=name)))
        reference = reference_image(reference_pipeline(tiny_root, tiny_lora_dir, name, [("style", 1), ("text", 1)],
                                                       fuse_scale=0.8), name)
        assert max_diff(kiln, reference) <= PIXEL_TOLERANCE
        assert runner.describe()["lora"]["mode"] == "fused"
        same = run_alone(runner, request(name=name, loras=[("text", 0.8), ("style", 0.8)]))  # the default, reordered
        assert max_diff(pixels(same), kiln) == 0
        for other in ([], [("style", 1.0)]):
            with pytest.raises(InvalidRequest, match="fused.*max_loras of 1 or more and backend eager or compile"):
                runner.submit(ImageRequest("x", 64, 64, 2, 0.0, part_inputs={"lora": {"lora": other}}))
    finally:
        runner.close()


# --- batch invariance and isolation -----------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(FAMILY_MODELS))
def test_same_image_alone_and_beside_other_loras(lora_runner, family):
    """Neighbours that differ in LoRA, scale, stacking and text-encoder LoRA (and none) join at different steps
    of the target; every image equals its solo image, and they really shared forwards."""
    name = FAMILY_MODELS[family]
    runner = lora_runner(name)
    target = lambda: request("a lighthouse on a cliff", 6, seed=1234, name=name,  # noqa: E731
                             loras=[("style", 0.8), ("text", 1.0)])
    neighbours = [
        request("a stormy sea", 7, seed=99, name=name, loras=[("detail", 1.5)]),
        request("an old man", 3, seed=5, name=name),
        request("a red car", 5, seed=41, name=name, loras=[("style", -1.0), ("detail", 0.5)]),
        # The target's prompt under another text-encoder LoRA scale, encoded beside the target's.
        request("a lighthouse on a cliff", 4, seed=8, name=name, loras=[("text", 2.0)]),
    ]
    alone = run_alone(runner, target())
    forwards = dict(runner.counters.forward_rows)
    first = runner.submit(neighbours[0])
    runner.iterate()
    runner.iterate()
    handle = runner.submit(target())
    runner.iterate()
    second = runner.submit(neighbours[1])
    runner.iterate()
    rest = [runner.submit(neighbour) for neighbour in neighbours[2:]]
    handles = [first, second, *rest]
    drive(runner, lambda: all(h.future.done() for h in (handle, *handles)))
    assert max_diff(pixels(alone), pixels(handle)) <= PIXEL_TOLERANCE
    for neighbour, batched in zip(neighbours, handles):
        assert max_diff(pixels(run_alone(runner, neighbour)), pixels(batched)) <= PIXEL_TOLERANCE
    rows_per_job = get_spec(name).family.rows_per_job
    shared = {rows for rows, count in runner.counters.forward_rows.items() if count > forwards.get(rows, 0)}
    assert max(shared) >= 4 * rows_per_job  # at least four jobs with different LoRAs in one forward


def test_the_prompt_cache_keys_on_text_encoder_loras(lora_runner):
    """One prompt and seed, cached without LoRA first, then encoded for two jobs admitted together under the
    text-encoder LoRA at two scales: three different images (a cache keyed on the text alone would hand both
    jobs the plain embeddings)."""
    runner = lora_runner(SD)
    plain = pixels(run_alone(runner, request("a red barn", seed=3)))
    handles = [runner.submit(request("a red barn", seed=3, loras=[("text", scale)])) for scale in (1.0, 2.0)]
    drive(runner, lambda: all(h.future.done() for h in handles))
    images = [plain, *(pixels(h) for h in handles)]
    for first in range(3):
        for second in range(first + 1, 3):
            assert max_diff(images[first], images[second]) > 10 * PIXEL_TOLERANCE, (first, second)


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_a_row_without_lora_is_untouched_by_strong_neighbours(lora_runner, runner_for, family):
    """The leak test: a job without LoRA gives the image of a model launched without LoRAs, alone or beside
    neighbours carrying strong stacked LoRAs (slot 0 adds exact zeros)."""
    name = FAMILY_MODELS[family]
    runner = lora_runner(name)
    plain = pixels(run_alone(runner_for(name, **UNQUANTIZED), request("a quiet harbour", 5, seed=77, name=name)))
    alone = pixels(run_alone(runner, request("a quiet harbour", 5, seed=77, name=name)))
    assert max_diff(plain, alone) == 0
    strong = [request("noise", 5, seed=s, name=name, loras=[("style", 10.0), ("detail", -10.0), ("text", 10.0)])
              for s in (1, 2, 3)]
    handles = [runner.submit(r) for r in strong]
    handle = runner.submit(request("a quiet harbour", 5, seed=77, name=name))
    drive(runner, lambda: all(h.future.done() for h in (handle, *handles)))
    assert max_diff(pixels(handle), alone) <= PIXEL_TOLERANCE


def test_loras_and_controlnets_share_forwards(tiny_lora_dir):
    """One model launched with a ControlNet and per-row LoRAs: jobs with a LoRA, a ControlNet unit, both, or
    neither share forwards; each image equals its solo image, and LoRA and ControlNet each change it."""
    from kiln.engine.controlnet_units import ControlUnit, complete_units, part_inputs

    from .test_controlnet import control_image

    runner = make_runner(SD, controlnet=("canny",), max_loras=2, lora_default="none",
                         peft_model_config={"lora_list": lora_list(tiny_lora_dir(SD), "style", "text")})
    try:
        unit = part_inputs(complete_units([ControlUnit("canny", control_image(0))], {}, ["canny"]))

        def job(seed, lora=False, control=False):
            inputs = {**(with_loras(("style", 0.9), ("text", 0.6)) if lora else {}), **(unit if control else {})}
            return ImageRequest("a fox", 64, 64, 4, 7.5, seed=seed, part_inputs=inputs)

        kinds = [(False, False), (True, False), (False, True), (True, True)]
        alone = [pixels(run_alone(runner, job(3, *kind))) for kind in kinds]
        for first in range(4):
            for second in range(first + 1, 4):
                assert max_diff(alone[first], alone[second]) > 10 * PIXEL_TOLERANCE, (kinds[first], kinds[second])
        forwards = dict(runner.counters.forward_rows)
        handles = [runner.submit(job(3, *kind)) for kind in kinds]
        drive(runner, lambda: all(h.future.done() for h in handles))
        assert all(max_diff(pixels(h), image) <= PIXEL_TOLERANCE for h, image in zip(handles, alone))
        shared = {rows for rows, count in runner.counters.forward_rows.items() if count > forwards.get(rows, 0)}
        assert max(shared) == 8  # the four jobs' CFG rows in one forward
        assert runner.describe()["lora"]["mode"] == "per-row" and runner.describe()["controlnet"]
    finally:
        runner.close()


# --- residency ----------------------------------------------------------------------------------------------------
def test_a_job_waits_for_its_slot_and_never_starts_without_it(tiny_lora_dir):
    """One slot: a job with another LoRA waits while the slot's LoRA runs (jobs without LoRA pass it), then
    gets the slot and the image it gets alone."""
    runner = make_runner(SD, peft_model_config={"lora_list": lora_list(tiny_lora_dir(SD), "style", "detail")},
                         max_loras=1, max_loras_per_request=1, lora_default="none")
    try:
        part = lora_part(runner)
        assert runner.describe()["lora"]["resident"] == ["style"]
        first = runner.submit(request(steps=6, loras=[("style", 1.0)]))
        runner.iterate()
        waiting = runner.submit(request(steps=3, seed=9, loras=[("detail", 1.0)]))
        plain = runner.submit(request(steps=3, seed=10))
        runner.iterate()
        assert waiting.progress == 0 and plain.progress > 0 and runner.queue_depth == 1
        assert part.slots.resident == ["style"]
        drive(runner, lambda: first.future.done())
        drive(runner, lambda: waiting.future.done())
        assert part.slots.resident == ["detail"]
        metrics = {name: value for name, _, value in runner.stats().extra}
        assert metrics["kiln_lora_slot_waits_total"] == 1 and metrics["kiln_lora_loads_total"] >= 2
        assert metrics["kiln_lora_resident"] == 1 and metrics["kiln_lora_load_seconds_total"] > 0
        solo = run_alone(runner, request(steps=3, seed=9, loras=[("detail", 1.0)]))
        assert max_diff(pixels(solo), pixels(waiting)) == 0
    finally:
        runner.close()


def test_lora_dir_loads_on_first_use_and_refuses_what_does_not_fit(tiny_lora_dir, tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    shutil.copy(tiny_lora_dir(SD) / "style.safetensors", folder / "pixel.safetensors")
    shutil.copy(tiny_lora_dir(FAMILY_MODELS["sdxl"]) / "style.safetensors", folder / "foreign.safetensors")
    (folder / "broken.safetensors").write_bytes(b"not a safetensors file")
    outside = tmp_path / "outside.safetensors"
    shutil.copy(tiny_lora_dir(SD) / "detail.safetensors", outside)
    (folder / "escape.safetensors").symlink_to(outside)
    runner = make_runner(SD, peft_model_config={"lora_list": lora_list(tiny_lora_dir(SD), "style")}, max_loras=2,
                         lora_dir=str(folder), lora_default="none")
    try:
        registered = runner.describe()["lora"]["registered"]
        assert registered[0] == "style" and {"pixel", "broken", "foreign"} <= set(registered)
        from_dir = runner.submit(request(loras=[("pixel", 0.9)]))  # parsed in the background, then run
        drive_loading(runner, from_dir)
        listed = run_alone(runner, request(loras=[("style", 0.9)]))
        assert max_diff(pixels(from_dir), pixels(listed)) == 0
        assert "pixel" in runner.describe()["lora"]["resident"]
        broken = runner.submit(request(loras=[("broken", 1.0)]))
        drive_loading(runner, broken)
        with pytest.raises(InvalidRequest, match="broken.safetensors"):
            broken.result()
        with pytest.raises(InvalidRequest, match="broken.safetensors"):  # known now: refused at submit
            runner.submit(request(loras=[("broken", 1.0)]))
        foreign = runner.submit(request(loras=[("foreign", 1.0)]))
        drive_loading(runner, foreign)
        with pytest.raises(InvalidRequest, match=r"foreign.safetensors.*unet\.\S+.*another base model"):
            foreign.result()
        for name, words in (("nothing", "unknown LoRA 'nothing'; available: style, "), ("escape", "unknown LoRA"),
                            ("../outside", "path separators")):
            with pytest.raises(InvalidRequest, match=words):
                runner.submit(request(loras=[(name, 1.0)]))
        with pytest.raises(InvalidRequest, match="at most 2 per request"):  # max_loras bounds it too
            runner.submit(request(loras=[("style", 1), ("pixel", 1), ("broken", 1), ("foreign", 1)]))
    finally:
        runner.close()


@pytest.mark.parametrize(("file", "options", "words"), [
    ("foreign", {}, r"foreign\.safetensors.*(does not fit|does not have).*another base model"),
    ("broken", {}, "broken.safetensors.*cannot be read"),
    ("style", {"max_lora_rank": 2}, "rank 4, above max_lora_rank 2"),
    ("style", {"backend": "onnx"}, "per-row LoRAs .* run on eager or compile"),
    ("style", {"max_loras": 200_000}, r"per-row LoRA slots need [\d.]+ GiB \(200001 slots.*lower max_loras"),
    ("text", {"quantize_text_encoder": "text_encoder"}, r"text_encoder\.\S+, a Linear8bitLt layer, which takes no "
     "LoRA.*without quantizing text_encoder"),
])
def test_launch_refuses_loras_that_cannot_run(tiny_lora_dir, tmp_path, file, options, words):
    sources = {name: tiny_lora_dir(SD) / f"{name}.safetensors" for name in ("style", "text")}
    sources["foreign"] = tiny_lora_dir("sd-turbo") / "style.safetensors"
    path = tmp_path / f"{file}.safetensors"
    if file in sources:
        shutil.copy(sources[file], path)
    else:
        path.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match=words):
        make_runner(SD, peft_model_config={"lora_list": [{"lora_name": file, "local_path": str(path)}]},
                    **{"max_loras": 2, **options})


def test_fused_onnx_runs_the_fused_weights_and_keys_its_cache_on_them(tiny_lora_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_ENGINE_CACHE", str(tmp_path / "engines"))
    config = {"lora_list": lora_list(tiny_lora_dir(SD), "style")}
    onnx = make_runner(SD, peft_model_config=config, backend="onnx")
    eager = make_runner(SD, peft_model_config=config)
    try:
        assert onnx.backend_info["backend"] == "onnx"
        assert max_diff(pixels(run_alone(onnx, request())), pixels(run_alone(eager, request()))) <= PIXEL_TOLERANCE
        metas = tmp_path.glob("engines/**/meta.json")
        keys = [json.loads(meta.read_text())["key"]["parts"]["weights"] for meta in metas]
        assert keys and all("+lora-" in key for key in keys)
    finally:
        onnx.close()
        eager.close()


# --- compile -----------------------------------------------------------------------------------------------------
def test_compiled_per_row_matches_eager_without_recompiling_on_swaps(tiny_lora_dir, monkeypatch):
    """Slots are buffers and the selection tensors: new rows, scales and a slot swapped to another LoRA run on
    the graphs compiled at warm-up (dynamo's graph capture decides recompiles whatever compiles the graphs; the
    cheap 'eager' compiler keeps this in seconds)."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("KILN_COMPILE_BACKEND", "eager")
    config = {"lora_list": lora_list(tiny_lora_dir(SD), "style", "detail", "text")}
    options = dict(peft_model_config=config, max_loras=1, max_loras_per_request=1, lora_default="none",
                   max_batch_size=2)
    compiled = Runner(SD, get_spec(SD), parse_launch_options(get_spec(SD), {"tiny": True, "backend": "compile",
                                                                           **options}))
    compiled.load(start=False, warmup_size=(64, 64))  # every bucket of the 64x64 lane compiled here
    eager = make_runner(SD, **options)
    try:
        graphs = counters["stats"]["unique_graphs"]
        with torch._dynamo.config.patch(error_on_recompile=True):
            for loras in ([("style", 0.6)], [], [("detail", 1.3)], [("text", 1.0)], [("style", -1.0)]):
                got = pixels(run_alone(compiled, request(loras=loras, seed=3)))
                assert max_diff(got, pixels(run_alone(eager, request(loras=loras, seed=3)))) <= PIXEL_TOLERANCE
        assert counters["stats"]["unique_graphs"] == graphs
        assert lora_part(compiled).slots.loads >= 4  # the one slot was refilled each time
    finally:
        compiled.close()
        eager.close()


# --- the slot layers against peft's own per-row forward ----------------------------------------------------------
@pytest.mark.parametrize("way", ["gathered", "dense", "merged", "chosen"])
def test_slot_layers_match_peft_mixed_batch(way):
    """Linear and 3x3 Conv2d slot layers, ranks 2 and 6 zero-padded to 8, rows with adapter a, b or none, equal
    peft's `adapter_names` mixed-batch forward, whichever way the deltas are computed; a row with both adapters
    equals the sum of their deltas; a row with none gets exactly the base output."""
    from peft import LoraConfig, inject_adapter_in_model

    from kiln.engine.parts.lora.layers import RowSelection, install

    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"lin": torch.nn.Linear(12, 10), "conv": torch.nn.Conv2d(3, 5, 3, padding=1)})
    reference = torch.nn.ModuleDict({"lin": torch.nn.Linear(12, 10), "conv": torch.nn.Conv2d(3, 5, 3, padding=1)})
    reference.load_state_dict(model.state_dict())
    for adapter, rank in (("a", 2), ("b", 6)):
        config = LoraConfig(r=rank, lora_alpha=3 * rank + 1, target_modules=["lin", "conv"], init_lora_weights=False)
        inject_adapter_in_model(config, reference, adapter_name=adapter)
    selection = RowSelection(4, 2, torch.device("cpu"), torch.float32)
    layers = install(model, ["lin", "conv"], selection, slots=3, rank=8)
    for slot, adapter in ((1, "a"), (2, "b")):
        for name, layer in layers.items():
            peft_layer = reference[name]
            a = peft_layer.lora_A[adapter].weight
            b = peft_layer.lora_B[adapter].weight * peft_layer.scaling[adapter]
            layer.fill(slot, (a, b.reshape(b.shape[0], -1)))
    selection.set([((1,), (0.5,)), ((2,), (1.0,)), ((), ()), ((1, 2), (1.0, -2.0))])
    x, image = torch.randn(4, 7, 12), torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        for name, value in (("lin", x), ("conv", image)):
            layer = layers[name]
            base = reference[name](value, adapter_names=["__base__"] * 4)
            got = layer(value) if way == "chosen" else layer.apply_way(way, value, layer._base(value), (1, 2), 6)
            only_a = reference[name](value, adapter_names=["a"] * 4) - base
            only_b = reference[name](value, adapter_names=["b"] * 4) - base
            expected = base + torch.stack([0.5 * only_a[0], only_b[1], 0 * base[2], only_a[3] - 2.0 * only_b[3]])
            assert torch.allclose(got, expected, atol=1e-5), (name, (got - expected).abs().max())
            mixed = reference[name](value, adapter_names=["a", "b", "__base__", "a"])  # peft's own per-row forward
            assert torch.allclose(got[1], mixed[1], atol=1e-5)
            assert torch.equal(got[2], base[2])  # slot 0: exactly the base output


@pytest.mark.skipif(not os.environ.get("KILN_SLOW_TESTS"),
                    reason="slow: torch.compile with inductor takes minutes per bucket on 2 cores; "
                    "set KILN_SLOW_TESTS=1")
def test_inductor_per_row_matches_eager(tiny_lora_dir):
    """The same as above with inductor itself: slot buffers and the selection are graph inputs (in-place swaps
    are seen, nothing is frozen into the compiled code)."""
    from torch._dynamo.utils import counters

    config = {"lora_list": lora_list(tiny_lora_dir(SD), "style", "detail")}
    options = dict(peft_model_config=config, max_loras=1, max_loras_per_request=1, lora_default="none",
                   max_batch_size=1)
    compiled = Runner(SD, get_spec(SD), parse_launch_options(get_spec(SD), {"tiny": True, "backend": "compile",
                                                                           **options}))
    compiled.load(start=False, warmup_size=(64, 64))
    eager = make_runner(SD, **options)
    try:
        graphs = counters["stats"]["unique_graphs"]
        with torch._dynamo.config.patch(error_on_recompile=True):
            for loras in ([("style", 0.6)], [], [("detail", 1.3)]):
                got = pixels(run_alone(compiled, request(loras=loras, seed=3, steps=2)))
                assert max_diff(got, pixels(run_alone(eager, request(loras=loras, seed=3, steps=2)))) <= PIXEL_TOLERANCE
        assert counters["stats"]["unique_graphs"] == graphs
    finally:
        compiled.close()
        eager.close()


def test_eager_slot_layers_choose_no_per_row_copies_where_rows_have_few_positions():
    """The deep UNet stages of a real model: 8 rows of one position through a 1280-wide layer, three rank-64
    LoRAs each. Gathering (or merging) per-row weights would copy megabytes to multiply one position, so the
    dense way runs; a small layer with many tokens still merges (a decision of the cost model, not a timing)."""
    from kiln.engine.parts.lora.layers import RowSelection, install

    def chosen(width, tokens, rank):
        model = torch.nn.ModuleDict({"lin": torch.nn.Linear(width, width)})
        selection = RowSelection(8, 3, torch.device("cpu"), torch.float32)
        layer = install(model, ["lin"], selection, slots=5, rank=rank)["lin"]
        for slot in range(1, 5):
            layer.fill(slot, (torch.randn(rank, width), torch.randn(width, rank)))
        selection.set([((1 + row % 4, 1 + (row + 1) % 4, 1 + (row + 2) % 4), (1.0, 0.5, 0.25)) for row in range(8)])
        ways = []
        apply_way = layer.apply_way
        layer.apply_way = lambda way, *args: ways.append(way) or apply_way(way, *args)
        with torch.no_grad():
            layer(torch.randn(8, tokens, width))
        return ways

    assert chosen(1280, 1, 64) == ["dense"]
    assert chosen(16, 256, 4) == ["merged"]
