"""`kiln gpu-check` (and `scripts/gpu_check`, which installs what it needs first): how fast Kiln really is on a GPU,
in one run with a hard time budget, written to `--out DIR` as report.json and PNG plots.

Sections, in order of value; each starts only when the time left allows it, and runs as a subprocess killed at the
deadline, so a slow section costs itself and not the report:

1. facts: GPU, compute capability, memory, dense bf16 peak (a table of datacenter GPUs), versions;
2. cuda tests: the tests that skip without CUDA (memory budget of `max_batch_size: auto`, attention kernels,
   TensorRT), through pytest;
3. precision (in this process: tiny models): batch invariance (a job alone vs in a batch with different
   neighbours) and equivalence with the plain diffusers pipeline, tiny SD1.5 and SDXL, in fp16 and bf16 on CUDA
   (fp32 in the dry run): max pixel differences;
4. benchmarks through `kiln bench` (the same harness): reference-size SD1.5 (512x512, 25 steps, CFG 7.5) and SDXL
   (1024x1024, 20 steps, CFG 5) with random weights built on the GPU, Kiln vs sequential diffusers vs static
   batching at 1, 4, 16 and 64 clients; then Kiln's backends at 16 clients: eager, compile (CUDA graphs), and
   TensorRT when `tensorrt` imports;
5. FLOPs per image counted on one denoiser forward (torch's FlopCounterMode, from the model's config), and per
   result the fraction of the dense bf16 peak reached.

`--dry-run` runs the same code on the CPU with tiny SD1.5 only (64x64, 2 steps, 1 and 4 clients, fp32, compile
with torch.compile's "eager" compiler) in under two minutes on an idle 2-core machine (sections left out past its
150 s budget say so); `tests/benchmarks/test_gpu_check.py` runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

BUDGET_SECONDS = 480  # the whole run, the report included
DRY_RUN_SECONDS = 150
REPORT_SECONDS = 20  # kept for the report and plots at the end
# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from NVIDIA's datasheets; matched on the device name.
DENSE_BF16_TFLOPS = (("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("H800", 989.4), ("GH200", 989.4),
                     ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.1), ("L40", 181.0),
                     ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0))
MODELS = {  # model -> (size, steps, guidance) of the reference benchmark
    "stable-diffusion-v1.5": ((512, 512), 25, 7.5),
    "stable-diffusion-xl-base-1.0": ((1024, 1024), 20, 5.0),
}
CONCURRENCY = (1, 4, 16, 64)
BACKENDS = ("compile", "tensorrt")  # compared with the eager run of the first section, at 16 clients
REPO = Path(os.environ.get("KILN_REPO") or Path(__file__).resolve().parent.parent)  # its tests/ (scripts/gpu_check)


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic() - REPORT_SECONDS


def dense_bf16_peak(name: str) -> float | None:
    """FLOP/s of the GPU's dense bf16 tensor-core peak, or None for a GPU not in the table."""
    return next((tflops * 1e12 for key, tflops in DENSE_BF16_TFLOPS if key in name), None)


def gpu_facts() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"cuda": False}
    properties = torch.cuda.get_device_properties(0)
    return {"cuda": True, "name": properties.name, "compute_capability": f"{properties.major}.{properties.minor}",
            "memory_bytes": properties.total_memory, "count": torch.cuda.device_count(),
            "cuda_version": torch.version.cuda, "dense_bf16_peak_flops": dense_bf16_peak(properties.name)}


def _run(command: list[str], timeout: float, log: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """A section as a subprocess, killed at `timeout`: its exit code and the seconds it took."""
    started = time.monotonic()
    with log.open("w") as sink:
        try:
            code = subprocess.run(command, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, timeout=max(1, timeout),
                                  env={**os.environ, **(env or {})}).returncode
        except subprocess.TimeoutExpired:
            code = None
    return {"exit_code": code, "timed_out": code is None, "seconds": round(time.monotonic() - started, 1),
            "log": str(log)}


# --- sections -----------------------------------------------------------------------------------------------
def cuda_tests(out: Path, deadline: Deadline, cuda: bool) -> dict[str, Any]:
    if not cuda:
        return {"skipped": "no CUDA device (they skip on a CPU)"}
    tests = ["tests/engine/test_batch_budget.py", "tests/unit/test_kernels.py",
             "tests/engine/test_backends.py::test_tensorrt_engine_matches_eager_and_a_restart_reuses_it"]
    result = _run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *tests],
                  min(150, deadline.left()), out / "logs" / "cuda-tests.log")
    tail = Path(result["log"]).read_text(errors="replace").strip().splitlines()[-1:] or [""]
    return {**result, "summary": tail[0], "passed": result["exit_code"] == 0}


def precision(dry_run: bool) -> dict[str, Any]:
    started = time.monotonic()
    try:
        checks = precision_checks(dry_run)
    except Exception as error:  # noqa: BLE001 - reported, and the benchmarks still run
        return {"error": f"{type(error).__name__}: {error}", "seconds": round(time.monotonic() - started, 1)}
    return {"checks": checks, "seconds": round(time.monotonic() - started, 1)}


def checked_models(dry_run: bool) -> list[str]:
    return list(MODELS)[:1] if dry_run else list(MODELS)


def precision_checks(dry_run: bool) -> list[dict[str, Any]]:
    """Max pixel differences: a job alone vs the same job among 3 neighbours (other prompts, seeds, steps,
    guidance), and Kiln vs the plain diffusers pipeline, per tiny model and dtype."""
    import numpy as np
    import torch

    from kiln.engine.catalogue import get_spec
    from kiln.engine.options import parse_launch_options
    from kiln.engine.requests import ImageRequest
    from kiln.engine.runner import Runner

    def drive(runner: Runner, handles: list) -> None:
        while not all(handle.future.done() for handle in handles):
            runner.iterate()

    def image(handle) -> np.ndarray:
        return np.asarray(handle.result()[0].image, dtype=np.int16)

    dtypes = ["float32"] if dry_run else ["float16", "bfloat16"]
    device = "cpu" if dry_run else "cuda"
    checks = []
    for name in checked_models(dry_run):
        spec = get_spec(name)
        for dtype in dtypes:
            runner = Runner(name, spec, parse_launch_options(
                spec, {"tiny": True, "device": device, "torch_dtype": dtype, "backend": "eager"}))
            runner.load(start=False)
            try:
                request = lambda **k: ImageRequest(**{"prompt": "a lighthouse", "width": 64, "height": 64,  # noqa
                                                      "steps": 4, "guidance_scale": 6.0, "seed": 3, **k})
                alone = runner.submit(request())
                drive(runner, [alone])
                neighbours = [runner.submit(request(prompt=f"a red fox {i}", seed=40 + i, steps=3 + i,
                                                    guidance_scale=1.0 + 3 * i)) for i in range(3)]
                batched = runner.submit(request())
                drive(runner, [*neighbours, batched])
                pipeline = runner.loaded.pipeline
                reference = pipeline(prompt="a lighthouse", width=64, height=64, num_inference_steps=4,
                                     guidance_scale=6.0, generator=torch.Generator("cpu").manual_seed(3)).images[0]
                checks.append({
                    "model": name, "dtype": dtype, "device": device,
                    "batch_invariance_max_pixel_diff": int(np.abs(image(alone) - image(batched)).max()),
                    "diffusers_max_pixel_diff": int(np.abs(image(alone) - np.asarray(reference, np.int16)).max()),
                    "tolerance_fp32": 2,
                })
            finally:
                runner.close()
    return checks


def bench_scenario(name: str, dry_run: bool, concurrency: tuple[int, ...]) -> str:
    (width, height), steps, guidance = ((64, 64), 2, MODELS[name][2]) if dry_run else MODELS[name]
    levels = ", ".join(map(str, concurrency))
    return (f'mix = [{{ model = "{name}", size = "{width}x{height}", steps = {steps}, guidance = {guidance} }}]\n\n'
            f'[[scenario]]\nname = "closed"\nkind = "closed"\nconcurrency = [{levels}]\nrequests_per_client = 1\n')


def bench(out: Path, deadline: Deadline, name: str, label: str, systems: list[str], concurrency: tuple[int, ...],
          backend: str | None, dry_run: bool, max_batch_size: int) -> dict[str, Any]:
    """One `kiln bench` run (same harness as the CPU benchmarks) into out/bench/<label>.json."""
    if deadline.left() < 15:
        return {"skipped": "time budget spent", "label": label, "model": name, "backend": backend or "auto"}
    folder = out / "bench"
    folder.mkdir(parents=True, exist_ok=True)
    scenario = folder / f"{label}.toml"
    scenario.write_text(bench_scenario(name, dry_run, concurrency))
    report = folder / f"{label}.json"
    command = [sys.executable, "-m", "kiln.benchmarks", "--scenario", str(scenario), "--output", str(report),
               "--systems", *systems, "--no-memory-check", "--no-plot", "--max-batch-size", str(max_batch_size),
               "--logs", str(out / "logs" / label)]
    env = {}
    if dry_run:
        command += ["--device", "cpu"]
        env["KILN_COMPILE_BACKEND"] = "eager"  # the same code path without minutes of inductor on a CPU
    else:
        command += ["--reference-size", "--device", "cuda", "--torch-dtype", "bfloat16", "--threads", "4"]
    if backend:
        command += ["--backend", backend]
    result = _run(command, deadline.left(), out / "logs" / f"{label}.log", env)
    return {**result, "label": label, "model": name, "backend": backend or "auto",
            "report": json.loads(report.read_text()) if report.is_file() else None}


def flops_per_image(name: str, dry_run: bool) -> dict[str, Any]:
    """FLOPs of one image: one denoiser row counted by FlopCounterMode at the benchmark size, times rows per job
    and steps (prompt encoding and the VAE decode are left out: a few percent)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from kiln.engine.backends.base import ExampleInputs
    from kiln.engine.catalogue import get_spec

    from .components import load_components
    from .harness import Settings, model_options

    (width, height), steps, guidance = ((64, 64), 2, MODELS[name][2]) if dry_run else MODELS[name]
    settings = Settings(reference_size=not dry_run, device="cpu" if dry_run else "cuda",
                        torch_dtype=None if dry_run else "bfloat16")
    family = load_components(name, model_options(settings, name, print)).family
    inputs = ExampleInputs(family, width, height)(1)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        family.denoiser(*inputs)
    rows = get_spec(name).family.rows_per_job if guidance > 1 else 1
    row = counter.get_total_flops()
    return {"model": name, "size": f"{width}x{height}", "steps": steps, "flops_per_row": row,
            "rows_per_image_step": rows, "flops_per_image": row * rows * steps}


def results_from(run: dict[str, Any], flops: dict[str, Any] | None, peak: float | None) -> list[dict[str, Any]]:
    """The report's `results` rows of one bench run."""
    report = run.get("report")
    if not report:
        return []
    described = report["system_facts"].get("kiln", [{}])[0].get("backends", {})
    rows = []
    for plan in report["plans"]:
        item = plan["mix"][0]
        for system, figures in plan["systems"].items():
            if system not in ("kiln", "sequential", "static") or not figures.get("images_per_s"):
                continue
            backend = (described.get(item["model"]) or {}).get("backend", run["backend"]) if system == "kiln" \
                else "diffusers"
            memory = figures.get("memory", {})
            row = {
                "model": item["model"], "size": f"{item['width']}x{item['height']}", "steps": item["steps"],
                "concurrency": plan["concurrency"], "system": system, "backend": backend,
                "images_per_s": figures["images_per_s"], "p50_s": figures["latency_s"]["p50"],
                "p99_s": figures["latency_s"]["p99"],
                "peak_memory_bytes": memory.get("gpu_peak_allocated_bytes") or memory.get("peak_rss_bytes"),
            }
            if flops and peak:
                row["fraction_of_dense_bf16_peak"] = figures["images_per_s"] * flops["flops_per_image"] / peak
            rows.append(row)
    return rows


def plot(results: list[dict[str, Any]], out: Path) -> list[str]:
    """Images/s against clients per model and system (and one point per backend at 16 clients)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for model in dict.fromkeys(row["model"] for row in results):
        figure, axis = plt.subplots(figsize=(7, 4.5))
        mine = [row for row in results if row["model"] == model]
        for key in dict.fromkeys((row["system"], row["backend"]) for row in mine):
            points = sorted((row["concurrency"], row["images_per_s"]) for row in mine
                            if (row["system"], row["backend"]) == key)
            axis.plot(*zip(*points), marker="o", label=f"{key[0]} ({key[1]})")
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent clients")
        axis.set_ylabel("images/s")
        axis.set_title(f"{model} {mine[0]['size']}, {mine[0]['steps']} steps")
        axis.legend()
        path = out / f"{model}.png"
        figure.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(figure)
        written.append(str(path))
    return written


def run_check(out: Path, dry_run: bool, budget: float | None = None, log: Callable[[str], None] = print) -> dict:
    """The whole check (module docstring); returns the report it wrote to out/report.json."""
    from .machine import machine_facts

    budget = budget or (DRY_RUN_SECONDS if dry_run else BUDGET_SECONDS)
    deadline = Deadline(budget)
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    started = time.time()
    gpu = gpu_facts()
    if not dry_run and not gpu["cuda"]:
        raise SystemExit("kiln gpu-check: no CUDA device; use --dry-run on a CPU")
    report: dict[str, Any] = {"dry_run": dry_run, "started": started, "budget_seconds": budget,
                              "machine": {**machine_facts(1), "gpu": gpu}, "sections": {}, "results": []}
    sections = report["sections"]
    log("cuda tests")
    sections["cuda_tests"] = cuda_tests(out, deadline, gpu["cuda"])
    log("precision checks")
    sections["precision"] = precision(dry_run)
    runs = []
    for name in checked_models(dry_run):
        log(f"benchmark {name}: kiln, sequential, static at {CONCURRENCY if not dry_run else (1, 4)}")
        runs.append(bench(out, deadline, name, f"{name}-systems", ["kiln", "sequential", "static"],
                          (1, 4) if dry_run else CONCURRENCY, "eager", dry_run, 4 if dry_run else 64))
    first = checked_models(dry_run)[0]
    for backend in BACKENDS:
        if backend == "tensorrt" and not _imports("tensorrt"):
            sections[f"backend_{backend}"] = {"skipped": "not installed"}
            continue
        log(f"benchmark {first}: kiln on {backend}")
        # Every bucket compiles (or builds) at launch: on a CPU the dry run keeps them to 1 and 2 rows.
        runs.append(bench(out, deadline, first, f"{first}-{backend}", ["kiln"], (4,) if dry_run else (16,),
                          backend, dry_run, 1 if dry_run else 16))
    flops = {}
    for name in checked_models(dry_run):
        if deadline.left() > 30:
            try:
                flops[name] = flops_per_image(name, dry_run)
            except Exception as error:  # noqa: BLE001 - the fraction of peak is then left out
                flops[name] = {"error": f"{type(error).__name__}: {error}"}
    report["flops"] = flops
    peak = gpu.get("dense_bf16_peak_flops")
    for run in runs:
        sections[run["label"]] = {key: value for key, value in run.items() if key != "report"}
        report["results"] += results_from(run, flops.get(run["model"]), peak)
    report["plots"] = plot(report["results"], out) if report["results"] else []
    report["seconds"] = round(time.time() - started, 1)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    return report


def _imports(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("gpu-check"), help="report.json and plots go here")
    parser.add_argument("--dry-run", action="store_true", help="tiny models on the CPU, the same code path")
    parser.add_argument("--budget", type=float, help=f"seconds for the whole run (default: {BUDGET_SECONDS}; "
                                                     f"dry run {DRY_RUN_SECONDS})")


def run(args: argparse.Namespace) -> int:
    report = run_check(args.out, args.dry_run, args.budget, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(f"report: {args.out / 'report.json'} ({len(report['results'])} results, {report['seconds']} s)")
    return 0


def add_command(commands: argparse._SubParsersAction) -> None:
    """`kiln gpu-check` (the `kiln.commands` entry point)."""
    command = commands.add_parser("gpu-check", help="measure Kiln on a CUDA GPU in one run (benchmarks/gpu_check.py)")
    add_arguments(command)
    command.set_defaults(handler=run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kiln gpu-check", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
