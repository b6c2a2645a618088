"""Micro benchmarks (pytest-benchmark), run on their own: `pytest benchmarks/micro` (the main run collects only
tests/). One torch thread, the tiny checkpoints cached under the repo's .kiln-cache."""

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("KILN_CACHE", str(Path(__file__).resolve().parents[2] / ".kiln-cache"))

MODEL = "stable-diffusion-v1.5"


@pytest.fixture(scope="session")
def runner():
    """A tiny SD1.5 runner driven by hand (no scheduler thread), batches up to 16 images."""
    from kiln.engine.catalogue import get_spec
    from kiln.engine.options import LaunchOptions
    from kiln.engine.runner import Runner

    runner = Runner("bench", get_spec(MODEL), LaunchOptions(tiny=True, max_batch_size=16))
    runner.load(start=False)
    yield runner
    runner.close()
