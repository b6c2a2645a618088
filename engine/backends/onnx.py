"""ONNX export of the flat denoiser, and the `onnx` backend that runs it with onnxruntime.

The export uses torch's TorchScript-based exporter (`dynamo=False`): about a second for the tiny denoisers where
the dynamo exporter takes about a minute, and it handles all four families once Kiln's attention processors are
on the model (kernels.attention, shape-free) and `aten::rms_norm` (FLUX's q/k norms) has a symbolic (below).
The batch axis of every batched input is dynamic, and so are the spatial/sequence axes, found by comparing
example inputs of two lane sizes: one export serves every lane (and TensorRT builds its profiles from it).
Timestep (and FLUX-dev guidance) are per-row `[B]` inputs.

The backend passes torch tensors to onnxruntime through IO binding (their memory, no copies) and gets the
prediction back in a torch tensor it allocated; on a CUDA device onnxruntime runs on torch's current stream.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from kiln.engine.families.denoisers import Denoiser

from .base import Backend, BackendUnavailable, batch_rows
from .cache import CacheKey, EngineCache, Entry

log = logging.getLogger("kiln.engine")

OPSET = 18
EXPORT_FORMAT = 1  # bump when the export's output changes, so old exports miss
ONNX_FILE = "denoiser.onnx"
DATA_FILE = "denoiser.onnx.data"  # weights beside the graph when the model passes protobuf's 2 GB limit
OUTPUT = "out"
_ORT_TYPES = {
    "tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(double)": torch.float64,
    "tensor(int64)": torch.int64, "tensor(int32)": torch.int32, "tensor(bfloat16)": torch.bfloat16,
}


def onnx_key(model: str, weights: str, denoiser: Denoiser, dtype: torch.dtype) -> CacheKey:
    """Everything an export depends on."""
    import diffusers

    return CacheKey.make(
        "onnx", model, weights=weights, dtype=str(dtype).removeprefix("torch."), opset=OPSET,
        exporter="torchscript", torch=torch.__version__, diffusers=diffusers.__version__, format=EXPORT_FORMAT,
        denoiser=type(denoiser).__name__, inputs=",".join(denoiser.input_names), attention="sdpa",
    )


ONNX_SCOPE = ("dtype",)  # a new export of a model in a dtype supersedes older ones of that model and dtype


# --- export ---------------------------------------------------------------------------------------------------
def _rms_norm_symbolic(g, x, normalized_shape, weight, eps):
    """aten::rms_norm for the TorchScript exporter (it has none): x / sqrt(mean(x^2) + eps) * weight, in fp32."""
    from torch.onnx import symbolic_helper

    shape = symbolic_helper._get_const(normalized_shape, "is", "normalized_shape")
    value = None if symbolic_helper._is_none(eps) else symbolic_helper._maybe_get_const(eps, "f")
    if not isinstance(value, float):  # eps=None: torch uses the input dtype's machine epsilon
        scalar = x.type().scalarType() if hasattr(x.type(), "scalarType") else None
        value = torch.finfo({"Half": torch.float16, "BFloat16": torch.bfloat16}.get(scalar, torch.float32)).eps
    axes = g.op("Constant", value_t=torch.tensor(list(range(-len(shape), 0)), dtype=torch.long))
    wide = g.op("Cast", x, to_i=1)  # FLOAT: half-precision squares overflow
    variance = g.op("ReduceMean", g.op("Mul", wide, wide), axes, keepdims_i=1)
    epsilon = g.op("Constant", value_t=torch.tensor(value, dtype=torch.float32))
    normed = g.op("CastLike", g.op("Div", wide, g.op("Sqrt", g.op("Add", variance, epsilon))), x)
    return normed if symbolic_helper._is_none(weight) else g.op("Mul", normed, weight)


_SYMBOLICS_REGISTERED = False
_EXPORT_LOCK = threading.Lock()  # the TorchScript exporter keeps process-wide state: one export at a time


def _register_symbolics() -> None:
    global _SYMBOLICS_REGISTERED
    if not _SYMBOLICS_REGISTERED:
        torch.onnx.register_custom_op_symbolic("aten::rms_norm", _rms_norm_symbolic, OPSET)
        _SYMBOLICS_REGISTERED = True


@contextlib.contextmanager
def export_mode(denoiser: Denoiser) -> Iterator[None]:
    """Make the traced graph valid for every lane size.

    A UNet passes explicit upsample sizes only when a latent side is not a multiple of 2**num_upsamplers, a
    Python branch the tracer would freeze at the example's size. With num_upsamplers huge the branch always
    passes them, which is the same computation for every size, so the one graph serves odd sizes too."""
    model = denoiser.model
    saved = getattr(model, "num_upsamplers", None)
    if saved is not None:
        model.num_upsamplers = 62
    try:
        yield
    finally:
        if saved is not None:
            model.num_upsamplers = saved


def dynamic_axes(denoiser: Denoiser, first: Mapping[str, torch.Tensor],
                 second: Mapping[str, torch.Tensor]) -> dict[str, dict[int, str]]:
    """Batch axis 0 of each batched input, plus every axis whose length differs between two examples of other
    lane sizes. Axes that vary together get the same symbol (FLUX's image tokens in hidden_states and img_ids)."""
    axes: dict[str, dict[int, str]] = {}
    for name in denoiser.input_names:
        a, b = first[name].shape, second[name].shape
        axes[name] = {i: f"d{a[i]}_{b[i]}" for i in range(len(a)) if a[i] != b[i]}
        if name not in denoiser.shared_inputs:
            axes[name][0] = "batch"
    return axes


@torch.no_grad()
def export_onnx(denoiser: Denoiser, example: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor],
                directory: Path) -> dict[str, Any]:
    """Export the denoiser to directory/denoiser.onnx (weights in denoiser.onnx.data past 2 GB), traced on
    `example`; `other` (another batch and lane size) tells which axes are dynamic. Returns what it did."""
    import onnx

    _register_symbolics()
    directory = Path(directory)
    axes = dynamic_axes(denoiser, example, other)
    args = tuple(example[name] for name in denoiser.input_names)
    path = directory / ONNX_FILE
    started = time.perf_counter()
    with _EXPORT_LOCK, export_mode(denoiser), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about Python branches, and the exporter's deprecation
        torch.onnx.export(
            denoiser.eval(), args, str(path), input_names=list(denoiser.input_names), output_names=[OUTPUT],
            dynamic_axes={**axes, OUTPUT: {0: "batch"}}, opset_version=OPSET, dynamo=False,
            do_constant_folding=True,
        )
    others = [p for p in directory.iterdir() if p.name != ONNX_FILE]
    if others:  # the exporter wrote one file per tensor (a model past 2 GB): gather them into one
        model = onnx.load(str(path), load_external_data=True)
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=DATA_FILE, size_threshold=1024)
        for stray in others:
            if stray.name != DATA_FILE:
                stray.unlink()
    seconds = time.perf_counter() - started
    log.info("exported %s to ONNX in %.1f s", type(denoiser).__name__, seconds)
    return {
        "export_seconds": round(seconds, 3),
        "dynamic_axes": {name: {str(i): s for i, s in dims.items()} for name, dims in axes.items()},
        "input_dtypes": {name: str(example[name].dtype).removeprefix("torch.") for name in denoiser.input_names},
        "example_shapes": {name: list(example[name].shape) for name in denoiser.input_names},
    }


def ensure_export(cache: EngineCache, key: CacheKey, denoiser: Denoiser, example: Mapping[str, torch.Tensor],
                  other: Mapping[str, torch.Tensor]) -> Entry:
    """The cached export for `key`, exporting it first when there is none."""
    entry = cache.lookup(key)
    if entry is not None:
        log.info("ONNX export found in cache: %s", entry.path)
        return entry
    return cache.store(key, lambda directory: export_onnx(denoiser, example, other, directory), replaces=ONNX_SCOPE)


# --- onnxruntime ------------------------------------------------------------------------------------------------
def onnxruntime_unavailable(device: torch.device) -> str | None:
    """Why the onnx backend cannot run on `device` here, or None."""
    import importlib.util

    for package in ("onnx", "onnxruntime"):
        if importlib.util.find_spec(package) is None:
            return f"the {package} package is not installed (pip install 'kiln[onnx]')"
    if device.type == "cuda":
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            return ("this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu instead of "
                    "onnxruntime), or launch with device='cpu'")
    return None


def _numpy_type(dtype: torch.dtype):
    import numpy

    types = {torch.float32: numpy.float32, torch.float16: numpy.float16, torch.float64: numpy.float64,
             torch.int64: numpy.int64, torch.int32: numpy.int32}
    if dtype not in types:
        raise BackendUnavailable(f"the onnx backend cannot bind {dtype} tensors; launch with torch_dtype float32 "
                                 "or float16")
    return types[dtype]


class OnnxBackend(Backend):
    """An onnxruntime session of the exported denoiser, fed and read through torch tensors."""

    name = "onnx"

    def __init__(self, denoiser: Denoiser, onnx_path: Path, device: torch.device, threads: int | None = None):
        super().__init__(denoiser)
        import onnxruntime

        reason = onnxruntime_unavailable(device)
        if reason:
            raise BackendUnavailable(f"backend 'onnx' is not available: {reason}")
        self.path = Path(onnx_path)
        self.device = device
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only: the CPU provider warns about every unused initializer
        if device.type == "cpu":
            options.intra_op_num_threads = threads or torch.get_num_threads()
            options.inter_op_num_threads = 1
            providers: list = ["CPUExecutionProvider"]
        else:
            index = device.index if device.index is not None else torch.cuda.current_device()
            self.device = torch.device("cuda", index)
            stream = torch.cuda.current_stream(self.device).cuda_stream  # order with torch's work, no syncs
            providers = [("CUDAExecutionProvider", {"device_id": index, "user_compute_stream": str(stream)}),
                         "CPUExecutionProvider"]
        started = time.perf_counter()
        self.session = onnxruntime.InferenceSession(str(self.path), options, providers=providers)
        self.session_seconds = time.perf_counter() - started
        self._device_type = self.device.type
        self._device_id = self.device.index or 0
        inputs = {node.name: node for node in self.session.get_inputs()}
        missing = [name for name in self.input_names if name not in inputs]
        if missing:
            raise BackendUnavailable(f"ONNX file {self.path} lacks denoiser inputs {missing}; delete it to re-export")
        self.input_dtypes = {name: _ORT_TYPES[inputs[name].type] for name in self.input_names}
        output = self.session.get_outputs()[0]
        self.output_name, self.output_dtype = output.name, _ORT_TYPES[output.type]
        for dtype in (*self.input_dtypes.values(), self.output_dtype):
            _numpy_type(dtype)
        self._output_tails: dict[tuple, tuple[int, ...]] = {}  # input shapes (less batch) -> output shape less batch

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        binding = self.session.io_binding()
        held = []  # the bound tensors must outlive the run
        for name, tensor in zip(self.input_names, inputs):
            tensor = tensor.to(device=self.device, dtype=self.input_dtypes[name]).contiguous()
            held.append(tensor)
            binding.bind_input(name, self._device_type, self._device_id, _numpy_type(tensor.dtype),
                               tuple(tensor.shape), tensor.data_ptr())
        rows = batch_rows(held, self.input_names, self.shared_inputs)
        signature = tuple(
            tuple(t.shape) if name in self.shared_inputs else tuple(t.shape[1:]) for name, t in zip(self.input_names, held)
        )
        tail = self._output_tails.get(signature)
        if tail is None:  # first forward of this lane size: let onnxruntime allocate, then remember the shape
            binding.bind_output(self.output_name, self._device_type, self._device_id)
            self.session.run_with_iobinding(binding)
            result = torch.from_numpy(binding.copy_outputs_to_cpu()[0]).to(self.device)
            self._output_tails[signature] = tuple(result.shape[1:])
            return result
        out = torch.empty((rows, *tail), dtype=self.output_dtype, device=self.device)
        binding.bind_output(self.output_name, self._device_type, self._device_id, _numpy_type(out.dtype),
                            tuple(out.shape), out.data_ptr())
        self.session.run_with_iobinding(binding)
        return out

    def describe(self):
        return {**super().describe(), "onnx": str(self.path), "providers": self.session.get_providers()}
