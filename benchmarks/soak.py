"""`kiln bench --soak [FILE]`: memory over time. A plain `kiln serve` process runs cycles of launch, generate at
each size, terminate, for a bounded time, and its RSS is read (from /proc) after each step of every cycle.

A server whose RSS after terminate keeps climbing cycle over cycle leaks or retains memory; one that levels off
is bounded. The soak is a benchmark, not a test: it asserts nothing and reports the figures (JSON), for
benchmarks/README.md. A soak file (TOML) holds one `[soak]` table:

    [soak]
    minutes = 10                                     # stop starting cycles after this long
    models = ["sdxl-turbo", "FLUX.1-schnell"]        # launched tiny, each cycle
    sizes = ["64x64", "512x512", "1024x1024"]        # one image of each size per model per cycle
    steps = 2
    concurrent = true                                # the cycle's generations all at once
"""

from __future__ import annotations

import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import httpx

from .machine import load_average, machine_facts
from .scenarios import ScenarioError, parse_size
from .systems import LAUNCH_SECONDS, BenchError, KilnHttp

MIB = 2**20


@dataclass(frozen=True)
class Soak:
    minutes: float = 10.0
    models: tuple[str, ...] = ("sdxl-turbo", "FLUX.1-schnell")
    sizes: tuple[tuple[int, int], ...] = ((64, 64), (512, 512), (1024, 1024))
    steps: int = 2
    concurrent: bool = True  # send a cycle's generations all at once (as clients do), else one after another
    max_cycles: int | None = None  # also stop after this many cycles (smoke runs)


def load_soak_file(path: Path) -> Soak:
    try:
        table = tomllib.loads(Path(path).read_text()).get("soak")
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ScenarioError(f"cannot read the soak file {path}: {error}") from None
    if not isinstance(table, dict):
        raise ScenarioError(f"{path}: needs a [soak] table")
    unknown = set(table) - set(Soak.__dataclass_fields__)
    if unknown:
        raise ScenarioError(f"{path}: unknown soak field(s) {sorted(unknown)}")
    fields = dict(table)
    if "models" in fields:
        fields["models"] = tuple(fields["models"])
    if "sizes" in fields:
        fields["sizes"] = tuple(parse_size(size, f"{path}: sizes") for size in fields["sizes"])
    return Soak(**fields)


def run_soak(soak: Soak, threads: int, logs: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the cycles and return the report: the server's RSS at start and, per cycle, after the launches
    ("loaded"), after the generations ("generated", with the peak so far) and after the terminates."""
    kiln = KilnHttp(threads, logs / "kiln-soak.log", module="kiln.server.cli", args=("--log-level", "warning"))
    cycles: list[dict[str, Any]] = []
    try:
        start = _mib(kiln.memory()["rss_bytes"])
        log(f"soak: {soak.models} at {soak.sizes}, {soak.minutes:g} min; server RSS {start} MiB at start")
        began = time.monotonic()
        while time.monotonic() - began < soak.minutes * 60 and len(cycles) < (soak.max_cycles or 10**9):
            cycles.append(_cycle(kiln, soak, len(cycles)))
            row = cycles[-1]
            log(f"cycle {row['cycle']}: {row['seconds']:.0f} s, RSS loaded {row['rss_loaded_mib']} MiB, generated "
                f"{row['rss_generated_mib']} (peak {row['peak_rss_mib']}), terminated {row['rss_terminated_mib']}")
    finally:
        kiln.stop()
    after = [row["rss_terminated_mib"] for row in cycles]
    return {
        "soak": asdict(soak), "threads": threads, "machine": machine_facts(threads),
        "load_average_end": load_average(), "rss_start_mib": start, "cycles": cycles,
        "rss_terminated_first_mib": after[0] if after else None, "rss_terminated_last_mib": after[-1] if after else None,
        "rss_terminated_max_mib": max(after, default=None),
    }


def _cycle(kiln: KilnHttp, soak: Soak, index: int) -> dict[str, Any]:
    started = time.monotonic()
    for model in soak.models:
        kiln.launch(model, {"tiny": True})
    loaded = kiln.memory()
    bodies = [{"model": model, "prompt": "a kiln in a field", "size": f"{width}x{height}", "seed": index,
               "num_inference_steps": soak.steps, "response_format": "b64_json"}
              for model in soak.models for width, height in soak.sizes]
    with ThreadPoolExecutor(max_workers=len(bodies) if soak.concurrent else 1) as pool:
        for body, response in zip(bodies, pool.map(lambda body: httpx.post(
                f"{kiln.endpoint}/v1/images/generations", json=body, timeout=LAUNCH_SECONDS), bodies)):
            if response.status_code != 200:
                raise BenchError(f"soak cycle {index}: {body['model']} at {body['size']}: {response.status_code} "
                                 f"{response.text[:300]}")
    generated = kiln.memory()
    for model in soak.models:
        httpx.delete(f"{kiln.endpoint}/v1/models/{model}", timeout=LAUNCH_SECONDS).raise_for_status()
    return {
        "cycle": index, "seconds": round(time.monotonic() - started, 1),
        "rss_loaded_mib": _mib(loaded["rss_bytes"]), "rss_generated_mib": _mib(generated["rss_bytes"]),
        "peak_rss_mib": _mib(generated["peak_rss_bytes"]), "rss_terminated_mib": _mib(kiln.memory()["rss_bytes"]),
    }


def _mib(value: int | None) -> int | None:
    return None if value is None else round(value / MIB)
