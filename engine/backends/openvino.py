"""The `openvino` backend: the denoiser's ONNX export (onnx.py, the same cached file) read by OpenVINO's own ONNX
frontend and compiled for the CPU.

OpenVINO is what Intel CPU users serve diffusion models with (e.g. FastSD CPU); its CPU plugin fuses convolutions,
norms and attention that onnxruntime runs op by op. The export's dynamic batch and spatial axes stay dynamic, so
one compiled model serves every lane size and batch.

The precision hint is pinned to the launch dtype: on CPUs with AMX or AVX512-BF16 OpenVINO would otherwise run
float32 models in bfloat16, which is faster but breaks the batch-invariance and equivalence tolerances
(2/255). Threads follow torch's, streams are one (the scheduler calls one forward at a time) and threads are not
pinned to cores (the machine is shared with the server's other threads).
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import numpy
import torch

from kiln.engine.families.denoisers import Denoiser

from .base import Backend, BackendUnavailable

_PRECISIONS = {torch.float32: "f32", torch.float16: "f16"}


def openvino_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the openvino backend cannot run here, or None."""
    for package in ("onnx", "openvino"):
        if importlib.util.find_spec(package) is None:
            return f"the {package} package is not installed (pip install 'kiln[openvino]')"
    if device.type != "cpu":
        return "Kiln runs OpenVINO on the CPU only; launch with device='cpu', or another backend on a GPU"
    if dtype not in _PRECISIONS:
        return f"OpenVINO's CPU plugin takes no {dtype} inputs from torch here; launch with torch_dtype float32"
    return None


class OpenVinoBackend(Backend):
    """An OpenVINO CPU compilation of the exported denoiser, fed torch tensors' memory without copies."""

    name = "openvino"

    def __init__(self, denoiser: Denoiser, onnx_path: Path, dtype: torch.dtype, threads: int | None = None):
        super().__init__(denoiser)
        import openvino

        reason = openvino_unavailable(torch.device("cpu"), dtype)
        if reason:
            raise BackendUnavailable(f"backend 'openvino' is not available: {reason}")
        self.path = Path(onnx_path)
        core = openvino.Core()
        started = time.perf_counter()
        model = core.read_model(str(self.path))
        config = {
            "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "ENABLE_CPU_PINNING": False,
            "INFERENCE_NUM_THREADS": threads or torch.get_num_threads(), "INFERENCE_PRECISION_HINT": _PRECISIONS[dtype],
        }
        self.compiled = core.compile_model(model, "CPU", config)
        self.compile_seconds = time.perf_counter() - started
        self.request = self.compiled.create_infer_request()
        ports = {name: port for port in self.compiled.inputs for name in port.get_names()}
        missing = [name for name in self.input_names if name not in ports]
        if missing:
            raise BackendUnavailable(f"ONNX file {self.path} lacks denoiser inputs {missing}; delete it to re-export")
        self.input_types = {name: ports[name].get_element_type().to_dtype() for name in self.input_names}

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        arrays = {
            name: numpy.ascontiguousarray(tensor.detach().cpu().numpy(), dtype=self.input_types[name])
            for name, tensor in zip(self.input_names, inputs)
        }
        self.request.infer(arrays, share_inputs=True)
        # The output tensor is the request's own buffer, reused by the next forward: copy it out.
        return torch.from_numpy(self.request.get_output_tensor(0).data.copy())

    def describe(self):
        return {**super().describe(), "onnx": str(self.path), "compile_seconds": round(self.compile_seconds, 3)}
