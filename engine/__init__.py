"""Everything that turns requests into images; no HTTP here (see the design notes for the map).

bitsandbytes logs a warning when it is first imported on CPUs with avx512_bf16: it looks for Hugging Face's
hub-downloaded `kernels` package for a faster 4-bit matmul and falls back to its own kernel without it. Kiln
never downloads kernels, so the warning is noise; it is silenced here, before any module of the engine can
import diffusers or transformers (which import bitsandbytes)."""

import logging

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
