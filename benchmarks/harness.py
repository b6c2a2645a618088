"""The benchmark run: every system, one after the other, on the same plans; then the report.

Order: Kiln (its closed loops give the capacity that load-based open loops are set from, and its records give
the work the limit is computed on), the sequential baseline, static batching, the limit, and the memory check of
a plain `kiln serve --demo`. Each runs in its own process with the same torch thread count.
"""

from __future__ import annotations

import bisect
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from . import report as reporting
from .components import in_run_seconds, shape_key, work_from_records, work_seconds, parse_shape_key
from .load import Outcome, percentiles, run_plan, summarize
from .machine import REPO, cpu_seconds, load_average, machine_facts
from .scenarios import Plan, Scenario, plan as draw_plans, same_mix
from .systems import BenchError, KilnHttp, run_worker

SYSTEMS = ("kiln", "kiln+idle", "sequential", "static", "limit")
Log = Callable[[str], None]


@dataclass
class Settings:
    threads: int = 1  # torch intra-op threads, the same for every system
    max_batch_size: int = 16  # Kiln's images per forward and static batching's images per call
    max_queue_size: int = 4096  # Kiln's bound; high so that open loops measure latency, not 429s
    static_wait_s: float = 0.05  # static batching waits up to this long after the oldest request to fill a batch
    systems: tuple[str, ...] = SYSTEMS
    reference_size: bool = False  # real-size random-weight models (engine.tiny.build_reference), for GPUs
    device: str = "auto"
    torch_dtype: str | None = None
    backend: str | None = None  # Kiln's launch option `backend` (None: its default, auto); baselines are diffusers
    warmup: bool = True
    rounds: int = 1  # each system runs every plan this many times, alternating systems; figures pool the rounds
    memory_check: bool = True
    memory_check_requests: int = 64
    memory_check_concurrency: int = 16
    # Models launched idle beside the measured ones on a second Kiln server, the system "kiln+idle": what an
    # unused neighbour costs (nothing, since engine/openmp.py). Empty: that system does not run.
    idle_neighbours: tuple[str, ...] = ()
    logs: Path = field(default_factory=lambda: REPO / "benchmarks" / "results" / "logs")


# --- models -------------------------------------------------------------------------------------------------------
def model_options(settings: Settings, model: str, log: Log) -> dict[str, Any]:
    """Launch options every system loads `model` with: tiny, or a built reference-size checkpoint."""
    options: dict[str, Any] = {"device": settings.device}
    if settings.torch_dtype:
        options["torch_dtype"] = settings.torch_dtype
    if settings.backend:
        options["backend"] = settings.backend
    if not settings.reference_size:
        options["tiny"] = True
        return options
    import os

    import torch

    from kiln.engine.tiny import build_reference

    root = Path(os.environ.get("KILN_CACHE", REPO / ".kiln-cache")) / "reference" / model
    if not (root / "model_index.json").is_file():
        log(f"building the reference-size checkpoint of {model} in {root} (random weights)")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        build_reference(model, root, dtype=torch.float16, device=device)
    options["model_path"] = str(root)
    return options


def warmup_plans(plans: list[Plan], max_batch_size: int) -> list[Plan]:
    """One request of each distinct batch key alone, then a full batch of the commonest key (first forwards are
    slow, and allocators settle); the same for every system, and never measured."""
    requests = [request for plan in plans for request in plan.requests]
    keys = Counter(request.batch_key for request in requests)
    first = {request.batch_key: request for request in reversed(requests)}
    singles = [replace(first[key], id=f"warmup-single-{i}", at=0.0) for i, key in enumerate(keys)]
    common = first[keys.most_common(1)[0][0]]
    burst = [replace(common, id=f"warmup-burst-{i}", seed=common.seed + i, at=0.0) for i in range(max_batch_size)]
    return [Plan("warmup-single", "warmup", "closed", singles, concurrency=1),
            Plan("warmup-burst", "warmup", "burst", burst, concurrency=len(burst))]


# --- Kiln -----------------------------------------------------------------------------------------------------------
def _merge_records(runs: list[dict[str, Any]]) -> dict[str, dict[str, list]]:
    """Per model, the server's records of every run concatenated (request timings left out)."""
    merged: dict[str, dict[str, list]] = {}
    for run in runs:
        for model, records in run["stats"]["models"].items():
            target = merged.setdefault(model, {key: [] for key in ("steps", "admits", "encodes", "forwards",
                                                                   "decodes", "parts")})
            for key in target:
                target[key] += records.get(key, [])
    return merged


def _attach_admission(run: dict[str, Any]) -> list[float]:
    """Set each outcome's first-step time from the server's request records; returns the server-side admission
    delays (server arrival -> first step done)."""
    timings = {rid: entry for records in run["stats"]["models"].values() for rid, entry in records["requests"].items()}
    delays = []
    for outcome in run["outcomes"]:
        entry = timings.get(outcome.id)
        if entry is not None and entry[1] is not None:
            outcome.first_step = entry[1]
            delays.append(entry[1] - entry[0])
    return delays


def _admission_floors(run: dict[str, Any]) -> list[tuple[float, float]]:
    """Per request, (floor, excess) of its server-side admission delay. The floor is what a step-level scheduler
    cannot avoid: the rest of its model's step in flight when the request arrived, plus its own first step; the
    excess is the rest (decodes of finished jobs, prompt encoding, job set-up, waiting for a free slot)."""
    parts = []
    for records in run["stats"]["models"].values():
        steps = sorted((start, start + seconds) for start, seconds, *_ in records["steps"])
        starts = [start for start, _ in steps]
        for submitted, first_step, *_ in records["requests"].values():
            if first_step is None:
                continue
            own = bisect.bisect_right(starts, first_step) - 1  # the last step to start before the stamp
            before = bisect.bisect_right(starts, submitted) - 1
            if own < 0:
                continue
            in_flight = max(0.0, steps[before][1] - submitted) if before >= 0 else 0.0
            floor = in_flight + (steps[own][1] - steps[own][0]) if before != own else first_step - submitted
            parts.append((floor, first_step - submitted - floor))
    return parts


def _kiln_figures(runs: list[dict[str, Any]], max_batch_size: int) -> dict[str, Any]:
    """What the server's records say about batching and where its time went, over all runs of a plan."""
    delays = [delay for run in runs for delay in _attach_admission(run)]
    floors = [part for run in runs for part in _admission_floors(run)]
    merged = _merge_records(runs)
    steps = [row for records in merged.values() for row in records["steps"]]
    forwards = [row for records in merged.values() for row in records["forwards"]]
    admits = [row for records in merged.values() for row in records["admits"]]
    encodes = [row for records in merged.values() for row in records["encodes"] if row[1]]
    decodes = [row for records in merged.values() for row in records["decodes"]]
    jobs = [row[4] for row in steps]
    rows = [row[2] for row in forwards]
    step_seconds = [row[1] for row in steps]
    parts: dict[str, dict[str, Any]] = {}
    for name, _, _, using, seconds in (row for records in merged.values() for row in records["parts"]):
        part = parts.setdefault(name, {"forwards": 0, "rows": 0, "seconds": 0.0})
        part["forwards"] += 1
        part["rows"] += using
        part["seconds"] += seconds
    for part in parts.values():  # per forward that had rows using the part (ControlNet: its sub-forwards)
        part["mean_rows"] = part["rows"] / part["forwards"]
        part["mean_seconds"] = part["seconds"] / part["forwards"]
    return {
        "parts": parts,
        "forward_s": percentiles([row[3] for row in forwards]),
        "batches": {
            "steps": len(steps),
            "forwards": len(forwards),
            "mean_images_per_forward": sum(jobs) / len(jobs) if jobs else None,
            "occupancy": sum(jobs) / len(jobs) / max_batch_size if jobs else None,
            "mean_rows_per_forward": sum(rows) / len(rows) if rows else None,
            "histogram": {str(k): v for k, v in sorted(Counter(jobs).items())},
            "rows_histogram": {str(k): v for k, v in sorted(Counter(rows).items())},
        },
        "step_s": percentiles(step_seconds),
        "admit_s": percentiles([row[1] for row in admits]),
        "encode_per_admit_s": sum(row[2] for row in encodes) / len(admits) if admits else None,
        "server_admission_s": percentiles(delays),
        "admission_floor_s": percentiles([floor for floor, _ in floors]),
        "admission_excess_s": percentiles([excess for _, excess in floors]),
        "time_split_s": {
            "steps": sum(step_seconds),
            "admits": sum(row[1] for row in admits),
            **{f"in_run_{key}": value for key, value in in_run_seconds(
                {"encodes": encodes, "forwards": forwards, "decodes": decodes}).items()},
        },
    }


def with_lora_files(scenario: Scenario) -> Scenario:
    """The scenario with the LoRAs of its `launch` table as a peft_model_config: `tiny_loras = [names]` (the
    tests' tiny LoRAs) and `loras = {name = {rank, alpha, denoiser = [layer names], text}}` (made with peft on
    the tiny checkpoint by engine.tiny.write_lora, kept in $KILN_CACHE/bench-loras). LoRA files fit one model,
    so such a scenario has one."""
    launch = dict(scenario.launch)
    if "loras" not in launch and "tiny_loras" not in launch:
        return scenario
    models = {item.model for item in scenario.mix}
    if len(models) != 1:
        raise BenchError(f"scenario {scenario.name}: loras in its launch table need one model, got {sorted(models)}")
    import hashlib
    import json
    import os

    from kiln.engine.tiny import LoraRecipe, tiny_checkpoint, tiny_loras, write_lora

    model = models.pop()
    listed = [{"lora_name": name, "local_path": str(tiny_loras(model) / f"{name}.safetensors")}
              for name in launch.pop("tiny_loras", [])]
    for name, recipe in launch.pop("loras", {}).items():
        digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
        folder = Path(os.environ.get("KILN_CACHE", REPO / ".kiln-cache")) / "bench-loras" / model / digest
        path = folder / f"{name}.safetensors"
        if not path.is_file():
            fields = {**recipe, "denoiser": tuple(recipe["denoiser"]) if "denoiser" in recipe else None}
            write_lora(model, tiny_checkpoint(model), name, LoraRecipe(**fields), folder)
        listed.append({"lora_name": name, "local_path": str(path)})
    return replace(scenario, launch={**launch, "peft_model_config": {"lora_list": listed}})


def idle_neighbours(names: list[str], measured: list[str]) -> tuple[str, ...]:
    """`--idle-neighbours` names; "all" stands for what `kiln serve --demo` loads besides the measured models."""
    from kiln.engine.catalogue import CATALOGUE, DEFAULT_OCR_MODEL

    if names == ["all"]:
        names = [*CATALOGUE, DEFAULT_OCR_MODEL]
    return tuple(name for name in dict.fromkeys(names) if name not in measured)


def neighbour_options(name: str, settings: Settings) -> dict[str, Any]:
    from kiln.engine.catalogue import CATALOGUE

    return {"tiny": True, "device": settings.device} if name in CATALOGUE else {}  # OCR: its shipped weights


def run_kiln(settings: Settings, scenarios: list[Scenario], plans: list[Plan] | None, models: dict[str, dict],
             log: Log, neighbours: tuple[str, ...] = ()) -> tuple[list[Plan], dict[str, dict], dict[str, Any]]:
    """One round of every plan on a fresh Kiln server (with `neighbours` launched and left idle). Without `plans`
    (the first round) the scenarios are planned here, open loops with `load` at that fraction of the capacity
    just measured. Returns the plans, per plan the raw run, and facts about the server."""
    name = "kiln+idle" if neighbours else "kiln"
    kiln = KilnHttp(settings.threads, settings.logs / f"{name}-server.log")
    runs: dict[str, dict] = {}
    notes: dict[str, Any] = {"pid": kiln.pid, "idle_neighbours": list(neighbours)}
    try:
        started = time.monotonic()
        launched: dict[str, dict] = {}

        def launch(extra: dict[str, Any]) -> bool:
            """Every model launched with a plan's extra options (relaunched where they changed); whether any was."""
            changed = False
            for model, options in models.items():
                wanted = {**options, "max_batch_size": settings.max_batch_size,
                          "max_queue_size": settings.max_queue_size, **extra}
                if launched.get(model) != wanted:
                    kiln.launch(model, wanted)
                    launched[model], changed = wanted, True
            return changed

        launch({})
        for model in neighbours:
            kiln.launch(model, neighbour_options(model, settings))
        notes["backends"] = {model: kiln.describe(model).get("backend") for model in models}
        notes["load_seconds"] = time.monotonic() - started
        notes["memory_after_load"] = kiln.memory()

        def measure(plan: Plan) -> dict[str, Any]:
            if launch(plan.launch) and settings.warmup:
                for warm in warmup_plans([plan], settings.max_batch_size):
                    run_plan(warm, kiln)
            log(f"{name}: {plan.name} ({len(plan.requests)} requests)")
            kiln.stats(reset=True)
            before = load_average()
            cpu_server, cpu_client = cpu_seconds(kiln.pid), cpu_seconds()
            outcomes, start = run_plan(plan, kiln)
            cpu = cpu_seconds(kiln.pid) - cpu_server
            client = cpu_seconds() - cpu_client
            stats = kiln.stats(reset=True)
            return {"outcomes": outcomes, "start": start, "cpu_s": cpu, "client_cpu_s": client, "stats": stats,
                    "memory": stats["memory"], "load_before": before, "load_after": load_average()}

        drawn = plans or [p for s in scenarios for p in draw_plans(s, rate=1.0)]  # rates do not change requests
        if settings.warmup:
            for plan in warmup_plans(drawn, settings.max_batch_size):
                run_plan(plan, kiln)
        if plans is not None:
            for plan in plans:
                runs[plan.name] = measure(plan)
        else:
            plans = []
            for scenario in scenarios:
                rate = capacity = None
                if scenario.kind == "open" and scenario.rate is None:
                    capacity, source = _capacity(scenario, plans, runs)
                    if capacity is None:
                        probe = draw_plans(Scenario(f"{scenario.name}-capacity", "closed", scenario.mix,
                                                    concurrency=(settings.max_batch_size,),
                                                    requests=settings.max_batch_size * 4, seed=scenario.seed))[0]
                        capacity, source = summarize([_run_pair(measure(probe))])["images_per_s"], probe.name
                    rate = scenario.load * capacity
                    notes.setdefault("capacity", {})[scenario.name] = {"images_per_s": capacity, "from": source}
                for plan in draw_plans(scenario, rate):
                    if capacity is not None:
                        plan.notes["capacity_images_per_s"] = capacity
                    runs[plan.name] = measure(plan)
                    plans.append(plan)
        notes["memory_at_end"] = kiln.memory()
    finally:
        kiln.stop()
    return plans, runs, notes


def _run_pair(run: dict[str, Any]) -> tuple[list[Outcome], float]:
    return run["outcomes"], run["start"]


def _capacity(scenario: Scenario, plans: list[Plan], runs: dict[str, dict]) -> tuple[float | None, str | None]:
    """Kiln's measured capacity on the scenario's mix: its best closed-loop throughput on the same mix."""
    best: tuple[float | None, str | None] = (None, None)
    for plan in plans:
        if plan.kind == "closed" and same_mix(plan.mix, scenario.mix):
            value = summarize([_run_pair(runs[plan.name])])["images_per_s"]
            if best[0] is None or value > best[0]:
                best = (value, plan.name)
    return best


# --- baselines and the limit -----------------------------------------------------------------------------------------
def run_baseline(system: str, settings: Settings, plans: list[Plan], models: dict[str, dict], log: Log
                 ) -> tuple[dict[str, dict], dict[str, Any]]:
    """One round of every plan on a fresh baseline worker; per plan the raw run."""
    log(f"{system}: {len(plans)} plans")
    job = {
        "system": system, "threads": settings.threads, "max_batch_size": settings.max_batch_size,
        "static_wait_s": settings.static_wait_s, "models": models,
        "warmup": [p.to_json() for p in warmup_plans(plans, settings.max_batch_size)] if settings.warmup else [],
        "plans": [plan.to_json() for plan in plans],
    }
    raw = run_worker(job, settings.threads, settings.logs / f"{system}.log")
    runs = {}
    for name, data in raw["plans"].items():
        runs[name] = {**data, "outcomes": [Outcome(**item) for item in data["outcomes"]]}
    return runs, raw["loaded"]


def finalize(system: str, runs: list[dict[str, Any]], settings: Settings) -> dict[str, Any]:
    """One system's figures on one plan, over its rounds."""
    from .baselines import batch_summary

    is_kiln = system.startswith("kiln")
    kiln_figures = _kiln_figures(runs, settings.max_batch_size) if is_kiln else {}  # sets first steps
    summary = summarize([_run_pair(run) for run in runs])
    cpu = sum(run["cpu_s"] for run in runs)
    figures = {
        **summary,
        "cpu_s": cpu,
        "images_per_cpu_s": summary["images"] / cpu if cpu > 0 else None,
        "load_before": [run["load_before"] for run in runs],
        "load_after": [run["load_after"] for run in runs],
        "memory": {
            "rss_bytes": runs[-1]["memory"].get("rss_bytes"),
            "peak_rss_bytes": max(run["memory"].get("peak_rss_bytes") or 0 for run in runs),
            **{key: max(run["memory"].get(key) or 0 for run in runs) for key in runs[-1]["memory"]
               if key.startswith("gpu_peak")},
        },
    }
    if is_kiln:
        figures["client_cpu_s"] = sum(run["client_cpu_s"] for run in runs)
        figures.update(kiln_figures)
    else:
        figures["batches"] = batch_summary([call for run in runs for call in run["calls"]], settings.max_batch_size)
        figures["batch_limit"] = settings.max_batch_size if system == "static" else 1
    return figures


def run_limit(settings: Settings, plans: list[Plan], kiln_runs: dict[str, list[dict]], kiln: dict[str, dict],
              models: dict[str, dict], backends: dict[str, Any], log: Log) -> dict[str, dict]:
    """Time every component shape Kiln ran, in isolation, with the backends Kiln ran (`backends`: per model its
    described backend); per plan, images / (work at those times)."""
    records = {name: _merge_records(runs) for name, runs in kiln_runs.items()}
    shapes: dict[str, set] = {}
    for plan in plans:
        for model, model_records in records.get(plan.name, {}).items():
            shapes.setdefault(model, set()).update(work_from_records(model_records))
    log(f"limit: timing {sum(len(s) for s in shapes.values())} component shapes")
    job = {"system": "limit", "threads": settings.threads, "models": {m: models[m] for m in shapes},
           "max_batch_size": settings.max_batch_size,
           "backends": {m: (backends.get(m) or {}).get("backend", "eager") for m in shapes},
           "work": {model: sorted(shape_key(s) for s in found) for model, found in shapes.items()}}
    raw = run_worker(job, settings.threads, settings.logs / "limit.log")
    times = {model: {parse_shape_key(key): value for key, value in found.items()}
             for model, found in raw["times"].items()}
    results = {}
    for plan in plans:
        if plan.name not in records:
            continue
        seconds = {"encode": 0.0, "forward": 0.0, "decode": 0.0}
        in_run = {"encode": 0.0, "forward": 0.0, "decode": 0.0}
        calls: Counter = Counter()
        for model, model_records in records[plan.name].items():
            work = work_from_records(model_records)
            for key, value in work_seconds(work, times[model]).items():
                seconds[key] += value
            for key, value in in_run_seconds(model_records).items():
                in_run[key] += value
            for shape, count in work.items():
                calls[shape[0]] += count
        total, in_run_total = sum(seconds.values()), sum(in_run.values())
        images = kiln[plan.name]["images"]
        results[plan.name] = {
            "images": images,
            "images_per_s": images / total if total else None,
            "component_seconds": {**seconds, "total": total},
            "calls": dict(calls),
            # The same calls as they ran inside Kiln's run (slower when the machine is shared): Kiln's images/s
            # over this is the part of its time that is not component work.
            "in_run_component_seconds": {**in_run, "total": in_run_total},
            "in_run_images_per_s": images / in_run_total if in_run_total else None,
            "load_after": raw["load_after"],
        }
    return results


# --- memory check ------------------------------------------------------------------------------------------------------
def memory_check(settings: Settings, log: Log) -> dict[str, Any]:
    """A plain `kiln serve --demo` (all seven tiny models), a closed loop of C clients over all seven models, then
    the server's RSS."""
    from kiln.engine.catalogue import CATALOGUE

    from .scenarios import RequestClass

    names = list(CATALOGUE)
    log(f"memory check: kiln serve --demo, {settings.memory_check_concurrency} concurrent clients over {len(names)} models")
    kiln = KilnHttp(settings.threads, settings.logs / "kiln-demo.log", module="kiln.server.cli",
                    args=("--demo", "--log-level", "warning"))
    try:
        kiln.wait_ready(names)
        kiln.wait_ready(kiln.models())  # whatever else --demo launches (an OCR model) counts too
        loaded = kiln.memory()
        mix = tuple(RequestClass(model=name, width=64, height=64, steps=4, guidance=CATALOGUE[name].default_guidance)
                    for name in names)
        scenario = Scenario("memory-check", "closed", mix, concurrency=(settings.memory_check_concurrency,),
                            requests=settings.memory_check_requests)
        plan = draw_plans(scenario)[0]
        before = load_average()
        outcomes, start = run_plan(plan, kiln)
        summary = summarize([(outcomes, start)])
        after = kiln.memory()
    finally:
        kiln.stop()
    limit = 10**9
    return {
        "command": "kiln serve --demo --threads %d" % settings.threads,
        "models": names, "concurrency": settings.memory_check_concurrency, "requests": summary["requests"],
        "requests_failed": summary["requests_failed"], "images_per_s": summary["images_per_s"],
        "rss_after_load_bytes": loaded["rss_bytes"], "rss_after_run_bytes": after["rss_bytes"],
        "peak_rss_bytes": after["peak_rss_bytes"], "limit_bytes": limit,
        "met": after["rss_bytes"] is not None and after["rss_bytes"] < limit and summary["requests_failed"] == 0,
        "load_before": before, "load_after": load_average(),
    }


# --- the whole run -------------------------------------------------------------------------------------------------------
def run_benchmark(scenarios: list[Scenario], settings: Settings, log: Log = print) -> dict[str, Any]:
    unknown = set(settings.systems) - set(SYSTEMS)
    if unknown:
        raise BenchError(f"unknown systems {sorted(unknown)}; known: {', '.join(SYSTEMS)}")
    if "kiln" not in settings.systems:
        if "limit" in settings.systems:
            raise BenchError("the limit is computed from Kiln's batches: run it with kiln")
        if any(s.kind == "open" and s.rate is None for s in scenarios):
            raise BenchError("open loops with `load` need Kiln's capacity: run with kiln or give `rate`")
    started_at = time.time()
    facts = machine_facts(settings.threads)
    load_start = load_average()
    log(f"machine: {facts['cpu_model']}, {facts['cpus_usable']} cpus, torch threads {settings.threads}, "
        f"load average {load_start}")
    models: dict[str, dict] = {}
    for scenario in scenarios:
        for item in scenario.mix:
            if item.model not in models:
                models[item.model] = model_options(settings, item.model, log)
            if item.controlnet:
                if set(settings.systems) - {"kiln"}:
                    raise BenchError("ControlNet requests run on kiln only (the baselines are plain pipelines): "
                                     "run this scenario file with --systems kiln")
                names = models[item.model].setdefault("controlnet", [])
                if item.controlnet not in names:
                    names.append(item.controlnet)
            if item.lora and set(settings.systems) - {"kiln"}:
                raise BenchError("LoRA requests run on kiln only (the baselines are plain pipelines): run this "
                                 "scenario file with --systems kiln")
    scenarios = [with_lora_files(scenario) for scenario in scenarios]

    plans: list[Plan] | None = None if "kiln" in settings.systems else [p for s in scenarios for p in draw_plans(s)]
    neighbours = idle_neighbours(list(settings.idle_neighbours), list(models))
    measured = [s for s in ("kiln", "kiln+idle", "sequential", "static") if s in settings.systems or
                (s == "kiln+idle" and neighbours)]
    raw: dict[str, dict[str, list[dict]]] = {system: {} for system in measured}
    facts_by_system: dict[str, Any] = {}
    for round_index in range(settings.rounds):
        if settings.rounds > 1:
            log(f"round {round_index + 1} of {settings.rounds}")
        for system in measured:
            if system.startswith("kiln"):
                plans, runs, notes = run_kiln(settings, scenarios, plans, models, log,
                                              neighbours if system == "kiln+idle" else ())
                facts_by_system.setdefault(system, []).append(notes)
            else:
                runs, loaded = run_baseline(system, settings, plans, models, log)
                facts_by_system.setdefault(system, []).append(loaded)
            for name, run in runs.items():
                raw[system].setdefault(name, []).append(run)
    assert plans is not None
    systems: dict[str, dict[str, dict]] = {
        system: {name: finalize(system, runs, settings) for name, runs in by_plan.items()}
        for system, by_plan in raw.items()
    }
    if "limit" in settings.systems:
        systems["limit"] = run_limit(settings, plans, raw["kiln"], systems["kiln"], models,
                                     facts_by_system["kiln"][0]["backends"], log)
    memory = memory_check(settings, log) if settings.memory_check else None
    return reporting.assemble(
        plans=plans, systems=systems, facts=facts, settings=settings, system_facts=facts_by_system,
        memory=memory, load_start=load_start, load_end=load_average(), started_at=started_at,
    )
