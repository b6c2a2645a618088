"""The forward overhead of per-row LoRA: `python -m kiln.benchmarks.lora_forward [--ranks 16 64] [--rows 32]
[--reference-size]`.

One batched denoiser forward of SD1.5 at 64x64 (`--rows` rows: 16 images with CFG by default; the tiny checkpoint,
or with `--reference-size` the real-size random-weight one `kiln bench --reference-size` builds) on a model
launched without LoRAs and on models in per-row mode with four random LoRAs of each rank (made with peft,
`init_lora_weights=False`, on the tiny LoRAs' layers: attention, feed-forward, proj_in and the resnet
convolutions). Per rank: no row with a LoRA, every row one of the four (K=1), every row three stacked (K=3).
Each rank's model is timed in turns with the plain one, one forward each per round, so a neighbour's load on a
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


def _loras(checkpoint: Path, rank: int, folder: Path) -> list[dict]:
    """Four random LoRAs of `rank` made on the checkpoint's UNet, saved as diffusers files."""
    from diffusers import DiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from kiln.engine.tiny import LORA_DENOISER_TARGETS

    pipeline = DiffusionPipeline.from_pretrained(checkpoint)
    listed = []
    for index in range(4):
        name = f"r{rank}-{index}"
        torch.manual_seed(1000 * rank + index)
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_DENOISER_TARGETS["sd"],
                            init_lora_weights=False)
        pipeline.unet.add_adapter(config, adapter_name=name)
        layers = get_peft_model_state_dict(pipeline.unet, adapter_name=name)
        type(pipeline).save_lora_weights(folder, unet_lora_layers=layers, weight_name=f"{name}.safetensors")
        pipeline.unet.delete_adapters(name)
        listed.append({"lora_name": name, "local_path": str(folder / f"{name}.safetensors")})
    return listed


def _runner(base: dict, options: dict):
    from kiln.engine.catalogue import get_spec
    from kiln.engine.options import parse_launch_options
    from kiln.engine.runner import Runner

    spec = get_spec(MODEL)
    runner = Runner(MODEL, spec, parse_launch_options(spec, {**base, "max_batch_size": 16, **options}))
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
def _interleaved(plain, runner, rows: int, repeat: int) -> dict[str, list[float]]:
    """Milliseconds per forward of the plain runner and of the LoRA runner's variants, one of each per round."""
    from kiln.engine.backends.base import ExampleInputs

    inputs = ExampleInputs(plain.executor.family, 64, 64).named(rows)
    selections = _selections(rows)
    times: dict[str, list[float]] = {"plain": [], **{label: [] for label in VARIANTS}}
    for index in range(repeat + 3):
        keep = index >= 3  # the first rounds warm up
        for label, ms in (("plain", _forward(plain, inputs)),
                          *((label, _forward(runner, inputs, selection)) for label, selection in selections.items())):
            if keep:
                times[label].append(ms)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kiln.benchmarks.lora_forward", description=__doc__)
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--rows", type=int, default=32, help="rows per forward (default: 16 images with CFG)")
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reference-size", action="store_true", help="the real-size random-weight SD1.5")
    parser.add_argument("--output", type=Path,
                        default=Path(__file__).resolve().parent / "results" / "lora_forward.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from kiln.engine.tiny import tiny_checkpoint

    from .harness import Settings, model_options
    from .machine import load_average, machine_facts

    # eager for both: per-row LoRA runs on eager or compile, and auto may pick onnx or openvino for the plain model.
    base = model_options(Settings(reference_size=args.reference_size, backend="eager"), MODEL, print)
    checkpoint = Path(base["model_path"]) if args.reference_size else tiny_checkpoint(MODEL)
    plain = _runner(base, {})
    results = {"machine": machine_facts(args.threads), "model": "reference-size" if args.reference_size else "tiny",
               "rows": args.rows, "repeat": args.repeat, "ranks": {}}
    for rank in args.ranks:
        with tempfile.TemporaryDirectory() as folder:
            runner = _runner(base, {"peft_model_config": {"lora_list": _loras(checkpoint, rank, Path(folder))},
                                    "max_loras": 4, "max_lora_rank": rank, "lora_default": "none"})
        before = load_average()
        times = _interleaved(plain, runner, args.rows, args.repeat)
        plain_ms = statistics.median(times["plain"])
        figures: dict = {"plain_ms": plain_ms, "load_average": [before, load_average()],
                         "adapted_layers": len(next(p for p in runner.parts if p.name == "lora").layers)}
        print(f"rank {rank:3d}: plain {plain_ms:.2f} ms per forward of {args.rows} rows, "
              f"{figures['adapted_layers']} adapted layers")
        for label in VARIANTS:
            ms = statistics.median(times[label])
            figures[label] = {"ms": ms, "overhead_ms": ms - plain_ms, "overhead_fraction": ms / plain_ms - 1}
            print(f"rank {rank:3d} {label:>20}: {ms:8.2f} ms  (+{ms - plain_ms:7.2f} ms, "
                  f"{100 * (ms / plain_ms - 1):+5.1f}%)")
        results["ranks"][str(rank)] = figures
        runner.close()
    plain.close()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1) + "\n")
    print(f"report: {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
