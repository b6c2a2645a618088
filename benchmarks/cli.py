"""`kiln bench` / `python -m benchmarks`: run the scenarios on every system and write the JSON report and plot.

Imports stay light here (no torch) so that `kiln --help` stays fast; the harness is imported when a run starts.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SYSTEM_NAMES = ("kiln", "sequential", "static", "limit")  # and kiln+idle, with --idle-neighbours


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .scenarios import DEFAULT_SCENARIO_FILE, SCENARIO_DIR

    parser.add_argument("--scenario", type=Path, default=DEFAULT_SCENARIO_FILE, metavar="FILE",
                        help="scenario file, TOML or JSON (default: benchmarks/scenarios/default.toml)")
    parser.add_argument("--systems", nargs="+", choices=SYSTEM_NAMES, default=list(SYSTEM_NAMES),
                        help="systems to run (default: all)")
    parser.add_argument("--concurrency", type=int, nargs="+", metavar="C",
                        help="override the concurrency levels of closed loops")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every scenario's request count (e.g. 0.25 for a quick run)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every system this many times, alternating (figures pool the rounds; default: 1)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of every system (default: 1; 2 threads collapse on a busy 2-core box)")
    parser.add_argument("--max-batch-size", type=int, default=16,
                        help="Kiln's images per forward and static batching's images per call (default: 16)")
    parser.add_argument("--static-wait", type=float, default=0.05, metavar="SECONDS",
                        help="how long static batching waits after the oldest request for a batch to fill")
    parser.add_argument("--reference-size", action="store_true",
                        help="real-size random-weight models (engine.tiny.build_reference); for GPU machines")
    parser.add_argument("--device", default="auto", help="launch option device (default: auto)")
    parser.add_argument("--torch-dtype", choices=["float32", "float16", "bfloat16"],
                        help="launch option torch_dtype (default: the model's)")
    parser.add_argument("--backend", help="Kiln's launch option backend (default: auto); the baselines run diffusers")
    parser.add_argument("--idle-neighbours", nargs="+", default=[], metavar="MODEL",
                        help="also run Kiln as system kiln+idle, with these models launched beside the measured ones "
                             "and left idle ('all': what kiln serve --demo loads); ratio kiln+idle/kiln")
    parser.add_argument("--no-warmup", action="store_true", help="skip the unmeasured warm-up requests")
    parser.add_argument("--no-memory-check", action="store_true",
                        help="skip the `kiln serve --demo` memory check")
    parser.add_argument("--wait-quiet", type=float, metavar="LOAD",
                        help="first wait (up to 10 minutes) for the 1-minute load average to drop below LOAD")
    parser.add_argument("--soak", type=Path, nargs="?", const=SCENARIO_DIR / "soak.toml", metavar="FILE",
                        help="run the memory soak instead (launch, generate, terminate, repeat; RSS per cycle) "
                        "from a soak file (default: benchmarks/scenarios/soak.toml)")
    parser.add_argument("--soak-minutes", type=float, metavar="MINUTES", help="override the soak file's minutes")
    parser.add_argument("--output", type=Path, help="the JSON report (default: benchmarks/results/latest.json; "
                        "soak.json for --soak)")
    parser.add_argument("--plot", type=Path, help="the PNG plot (default: the report's path with .png)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--logs", type=Path, help="server and worker logs (default: beside the report, logs/)")


def _scaled(scenario, scale: float, concurrency: list[int] | None):
    changes: dict = {}
    if concurrency and scenario.kind == "closed":
        changes["concurrency"] = tuple(concurrency)
    if scale != 1.0:
        if scenario.requests is not None:
            changes["requests"] = max(1, round(scenario.requests * scale))
        elif scenario.kind == "closed":
            changes["requests_per_client"] = max(1, round((scenario.requests_per_client or 8) * scale))
        else:
            changes["requests"] = max(1, round((32 if scenario.kind == "burst" else 200) * scale))
    return replace(scenario, **changes)


def run_soak_command(args: argparse.Namespace) -> int:
    """`--soak`: the memory soak's report, with the RSS per cycle printed as it runs."""
    from .report import write_json
    from .scenarios import ScenarioError
    from .soak import load_soak_file, run_soak
    from .systems import BenchError

    try:
        soak = load_soak_file(args.soak)
    except ScenarioError as error:
        print(f"kiln bench: {error}", file=sys.stderr)
        return 2
    if args.soak_minutes is not None:
        soak = replace(soak, minutes=args.soak_minutes)
    output = args.output or RESULTS / "soak.json"
    try:
        report = run_soak(soak, args.threads, args.logs or output.parent / "logs",
                          log=lambda line: print(line, file=sys.stderr, flush=True))
    except BenchError as error:
        print(f"kiln bench: {error}", file=sys.stderr)
        return 1
    write_json(report, output)
    print(f"report: {output}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Run a benchmark from parsed arguments; prints a summary and where the report went."""
    if args.soak is not None:
        return run_soak_command(args)
    args.output = args.output or RESULTS / "latest.json"
    from .harness import Settings, run_benchmark
    from .machine import wait_for_quiet
    from .report import plot, summary_lines, write_json
    from .scenarios import ScenarioError, load_scenario_file
    from .systems import BenchError

    try:
        scenarios = [_scaled(s, args.scale, args.concurrency) for s in load_scenario_file(args.scenario)]
    except ScenarioError as error:
        print(f"kiln bench: {error}", file=sys.stderr)
        return 2
    if args.reference_size:
        import torch

        if not torch.cuda.is_available():
            print("kiln bench: warning: --reference-size without a GPU runs real-size models on the CPU "
                  "(very slow)", file=sys.stderr)
    if args.wait_quiet is not None:
        wait_for_quiet(args.wait_quiet, timeout=600, log=lambda line: print(line, file=sys.stderr))
    settings = Settings(
        threads=args.threads, max_batch_size=args.max_batch_size, static_wait_s=args.static_wait,
        systems=tuple(args.systems), reference_size=args.reference_size, device=args.device,
        torch_dtype=args.torch_dtype, backend=args.backend, warmup=not args.no_warmup, idle_neighbours=tuple(args.idle_neighbours), rounds=max(1, args.rounds), memory_check=not args.no_memory_check,
        logs=args.logs or args.output.parent / "logs",
    )
    try:
        report = run_benchmark(scenarios, settings, log=lambda line: print(line, file=sys.stderr, flush=True))
    except BenchError as error:
        print(f"kiln bench: {error}", file=sys.stderr)
        return 1
    write_json(report, args.output)
    print(f"report: {args.output}")
    if not args.no_plot:
        path = args.plot or args.output.with_suffix(".png")
        plot(report, path)
        print(f"plot: {path}")
    for line in summary_lines(report):
        print(line)
    return 0


def add_command(commands: argparse._SubParsersAction) -> None:
    """`kiln bench` (the `kiln.commands` entry point)."""
    bench = commands.add_parser("bench", help="benchmark Kiln against plain diffusers pipelines (benchmarks/README.md)")
    add_arguments(bench)
    bench.set_defaults(handler=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kiln bench", description="Benchmark Kiln against plain diffusers pipelines (see benchmarks/README.md).")
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))
