"""Facts that go with every result: the machine, its load, versions, the commit; and process memory.

On 2-core machines torch's speed depends on what else runs (DESIGN.md, performance notes), so every result
carries the load average before and after and the torch thread count it ran with.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def load_average() -> list[float]:
    """1, 5 and 15-minute load averages."""
    return [round(value, 2) for value in os.getloadavg()]


def wait_for_quiet(threshold: float, timeout: float, log=print) -> list[float]:
    """Wait (up to `timeout` s) until the 1-minute load average is below `threshold`; returns the last reading."""
    deadline = time.monotonic() + timeout
    load = load_average()
    while load[0] >= threshold and time.monotonic() < deadline:
        log(f"waiting for a quiet machine: load average {load[0]} >= {threshold}")
        time.sleep(10)
        load = load_average()
    return load


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_total() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def kiln_version() -> str:
    """The installed distribution's version, else the one in pyproject.toml (a source checkout)."""
    installed = _version("kiln")
    if installed:
        return installed
    try:
        import tomllib

        return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    except (OSError, KeyError, ValueError):
        return "unknown"


def git_commit() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def gpu_facts() -> list[dict[str, Any]]:
    try:
        import torch

        if not torch.cuda.is_available():
            return []
        return [{"name": torch.cuda.get_device_name(i),
                 "memory_bytes": torch.cuda.get_device_properties(i).total_memory}
                for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - facts are best effort
        return []


def machine_facts(threads: int) -> dict[str, Any]:
    """CPU, cores, memory, GPUs, the torch thread count used, versions and the git commit."""
    import torch

    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "memory_bytes": _memory_total(),
        "gpus": gpu_facts(),
        "torch_threads": threads,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "versions": {"kiln": kiln_version(), **{name: _version(name) for name in
                     ("torch", "diffusers", "transformers", "uvicorn", "starlette", "httpx", "numpy")}},
        "torch_cuda": torch.version.cuda,
        "git": git_commit(),
        "hostname": platform.node(),
    }


# --- process memory -----------------------------------------------------------------------------------------------
def process_memory(pid: int | str = "self") -> dict[str, int | None]:
    """Resident set size now (VmRSS) and its peak since start or the last `reset_peak` (VmHWM), in bytes."""
    values: dict[str, int | None] = {"rss_bytes": None, "peak_rss_bytes": None}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                values["rss_bytes"] = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                values["peak_rss_bytes"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return values


def cpu_seconds(pid: int | str = "self") -> float | None:
    """User + system CPU seconds a process has used (all its threads)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def reset_peak(pid: int | str = "self") -> bool:
    """Reset a process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0); False where that is refused."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def gpu_memory(reset: bool = False) -> dict[str, int] | None:
    """Peak and current GPU memory allocated by this process's torch (None without CUDA); optionally reset."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    values = {"gpu_peak_allocated_bytes": int(torch.cuda.max_memory_allocated()),
              "gpu_peak_reserved_bytes": int(torch.cuda.max_memory_reserved()),
              "gpu_allocated_bytes": int(torch.cuda.memory_allocated())}
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return values


def set_threads(threads: int) -> None:
    """The torch thread count every system runs with (set before any torch work)."""
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work has started
        pass


def subprocess_env(threads: int) -> dict[str, str]:
    """Environment for the benchmark's child processes: the repo importable, the thread count pinned."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = str(threads)
    env["MKL_NUM_THREADS"] = str(threads)
    env.setdefault("KILN_CACHE", str(REPO / ".kiln-cache"))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env
