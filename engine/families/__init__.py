"""Family adapters by name: the seven catalogue models map onto these four."""

from __future__ import annotations

from typing import Any

import torch

from .base import Family
from .flux import FluxFamily
from .sd import SDFamily
from .sd3 import SD3Family
from .sdxl import SDXLFamily

FAMILIES: dict[str, type[Family]] = {"sd": SDFamily, "sdxl": SDXLFamily, "sd3": SD3Family, "flux": FluxFamily}


def make_family(name: str, pipeline: Any, device: torch.device, dtype: torch.dtype) -> Family:
    return FAMILIES[name](pipeline, device, dtype)
