"""LoRA: launch-time fused LoRAs (Xinference's) and per-row LoRAs mixed in one batched forward.

files.py reads LoRA files with diffusers' conversions; layers.py is the per-row slot layer; residency.py keeps
parsed files in host memory and adapters in slots; part.py is the part the executor calls.
"""

from .part import LoraPart

__all__ = ["LoraPart"]
