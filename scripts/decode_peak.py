#!/usr/bin/env python3
"""Peak memory of one batched VAE decode through Kiln's engine path, with and without the memory launch options.

    .venv/bin/python scripts/decode_peak.py sd-turbo 1024x1024 --tiny --batch 2 --option vae_tiling=true
    .venv/bin/python scripts/decode_peak.py FLUX.1-dev 2048x2048 --model-path /models/flux-dev --option vae_tiling=true

Loads the model as a launch would (engine.loading, the family adapter) and decodes `--batch` random latents of
the size with `family.decode`, the call the runner makes for a lane's finished jobs. Prints one JSON line:
`peak_bytes` is the CUDA allocator's peak above what was allocated before the decode on a GPU, and on a CPU the
process's peak resident set during the decode (Linux's VmHWM, reset just before it) above its resident set then.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from kiln.engine.catalogue import get_spec
from kiln.engine.families import make_family
from kiln.engine.loading import load_model
from kiln.engine.options import parse_launch_options
from kiln.engine.schema import parse_size
from kiln.server.cli import coerce_option


def _status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status (Linux), e.g. VmRSS (now) or VmHWM (peak)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _reset_peak_rss() -> None:
    """Make VmHWM start again from the resident set now (Linux: clear_refs 5), so loading's peak is not counted."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def measure(name: str, size: str, batch: int, options: dict) -> dict:
    spec = get_spec(name)
    loaded = load_model(spec, parse_launch_options(spec, options))
    family = make_family(spec.family, loaded.pipeline, loaded.device, loaded.dtype)
    width, height = parse_size(size)
    latents = family.pack(torch.randn((batch, *family.latent_shape(width, height)[1:]), device=family.device,
                                      dtype=family.dtype))
    cuda = family.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(family.device)
        torch.cuda.reset_peak_memory_stats(family.device)
        before = torch.cuda.memory_allocated(family.device)
    else:
        _reset_peak_rss()
        before = _status_bytes("VmRSS")
    started = time.perf_counter()
    with torch.no_grad():
        images = family.decode(latents, width, height)
    seconds = time.perf_counter() - started
    if cuda:
        torch.cuda.synchronize(family.device)
        peak = torch.cuda.max_memory_allocated(family.device) - before
    else:
        peak = _status_bytes("VmHWM") - before
    assert len(images) == batch and images[0].size == (width, height)
    return {"model": name, "size": f"{width}x{height}", "batch": batch, "device": str(family.device),
            "options": options, "peak_bytes": peak, "seconds": round(seconds, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="catalogue model name")
    parser.add_argument("size", help="WIDTHxHEIGHT")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tiny", action="store_true", help="the tiny random-weight checkpoint")
    parser.add_argument("--model-path")
    parser.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                        help="a launch option, coerced as `kiln launch` does (repeatable)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    options = {key: coerce_option(value) for key, _, value in (item.partition("=") for item in args.option)}
    options.update({"tiny": True} if args.tiny else {}, **({"model_path": args.model_path} if args.model_path else {}))
    print(json.dumps(measure(args.model, args.size, args.batch, options)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
