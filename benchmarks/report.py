"""The report: one JSON document (machine facts, settings, per plan every system's figures and the ratios, the
targets) and a PNG (throughput against concurrency, latency CDFs).

Ratios are quotients of the reported images/s: `kiln/sequential = systems.kiln.images_per_s /
systems.sequential.images_per_s`, and so on; `cpu_ratios` are the same quotients of images per CPU-second.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .scenarios import Plan

REPORT_VERSION = 1
RATIOS = (("kiln", "sequential"), ("kiln", "static"), ("kiln", "limit"), ("kiln+idle", "kiln"),
          ("kiln+idle", "sequential"))

# The targets of issue #6, on the default scenario file's plans.
TARGET_PLAN_CLOSED = "closed-c16"
TARGET_PLAN_OPEN = "poisson"
# Issue 11's, on scenarios/lora.toml's: per-row LoRA against the same load without LoRA and one lane per LoRA set.
LORA_PLANS = {"mixed": "lora-mixed-c16", "none": "lora-none-c16", "per_config": "lora-per-config-c16"}


def _iso(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).isoformat(timespec="seconds")


def ratios(systems: dict[str, dict], figure: str = "images_per_s") -> dict[str, float]:
    """Quotients of one figure between systems, e.g. {"kiln/sequential": kiln's / sequential's}."""
    out: dict[str, float] = {}
    for top, bottom in RATIOS:
        a = systems.get(top, {}).get(figure)
        b = systems.get(bottom, {}).get(figure)
        if a is not None and b:
            out[f"{top}/{bottom}"] = a / b
    return out


def _plan_entry(plan: Plan, systems: dict[str, dict[str, dict]]) -> dict[str, Any]:
    found = {name: results[plan.name] for name, results in systems.items() if plan.name in results}
    return {
        "name": plan.name, "scenario": plan.scenario, "kind": plan.kind, "concurrency": plan.concurrency,
        "rate_images_per_s": plan.rate, "load": plan.load, "requests": len(plan.requests), "images": plan.images,
        "models": plan.models, "mix": [asdict(item) for item in plan.mix], "notes": plan.notes,
        "systems": found, "ratios": ratios(found),
        # Images per CPU-second of each system's process: less sensitive than wall time to other processes on
        # a shared machine (the limit has no CPU figure).
        "cpu_ratios": ratios(found, "images_per_cpu_s"),
    }


def targets(plans: list[dict[str, Any]], memory: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Each target with the measured value, its bound and whether it was met (None: not measured)."""
    by_name = {plan["name"]: plan for plan in plans}
    out: list[dict[str, Any]] = []

    def add(name: str, description: str, value: float | None, bound: float | None, higher_is_better: bool,
            plan: str | None) -> None:
        met = None
        if value is not None and bound is not None:
            met = value >= bound if higher_is_better else value < bound
        out.append({"name": name, "description": description, "plan": plan, "value": value, "bound": bound,
                    "met": met})

    closed = by_name.get(TARGET_PLAN_CLOSED)
    ratio = closed["ratios"] if closed else {}
    add("kiln_vs_sequential", "16 clients, SD1.5 64x64, g=7.5, 8 steps: Kiln images/s >= 4x the sequential baseline",
        ratio.get("kiln/sequential"), 4.0, True, TARGET_PLAN_CLOSED if closed else None)
    add("kiln_vs_limit", "same setup: Kiln images/s >= 0.8x the limit", ratio.get("kiln/limit"), 0.8, True,
        TARGET_PLAN_CLOSED if closed else None)
    if "kiln+idle/sequential" in ratio:
        add("kiln_with_idle_neighbours_vs_sequential", "same setup on a server that also holds idle models "
            "(--idle-neighbours): Kiln images/s >= 4x the sequential baseline", ratio["kiln+idle/sequential"], 4.0,
            True, TARGET_PLAN_CLOSED)

    open_plan = by_name.get(TARGET_PLAN_OPEN)
    kiln = open_plan["systems"].get("kiln") if open_plan else None
    admission = bound = None
    if kiln and kiln.get("admission_s") and kiln.get("step_s") and kiln.get("encode_per_admit_s") is not None:
        admission = kiln["admission_s"]["p99"]
        bound = 2 * kiln["step_s"]["mean"] + kiln["encode_per_admit_s"]
    add("admission_p99", "Poisson at 70% of capacity: Kiln p99 admission < 2 mean lane steps + prompt encoding",
        admission, bound, False, TARGET_PLAN_OPEN if open_plan else None)
    static = open_plan["systems"].get("static") if open_plan else None
    add("latency_p99_vs_static", "same: Kiln p99 end-to-end latency < static batching's",
        kiln["latency_s"]["p99"] if kiln and kiln.get("latency_s") else None,
        static["latency_s"]["p99"] if static and static.get("latency_s") else None, False,
        TARGET_PLAN_OPEN if open_plan else None)
    lora = {key: by_name[name]["systems"].get("kiln", {}).get("images_per_s") if name in by_name else None
            for key, name in LORA_PLANS.items()}
    for other, bound, text in (("none", 0.85, "the same load without LoRAs"),
                               ("per_config", 1.5, "one batch per LoRA configuration (lora_batching per-config)")):
        if lora["mixed"] is not None and lora[other]:
            add(f"lora_vs_{other}", f"16 clients, 4 LoRAs or none: per-row images/s >= {bound}x {text}",
                lora["mixed"] / lora[other], bound, True, LORA_PLANS["mixed"])
    add("demo_rss", "kiln serve --demo (7 tiny models) RSS after a 16-concurrent run < 1 GB",
        memory["rss_after_run_bytes"] if memory else None, memory["limit_bytes"] if memory else None, False, None)
    return out


def assemble(*, plans: list[Plan], systems: dict[str, dict[str, dict]], facts: dict[str, Any], settings: Any,
             system_facts: dict[str, Any], memory: dict[str, Any] | None, load_start: list[float],
             load_end: list[float], started_at: float) -> dict[str, Any]:
    entries = [_plan_entry(plan, systems) for plan in plans]
    settings_json = {key: (str(value) if isinstance(value, Path) else value) for key, value in asdict(settings).items()}
    return {
        "report_version": REPORT_VERSION,
        "started": _iso(started_at),
        "finished": _iso(dt.datetime.now().timestamp()),
        "machine": {**facts, "load_average_start": load_start, "load_average_end": load_end},
        "settings": settings_json,
        "system_facts": system_facts,
        "plans": entries,
        "memory_check": memory,
        "targets": targets(entries, memory),
    }


def write_json(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")


# --- the plot --------------------------------------------------------------------------------------------------------
COLORS = {"kiln": "tab:red", "kiln+idle": "tab:orange", "sequential": "tab:gray", "static": "tab:blue", "limit": "black"}


def plot(report: dict[str, Any], path: Path) -> None:
    """Throughput against concurrency (closed loops) and latency CDFs (every other plan), one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plans = report["plans"]
    closed_groups: dict[str, list[dict]] = {}
    for plan in plans:
        if plan["kind"] == "closed":
            closed_groups.setdefault(plan["scenario"], []).append(plan)
    others = [plan for plan in plans if plan["kind"] != "closed"]
    panels = len(closed_groups) + len(others)
    if not panels:
        return
    columns = min(3, panels)
    rows = (panels + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 4.2 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    index = 0
    for scenario, group in closed_groups.items():
        ax = flat[index]
        index += 1
        group = sorted(group, key=lambda p: p["concurrency"])
        for system in ("kiln", "kiln+idle", "static", "sequential", "limit"):
            points = [(p["concurrency"], p["systems"][system]["images_per_s"]) for p in group
                      if system in p["systems"] and p["systems"][system].get("images_per_s")]
            if points:
                ax.plot(*zip(*points), marker="o", color=COLORS[system], label=system,
                        linestyle="--" if system == "limit" else "-")
        ax.set_xscale("log", base=2)
        ax.set_xticks([p["concurrency"] for p in group], [str(p["concurrency"]) for p in group])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("images/s")
        ax.set_title(f"{scenario}: throughput vs concurrency")
        ax.grid(alpha=0.3)
        ax.legend()
    for plan in others:
        ax = flat[index]
        index += 1
        for system in ("kiln", "static", "sequential"):
            values = plan["systems"].get(system, {}).get("latencies_s")
            if values:
                ys = [(i + 1) / len(values) for i in range(len(values))]
                ax.step(values, ys, where="post", color=COLORS[system], label=system)
        ax.set_xscale("log")
        ax.set_xlabel("end-to-end latency (s)")
        ax.set_ylabel("fraction of requests")
        rate = f", {plan['rate_images_per_s']:.1f} img/s" if plan.get("rate_images_per_s") else ""
        ax.set_title(f"{plan['name']} ({plan['kind']}{rate}): latency CDF")
        ax.grid(alpha=0.3)
        ax.legend()
    for ax in flat[index:]:
        ax.axis("off")
    machine = report["machine"]
    figure.suptitle(f"Kiln bench — {machine['cpu_model']}, {machine['cpus_usable']} cpus, "
                    f"torch threads {machine['torch_threads']}, commit {str(machine['git']['commit'])[:10]}",
                    fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def summary_lines(report: dict[str, Any]) -> list[str]:
    """A short human summary: per plan images/s per system, ratios, p99 latencies; then the targets."""
    lines = []
    for plan in report["plans"]:
        systems = plan["systems"]
        parts = [f"{name} {data['images_per_s']:.2f}" for name, data in systems.items()
                 if data.get("images_per_s") is not None]
        p99 = [f"{name} {data['latency_s']['p99']:.3f}s" for name, data in systems.items()
               if data.get("latency_s")]
        ratio = ", ".join(f"{k} {v:.2f}" for k, v in plan["ratios"].items())
        lines.append(f"{plan['name']:>14}: img/s {', '.join(parts)} | {ratio} | p99 {', '.join(p99)}")
    for target in report["targets"]:
        state = {True: "MET", False: "MISSED", None: "not measured"}[target["met"]]
        lines.append(f"target {target['name']}: {state} (value {target['value']}, bound {target['bound']})")
    return lines
