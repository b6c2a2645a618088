"""Families: the four architectures the seven catalogue models map onto. Each is a torch-free `FamilySpec`
(`specs.py`: what it is) and an adapter (`sd.py`, `sdxl.py`, `sd3.py`, `flux.py`: the torch side), imported
only when a model is loaded, so this package can be imported without torch."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .specs import FAMILY_SPECS, FLUX, SD, SD3, SDXL, FamilySpec

if TYPE_CHECKING:
    from .base import Family

__all__ = ["FAMILY_SPECS", "FLUX", "SD", "SD3", "SDXL", "FamilySpec", "make_family"]


def make_family(spec: FamilySpec, pipeline: Any, device: Any, dtype: Any) -> "Family":
    """The adapter of `spec`'s family around a loaded pipeline."""
    module, name = spec.adapter.split(":")
    return getattr(importlib.import_module(f".{module}", __package__), name)(pipeline, device, dtype)
