"""Test-wide setup: one torch thread, and a tiny-checkpoint cache inside the repo that later runs reuse."""

import os
import tempfile
from pathlib import Path

import pytest
import torch

# Two threads on these 2-core machines collapse under load (DESIGN.md, performance notes).
torch.set_num_threads(1)

KILN_CACHE = Path(__file__).resolve().parent.parent / ".kiln-cache"
# Subprocesses and code that uses the default cache root (load_model with tiny=True) find the same cache.
os.environ["KILN_CACHE"] = str(KILN_CACHE)
# Kiln's home (persisted model registrations): a fresh folder per run, never the user's ~/.kiln.
os.environ["KILN_HOME"] = tempfile.mkdtemp(prefix="kiln-home-")


@pytest.fixture(scope="session")
def tiny_root() -> Path:
    """The tiny checkpoints' cache root, with every catalogue model built (once; later runs reuse them).

    `engine.tiny.tiny_checkpoint(name, cache_root=tiny_root)` gives one model's directory.
    """
    from kiln.engine.catalogue import CATALOGUE
    from kiln.engine.tiny import tiny_checkpoint

    root = KILN_CACHE / "tiny"
    for name in CATALOGUE:
        tiny_checkpoint(name, cache_root=root)
    return root


@pytest.fixture(scope="session")
def tiny_lora_dir(tiny_root):
    """name -> the folder of that catalogue model's tiny LoRAs (style, detail, text; SD1.5 also kohya, FLUX
    xlabs), built once (engine.tiny.tiny_loras) beside the tiny checkpoints."""
    from kiln.engine.tiny import tiny_loras

    return lambda name: tiny_loras(name, cache_root=tiny_root)
