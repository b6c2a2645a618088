"""Encoded prompts kept per model, so the empty negative prompt and prompts that recur are encoded once instead
of at every admission.

Keys are (encoder context, text): the context is what the job's parts change about encoding (a text-encoder
LoRA and its scale), so one adapter's embeddings are never served to a job with another. The cache is bounded
in bytes (a FLUX T5 row is 4 MB in bf16, an SD1.5 row 0.1 MB) and forgets the least recently used first.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable

import torch

Conditioning = dict[str, torch.Tensor]
PromptKey = tuple[Hashable, str]  # (encoder context, text)
CACHE_BYTES = 64 * 2**20


def _nbytes(rows: Conditioning) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in rows.values())


class PromptCache:
    """LRU of encoded prompts by key, bounded in bytes; the scheduler thread alone uses it."""

    def __init__(self, max_bytes: int = CACHE_BYTES):
        self.max_bytes = max_bytes
        self._rows: OrderedDict[PromptKey, Conditioning] = OrderedDict()
        self._bytes = 0

    def missing(self, keys: list[PromptKey]) -> list[PromptKey]:
        """The distinct keys not cached, in first-seen order."""
        return [key for key in dict.fromkeys(keys) if key not in self._rows]

    def put(self, key: PromptKey, rows: Conditioning) -> None:
        self._rows[key] = rows
        self._bytes += _nbytes(rows)

    def take(self, keys: list[PromptKey]) -> list[Conditioning]:
        """The cached rows of every key (all must be present), marking them used; then evict past the bound.
        The most recent key always stays, however large."""
        found = []
        for key in keys:
            self._rows.move_to_end(key)
            found.append(self._rows[key])
        while self._bytes > self.max_bytes and len(self._rows) > 1:
            self._bytes -= _nbytes(self._rows.popitem(last=False)[1])
        return found
