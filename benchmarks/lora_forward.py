"""The forward overhead of per-row LoRA: `python -m kiln.benchmarks.lora_forward [--ranks 16 64] [--rows 32]`.

One batched denoiser forward of tiny SD1.5 at 64x64 (`--rows` rows: 16 images with CFG by default) on a model
launched without LoRAs and on models in per-row mode with four random LoRAs of each rank (made with peft,
`init_lora_weights=False`, on the tiny LoRAs' layers: attention, feed-forward, proj_in and the resnet
convolutions). Per rank: no row with a LoRA, every row one of the four (K=1), every row three stacked (K=3).
The plain forward and every variant are timed in turns, one forward each per round, so a neighbour's load on a
shared machine falls on all of them alike; each figure is the median of `--repeat` rounds after warm-up. Prints
a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

MODEL = "stable-diffusion-v1.5"


def _loras(rank: int, folder: Path) -> list[dict]:
    """Four random LoRAs of `rank` on the tiny checkpoint, saved as diffusers files."""
    from diffusers import DiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from kiln.engine.tiny import LORA_DENOISER_TARGETS, tiny_checkpoint

    listed = []
    for index in range(4):
        pipeline = DiffusionPipeline.from_pretrained(tiny_checkpoint(MODEL))
        torch.manual_seed(1000 * rank + index)
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_DENOISER_TARGETS["sd"],
                            init_lora_weights=False)
        pipeline.unet.add_adapter(config)
        name = f"r{rank}-{index}"
        type(pipeline).save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(pipeline.unet),
                                         weight_name=f"{name}.safetensors")
        listed.append({"lora_name": name, "local_path": str(folder / f"{name}.safetensors")})
    return listed


def _runner(options: dict):
    from kiln.engine.catalogue import get_spec
    from kiln.engine.options import parse_launch_options
    from kiln.engine.runner import Runner

    spec = get_spec(MODEL)
    runner = Runner(MODEL, spec, parse_launch_options(spec, {"tiny": True, "max_batch_size": 16, **options}))
    runner.load(start=False, warmup_size=(64, 64))
    return runner


VARIANTS = ("no_lora_rows", "one_lora_per_row", "three_loras_per_row")


def _selections(rows: int) -> dict[str, list]:
    """Each variant's (slots, scales) per row: none, one of the four LoRAs, three stacked."""
    one = [((1 + row % 4,), (1.0,)) for row in range(rows)]
    stacked = [((1 + row % 4, 1 + (row + 1) % 4, 1 + (row + 2) % 4), (1.0, 0.5, 0.25)) for row in range(rows)]
    return dict(zip(VARIANTS, ([], one, stacked)))


def _forward(runner, inputs, selection=None) -> float:
    """One forward's milliseconds, with `selection` written into the LoRA rows first (per-row runners)."""
    lora = next((part for part in runner.parts if part.name == "lora" and part.mode == "per-row"), None)
    if lora is not None:
        lora.rows.set(selection or [])
    started = time.perf_counter()
    runner.executor.family.forward(inputs)
    return (time.perf_counter() - started) * 1000


@torch.no_grad()
def _interleaved(plain, per_rank: dict[int, object], rows: int, repeat: int) -> dict[str, list[float]]:
    """Milliseconds per forward of the plain runner and of every (rank, variant), one of each per round."""
    from kiln.engine.backends.base import ExampleInputs

    inputs = ExampleInputs(plain.executor.family, 64, 64).named(rows)
    selections = _selections(rows)
    times: dict[str, list[float]] = {"plain": []}
    for index in range(repeat + 3):
        keep = index >= 3  # the first rounds warm up
        ms = _forward(plain, inputs)
        if keep:
            times["plain"].append(ms)
        for rank, runner in per_rank.items():
            for label, selection in selections.items():
                ms = _forward(runner, inputs, selection)
                if keep:
                    times.setdefault(f"{rank}/{label}", []).append(ms)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kiln.benchmarks.lora_forward", description=__doc__)
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--rows", type=int, default=32, help="rows per forward (default: 16 images with CFG)")
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent / "results" / "lora_forward.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from .machine import load_average, machine_facts

    plain = _runner({})
    per_rank = {}
    for rank in args.ranks:
        with tempfile.TemporaryDirectory() as folder:
            per_rank[rank] = _runner({"peft_model_config": {"lora_list": _loras(rank, Path(folder))}, "max_loras": 4,
                                      "max_lora_rank": rank, "lora_default": "none"})
    before = load_average()
    times = _interleaved(plain, per_rank, args.rows, args.repeat)
    plain_ms = statistics.median(times["plain"])
    results = {"machine": machine_facts(args.threads), "load_average": [before, load_average()], "rows": args.rows,
               "repeat": args.repeat, "plain_ms": plain_ms, "ranks": {}}
    print(f"plain: {plain_ms:.2f} ms per forward of {args.rows} rows")
    for rank, runner in per_rank.items():
        figures = {}
        for label in VARIANTS:
            ms = statistics.median(times[f"{rank}/{label}"])
            figures[label] = {"ms": ms, "overhead_ms": ms - plain_ms, "overhead_fraction": ms / plain_ms - 1}
            print(f"rank {rank:3d} {label:>20}: {ms:7.2f} ms  (+{ms - plain_ms:6.2f} ms, "
                  f"{100 * (ms / plain_ms - 1):+5.1f}%)")
        figures["adapted_layers"] = len(next(p for p in runner.parts if p.name == "lora").layers)
        results["ranks"][str(rank)] = figures
        runner.close()
    plain.close()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1) + "\n")
    print(f"report: {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
