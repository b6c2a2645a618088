"""Backends: what executes the denoiser forward. One interface (base.Backend), five implementations:

- `eager`: the PyTorch module itself (attention through kernels.attention: flash-attn or xformers on a GPU
  when installed, else PyTorch SDPA).
- `compile`: torch.compile with the batch padded to buckets 1, 2, 4, ... max_rows, every bucket compiled at
  launch (compile.py).
- `onnx`: the denoiser exported to ONNX (dynamic batch and spatial axes, cached on disk) and run by onnxruntime,
  CUDA or CPU provider (onnx.py).
- `openvino`: the same ONNX export compiled by OpenVINO for the CPU (openvino.py).
- `tensorrt`: TensorRT engines built from that export, cached per GPU architecture, TensorRT version,
  precision and profile (tensorrt.py; untested here: no GPU).

`auto` times the backends this launch can use on the model's default lane and keeps the fastest, remembering the
choice on disk (auto.py). `launch.launch_backend` is what the runner calls: choose, build, replace
`family.denoiser`, warm up.
This module is torch-free (names and what is installed), so launch options validate without loading torch.

Environment: KILN_COMPILE_BACKEND (torch.compile backend, default inductor), KILN_COMPILE_MODE (e.g.
max-autotune, default torch's), KILN_ENGINE_CACHE (the cache root; default $KILN_CACHE/engines).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from typing import Any

BACKEND_NAMES = ("auto", "eager", "compile", "onnx", "openvino", "tensorrt")
SPECIFIC_BACKENDS = BACKEND_NAMES[1:]


def package_unavailable(name: str) -> str | None:
    """Why `name` cannot run on this machine judging by installed packages alone (no torch import), or None.
    Device checks (a GPU for tensorrt) come at load."""
    if name == "onnx":
        missing = [p for p in ("onnx", "onnxruntime") if importlib.util.find_spec(p) is None]
        if missing:
            return f"{' and '.join(missing)} not installed (pip install 'kiln[onnx]')"
    if name == "openvino":
        missing = [p for p in ("onnx", "openvino") if importlib.util.find_spec(p) is None]
        if missing:
            return f"{' and '.join(missing)} not installed (pip install 'kiln[openvino]')"
    if name == "tensorrt" and importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt package is not installed (pip install 'kiln[tensorrt]' on a machine with an NVIDIA GPU)"
    return None


def compile_unavailable(device_type: str, compiler: str) -> str | None:
    """Why torch.compile with `compiler` cannot run on this device type, or None."""
    if compiler != "inductor":
        return None
    if device_type == "cuda" and importlib.util.find_spec("triton") is None:
        return "torch.compile's inductor needs triton on CUDA, which is not installed"
    if device_type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX") or "g++", "c++", "clang++")):
        return "torch.compile's inductor needs a C++ compiler on the CPU (install g++)"
    return None


def backend_unavailable(name: str, device: Any, dtype: Any, compiler: str = "inductor") -> str | None:
    """Why backend `name` cannot run the denoiser on this device in this dtype, or None when it can."""
    import torch

    if name in ("eager", "auto"):
        return None
    if name == "compile":
        return compile_unavailable(device.type, compiler)
    reason = package_unavailable(name)
    if reason:
        return reason
    if name == "onnx":
        from .onnx import onnxruntime_unavailable

        if dtype == torch.bfloat16:
            return "onnxruntime's IO binding takes no bfloat16 tensors; launch with torch_dtype float16"
        return onnxruntime_unavailable(device)
    if name == "openvino":
        from .openvino import openvino_unavailable

        return openvino_unavailable(device, dtype)
    from .tensorrt import tensorrt_unavailable

    return tensorrt_unavailable(device)
