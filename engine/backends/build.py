"""`kiln build-engines` / `scripts/build_engines.py`: export ONNX and build TensorRT engines ahead of launch.

For a catalogue model (its tiny checkpoint with --tiny, other weights with --model-path), a set of lane sizes, a
batch range and a precision: export the denoiser to ONNX into the engine cache (or find it there), then build a
TensorRT engine with one optimisation profile per size into the cache (or find it there), printing what was
built, how long it took and how big it is. A launch with backend 'auto' or 'tensorrt' on the same GPU model,
TensorRT version and weights then loads the engine instead of building it.

Without a CUDA GPU or the tensorrt package it stops after the ONNX export and prints what it would build: the
profiles (per input, min/opt/max shapes), the precision and the cache key parts known here.

--min-batch/--max-batch count images per forward, like the launch option max_batch_size; the engine's batch axis
(rows) goes up to twice that for families with classifier-free guidance (an unconditional and a conditional row
per image).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TextIO

from kiln.engine.catalogue import CATALOGUE

DEFAULT_MAX_BATCH = 16  # what max_batch_size "auto" is on a CPU; give a GPU launch's derived figure (GET /v1/models/{uid})


def size_arg(text: str) -> tuple[int, int]:
    width, sep, height = text.lower().partition("x")
    if not sep or not width.strip().isdigit() or not height.strip().isdigit():
        raise argparse.ArgumentTypeError(f"size {text!r} is not WIDTHxHEIGHT, e.g. 1024x1024")
    return int(width), int(height)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", choices=list(CATALOGUE), metavar="MODEL", help="catalogue model name")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--tiny", action="store_true", help="its tiny random-weight checkpoint")
    weights.add_argument("--model-path", help="a local diffusers directory with its weights")
    parser.add_argument("--size", action="append", type=size_arg, metavar="WxH",
                        help="lane size to build a profile for; repeatable (default: the model's default size)")
    parser.add_argument("--min-batch", type=int, default=1, help="fewest images per forward (default: 1)")
    parser.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                        help="most images per forward, as launch option max_batch_size (default: %(default)s)")
    parser.add_argument("--precision", choices=["fp32", "fp16", "bf16", "fp8", "int8"],
                        help="engine precision (default: the launch dtype's: fp16 for half-precision models on GPUs)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                        help="dtype to load and export in (default: the catalogue's; float32 on CPU)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--cache-dir", type=Path, help="engine cache root (default: $KILN_ENGINE_CACHE or "
                        "$KILN_CACHE/engines or ~/.cache/kiln/engines)")


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:

    from kiln.kernels import attention
    from kiln.engine.families import make_family
    from kiln.engine.loading import load_model
    from kiln.engine.options import parse_launch_options

    from .base import ExampleInputs
    from .launch import onnx_export_for
    from .cache import EngineCache
    from .onnx import ONNX_FILE
    from .tensorrt import (Profile, check_precision, compute_capability, engine_key, ensure_engine, precision_for,
                           profile_shapes, tensorrt_unavailable, tensorrt_version)

    out = out or sys.stdout
    spec = CATALOGUE[args.model]
    sizes = args.size or [spec.default_size]
    for width, height in sizes:
        if width % spec.stride or height % spec.stride or not spec.min_size <= min(width, height) \
                or max(width, height) > spec.max_size:
            print(f"build-engines: size {width}x{height} must be multiples of {spec.stride} between "
                  f"{spec.min_size} and {spec.max_size} for {spec.name}", file=sys.stderr)
            return 2
    if not 1 <= args.min_batch <= args.max_batch:
        print("build-engines: need 1 <= --min-batch <= --max-batch", file=sys.stderr)
        return 2
    raw: dict = {"tiny": args.tiny, "device": args.device, "backend": "eager"}
    if args.model_path:
        raw["model_path"] = args.model_path
    if args.dtype:
        raw["torch_dtype"] = args.dtype
    options = parse_launch_options(spec, raw)
    started = time.perf_counter()
    loaded = load_model(spec, options)
    family = make_family(spec.family, loaded.pipeline, loaded.device, loaded.dtype)
    attention.install(family.denoiser.model, "sdpa")
    print(f"{spec.name}: loaded from {loaded.source} on {loaded.device} in {str(loaded.dtype)[6:]} "
          f"({time.perf_counter() - started:.1f} s)", file=out)

    cache = EngineCache(args.cache_dir)
    existed = cache.lookup(_onnx_key(family, spec, loaded.source, cache)) is not None
    onnx, entry = onnx_export_for(family, spec.name, loaded.source, cache)
    onnx_path = entry.file(ONNX_FILE)
    size = sum(path.stat().st_size for path in entry.path.iterdir() if path.name != "meta.json")
    how = "found in cache" if existed else f"exported in {entry.info.get('export_seconds', 0):.1f} s"
    print(f"ONNX: {onnx_path} ({_megabytes(size)}, {how}); key {onnx.digest}", file=out)

    rows_per = family.spec.rows_per_job
    profile = Profile.make(sizes, args.min_batch, args.max_batch * rows_per)
    precision = args.precision or precision_for(family.dtype)
    examples = {size: ExampleInputs(family, *size).named(1) for size in profile.sizes}
    shapes = profile_shapes(family.denoiser, examples, profile)
    print(f"profile: {profile.describe()} (rows = images x {rows_per}); precision {precision}", file=out)
    for size, per_input in zip(profile.sizes, shapes):
        print(f"  {size[0]}x{size[1]}:", file=out)
        for name, (low, opt, high) in per_input.items():
            print(f"    {name}: min {list(low)} opt {list(opt)} max {list(high)}", file=out)

    reason = tensorrt_unavailable(family.device)
    if reason:
        print(f"TensorRT: not built here: {reason}. It would be built with the profile above in {precision}, "
              f"cached under key parts: model={spec.name} onnx={onnx.digest} weights={onnx['weights']} "
              f"dtype={onnx['dtype']} precision={precision} profile={profile.describe()} "
              f"max_rows={profile.max_rows} compute_capability=<the GPU's> tensorrt=<its version>", file=out)
        return 0
    capability, version = compute_capability(family.device), tensorrt_version()
    check_precision(precision, capability)
    key = engine_key(onnx, capability, version, precision, profile)
    existed = cache.lookup(key) is not None
    engine = ensure_engine(cache, key, onnx_path, shapes, precision, onnx["dtype"], profile)
    plan = engine.file("denoiser.plan")
    how = "found in cache" if existed else f"built in {engine.info.get('build_seconds', 0):.1f} s"
    print(f"TensorRT {version} on compute capability {capability}: {plan} ({_megabytes(plan.stat().st_size)}, "
          f"{how}); key {key.digest}", file=out)
    return 0


def _onnx_key(family, spec, source, cache):
    from .launch import weights_fingerprint
    from .onnx import onnx_key

    return onnx_key(spec.name, weights_fingerprint(family, source, cache), family.denoiser, family.dtype)


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def add_command(commands: argparse._SubParsersAction) -> None:
    """`kiln build-engines` (the `kiln.commands` entry point)."""
    engines = commands.add_parser("build-engines", help="export ONNX and build TensorRT engines into the engine cache")
    add_arguments(engines)
    engines.set_defaults(handler=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="build_engines", description="Export ONNX and build TensorRT engines into Kiln's engine cache.")
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))
