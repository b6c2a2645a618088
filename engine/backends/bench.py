"""Forward time of one denoiser under each backend: `python -m engine.backends.bench [options]`.

Loads a catalogue model (tiny by default), then times eager, compile (inductor), onnx and openvino forwards at the given
row counts, after warm-up, and reports ONNX export and per-bucket compile times. Prints a table and writes JSON
with --json. Records the thread count and machine load, which dominate CPU numbers (DESIGN.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.backends.bench", description=__doc__)
    parser.add_argument("--model", default="stable-diffusion-v1.5")
    parser.add_argument("--real-weights", action="store_true", help="not the tiny checkpoint")
    parser.add_argument("--size", default="64x64", help="lane size WxH (default: %(default)s)")
    parser.add_argument("--rows", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--backends", nargs="+", default=["eager", "compile", "onnx", "openvino"],
                        choices=["eager", "compile", "onnx", "openvino"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30, help="timed forwards per point (min and median reported)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from kiln.kernels import attention
    from kiln.engine.catalogue import get_spec
    from kiln.engine.families import make_family
    from kiln.engine.loading import load_model
    from kiln.engine.options import parse_launch_options

    from .launch import onnx_export_for
    from .base import ExampleInputs
    from .cache import EngineCache
    from .compile import CompileBackend
    from .onnx import ONNX_FILE, OnnxBackend
    from .openvino import OpenVinoBackend

    spec = get_spec(args.model)
    width, height = (int(part) for part in args.size.lower().split("x"))
    loaded = load_model(spec, parse_launch_options(spec, {"tiny": not args.real_weights, "backend": "eager"}))
    family = make_family(spec.family, loaded.pipeline, loaded.device, loaded.dtype)
    attention.install(family.denoiser.model, "sdpa")
    denoiser = family.denoiser
    examples = ExampleInputs(family, width, height)
    inputs = {rows: examples(rows) for rows in args.rows}
    report: dict = {"model": spec.name, "tiny": not args.real_weights, "size": args.size, "threads": args.threads,
                    "load_average": os.getloadavg(), "torch": torch.__version__, "forward_ms": {}, "median_ms": {}, "setup_s": {}}

    def timed(name, run, rows) -> float:
        """The fastest of `repeats` forwards: on a shared machine the minimum is the least disturbed."""
        for _ in range(2):
            run(*inputs[rows])
        samples = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            run(*inputs[rows])
            samples.append(time.perf_counter() - started)
        report["median_ms"].setdefault(name, {})[rows] = round(statistics.median(samples) * 1000, 2)
        return min(samples) * 1000

    with torch.no_grad():
        for name in args.backends:
            if name == "eager":
                run = denoiser
            elif name == "compile":
                backend = CompileBackend(denoiser, max(args.rows))
                compiles = {}
                for rows in args.rows:  # compile only the buckets measured (each is one graph)
                    started = time.perf_counter()
                    backend(*inputs[rows])
                    compiles[rows] = round(time.perf_counter() - started, 1)
                report["setup_s"]["compile_per_bucket"] = compiles
                run = backend
            else:
                with tempfile.TemporaryDirectory() as root:
                    started = time.perf_counter()
                    _, entry = onnx_export_for(family, spec.name, loaded.source, EngineCache(root))
                    report["setup_s"]["onnx_export"] = round(time.perf_counter() - started, 2)
                    started = time.perf_counter()
                    if name == "onnx":
                        backend = OnnxBackend(denoiser, entry.file(ONNX_FILE), family.device, threads=args.threads)
                    else:
                        backend = OpenVinoBackend(denoiser, entry.file(ONNX_FILE), family.dtype, threads=args.threads)
                    report["setup_s"][f"{name}_session"] = round(time.perf_counter() - started, 2)
                    report["forward_ms"][name] = {rows: round(timed(name, backend, rows), 2) for rows in args.rows}
                    print(name, report["forward_ms"][name], file=sys.stderr)
                continue
            report["forward_ms"][name] = {rows: round(timed(name, run, rows), 2) for rows in args.rows}
            print(name, report["forward_ms"][name], file=sys.stderr)
    report["load_average_after"] = os.getloadavg()

    print(f"{spec.name} ({'tiny' if report['tiny'] else 'real'}) at {args.size}, {args.threads} thread(s), "
          f"load {report['load_average'][0]:.2f} -> {report['load_average_after'][0]:.2f}")
    print("backend   " + "".join(f"{rows:>8} rows" for rows in args.rows) + "   (ms per forward: min / median)")
    for name, times in report["forward_ms"].items():
        medians = report["median_ms"][name]
        print(f"{name:<10}" + "".join(f"{times[rows]:>7.2f} /{medians[rows]:>6.2f}" for rows in args.rows))
    print("setup:", json.dumps(report["setup_s"]))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
