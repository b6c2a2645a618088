"""The forward overhead of per-row LoRA: `python -m kiln.benchmarks.lora_forward [--ranks 16 64] [--rows 32]`.

One batched denoiser forward of tiny SD1.5 at 64x64 (`--rows` rows: 16 images with CFG by default), timed as the
median of `--repeat` forwards after warm-up, on a model launched without LoRAs and on models in per-row mode with
four random LoRAs of each rank (made with peft, `init_lora_weights=False`, on the tiny LoRAs' layers: attention,
feed-forward, proj_in and the resnet convolutions). Per rank: no row with a LoRA, every row one of the four (K=1),
every row three stacked (K=3). Prints a table and writes JSON.
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


@torch.no_grad()
def _median_ms(runner, rows: int, repeat: int, selection=None) -> float:
    from kiln.engine.backends.base import ExampleInputs

    family = runner.executor.family
    inputs = ExampleInputs(family, 64, 64).named(rows)
    lora = next((part for part in runner.parts if part.name == "lora" and part.mode == "per-row"), None)
    times = []
    for index in range(repeat + 3):
        if lora is not None:
            lora.rows.set(selection or [])
        started = time.perf_counter()
        family.forward(inputs)
        if index >= 3:
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kiln.benchmarks.lora_forward", description=__doc__)
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--rows", type=int, default=32, help="rows per forward (default: 16 images with CFG)")
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent / "results" / "lora_forward.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from .machine import machine_facts

    plain = _runner({})
    results = {"machine": machine_facts(args.threads), "rows": args.rows, "repeat": args.repeat,
               "plain_ms": _median_ms(plain, args.rows, args.repeat), "ranks": {}}
    plain.close()
    print(f"plain: {results['plain_ms']:.2f} ms per forward of {args.rows} rows")
    for rank in args.ranks:
        with tempfile.TemporaryDirectory() as folder:
            runner = _runner({"peft_model_config": {"lora_list": _loras(rank, Path(folder))}, "max_loras": 4,
                              "max_lora_rank": rank, "lora_default": "none"})
        one = [((1 + row % 4,), (1.0,)) for row in range(args.rows)]
        stacked = [((1 + row % 4, 1 + (row + 1) % 4, 1 + (row + 2) % 4), (1.0, 0.5, 0.25)) for row in range(args.rows)]
        figures = {}
        for label, selection in (("no_lora_rows", []), ("one_lora_per_row", one), ("three_loras_per_row", stacked)):
            # Every row of the forward holds the same number of adapters, so K is that number here.
            ms = _median_ms(runner, args.rows, args.repeat, selection)
            figures[label] = {"ms": ms, "overhead_ms": ms - results["plain_ms"],
                              "overhead_fraction": ms / results["plain_ms"] - 1}
            print(f"rank {rank:3d} {label:>20}: {ms:7.2f} ms  (+{ms - results['plain_ms']:6.2f} ms, "
                  f"{100 * (ms / results['plain_ms'] - 1):+5.1f}%)")
        figures["adapted_layers"] = len(next(p for p in runner.parts if p.name == "lora").layers)
        results["ranks"][str(rank)] = figures
        runner.close()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1) + "\n")
    print(f"report: {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
