"""The `tensorrt` backend: TensorRT engines built from the ONNX export, run on torch CUDA tensors.

UNTESTED ON A GPU. Kiln is developed and tested on CPU-only machines; this module is written against the
TensorRT 10 Python API (name-based tensors, `execute_async_v3`) to run as-is on a CUDA machine with the
`tensorrt` package, and its tests skip without one. Everything around it that can run here is tested: the
ONNX export it parses, the profiles and cache keys it builds (`scripts/build_engines.py` prints them).

An engine has one optimisation profile per lane size: the spatial and sequence axes fixed at that size, the batch
axis ranging over [min_rows, max_rows] with `opt_rows` as the tuning point. Each profile gets its own execution
context, so switching lanes never re-selects a profile. A forward whose lane size has no profile, or whose batch
is below the profile's minimum, runs eagerly instead (logged once per shape); batches above the maximum run in
max-row pieces. Engines run on torch's current CUDA stream, so they are ordered with torch's work without
synchronising, and read and write torch tensors directly (no copies).

Engines are cached (engine/backends/cache.py) keyed by model, weights fingerprint, ONNX export, GPU compute
capability, TensorRT version, precision and profile: a restart loads the plan file instead of building it.

Precisions: fp32, fp16, bf16 (Ampere+) follow the ONNX export's weights (a strongly typed network when they
agree, builder flags otherwise). fp8 (compute capability >= 8.9) and int8 (>= 6.1) set TensorRT's builder
flags where the GPU supports them; they only pay off on an ONNX graph carrying Q/DQ quantisation nodes (e.g.
from NVIDIA ModelOpt), which Kiln does not produce: without them TensorRT keeps higher-precision kernels.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from kiln.engine.families.denoisers import Denoiser

from .base import Backend, BackendUnavailable, batch_rows, split_rows
from .cache import CacheKey, EngineCache, Entry

log = logging.getLogger("kiln.engine")

ENGINE_FILE = "denoiser.plan"
ALIGNMENT = 256  # bytes; torch's CUDA allocations are aligned to this, slices into them need not be
PRECISIONS = ("fp32", "fp16", "bf16", "fp8", "int8")
# Lowest compute capability with fast kernels for each precision.
MIN_CAPABILITY = {"fp32": (0, 0), "fp16": (5, 3), "bf16": (8, 0), "fp8": (8, 9), "int8": (6, 1)}
TENSORRT_SCOPE = ("compute_capability", "precision", "profile")  # what a new engine supersedes older ones within


def precision_for(dtype: torch.dtype) -> str:
    """The engine precision that matches a launch dtype."""
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")


@dataclass(frozen=True)
class Profile:
    """What an engine covers: lane sizes (width, height) and a batch (rows) range."""

    sizes: tuple[tuple[int, int], ...]
    min_rows: int
    opt_rows: int
    max_rows: int

    def __post_init__(self):
        if not self.sizes:
            raise ValueError("a profile needs at least one lane size")
        if not 1 <= self.min_rows <= self.opt_rows <= self.max_rows:
            raise ValueError(f"need 1 <= min_rows <= opt_rows <= max_rows, got {self.min_rows}, {self.opt_rows}, "
                             f"{self.max_rows}")

    @classmethod
    def make(cls, sizes: Sequence[tuple[int, int]], min_rows: int, max_rows: int, opt_rows: int | None = None):
        unique = tuple(sorted(dict.fromkeys((int(w), int(h)) for w, h in sizes)))
        return cls(unique, min_rows, opt_rows if opt_rows is not None else max(min_rows, max_rows // 2), max_rows)

    def describe(self) -> str:
        sizes = ",".join(f"{w}x{h}" for w, h in self.sizes)
        return f"{sizes};rows={self.min_rows}-{self.opt_rows}-{self.max_rows}"

    def covers(self, size: tuple[int, int], rows: int) -> bool:
        return tuple(size) in self.sizes and self.max_rows >= rows


def tensorrt_unavailable(device: torch.device) -> str | None:
    """Why TensorRT cannot run on `device` here, or None."""
    if importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt package is not installed (pip install 'kiln[tensorrt]' on a machine with an NVIDIA GPU)"
    if device.type != "cuda" or not torch.cuda.is_available():
        return "TensorRT needs a CUDA device, and this launch runs on the CPU"
    return None


def compute_capability(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}.{minor}"


def tensorrt_version() -> str:
    import tensorrt

    return tensorrt.__version__


def check_precision(precision: str, capability: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; accepted: {', '.join(PRECISIONS)}")
    major, minor = (int(part) for part in capability.split("."))
    if (major, minor) < MIN_CAPABILITY[precision]:
        need = ".".join(map(str, MIN_CAPABILITY[precision]))
        raise BackendUnavailable(f"precision {precision} needs compute capability >= {need}; this GPU has {capability}")


def engine_key(onnx: CacheKey, capability: str, trt_version: str, precision: str, profile: Profile) -> CacheKey:
    """Everything an engine depends on: the export it parses (model, weights, dtype, versions) and the build."""
    return CacheKey.make(
        "tensorrt", onnx.model, onnx=onnx.digest, weights=onnx["weights"], dtype=onnx["dtype"],
        compute_capability=capability, tensorrt=trt_version, precision=precision, profile=profile.describe(),
        max_rows=profile.max_rows,
    )


def find_engine(cache: EngineCache, onnx: CacheKey, capability: str, trt_version: str, precision: str,
                size: tuple[int, int], rows: int) -> Entry | None:
    """A cached engine for this export, GPU, TensorRT version and precision: preferably one whose profile covers
    `size` and `rows`, else any (other lanes run eagerly, bigger batches in pieces)."""
    entries = cache.entries("tensorrt", onnx.model, onnx=onnx.digest, compute_capability=capability,
                            tensorrt=trt_version, precision=precision)
    for entry in entries:
        if Profile(**_profile_fields(entry.info["profile"])).covers(size, rows):
            return entry
    return entries[0] if entries else None


def _profile_fields(data: Mapping[str, Any]) -> dict[str, Any]:
    return {"sizes": tuple(tuple(size) for size in data["sizes"]), "min_rows": data["min_rows"],
            "opt_rows": data["opt_rows"], "max_rows": data["max_rows"]}


def profile_shapes(denoiser: Denoiser, examples: Mapping[tuple[int, int], Mapping[str, torch.Tensor]],
                   profile: Profile) -> list[dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]]:
    """Per lane size, each input's (min, opt, max) shape: batch axis over the row range, the rest as the
    example of that size has them."""
    shapes = []
    for size in profile.sizes:
        example = examples[size]
        per_input = {}
        for name in denoiser.input_names:
            shape = tuple(example[name].shape)
            if name in denoiser.shared_inputs:
                per_input[name] = (shape, shape, shape)
            else:
                per_input[name] = tuple((rows, *shape[1:]) for rows in
                                        (profile.min_rows, profile.opt_rows, profile.max_rows))
        shapes.append(per_input)
    return shapes


def build_engine(onnx_path: Path, shapes: list[dict[str, tuple]], precision: str, onnx_dtype: str,
                 directory: Path, workspace_gb: float | None = None) -> dict[str, Any]:
    """Parse the ONNX file and build a serialized engine (one optimisation profile per entry of `shapes`) into
    directory/denoiser.plan; returns what was built."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    natural = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(onnx_dtype)
    strongly_typed = precision == natural and precision != "fp32"
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if workspace_gb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if not strongly_typed:
        for name in {"fp16": ("FP16",), "bf16": ("BF16",), "fp8": ("FP8", "FP16"), "int8": ("INT8", "FP16")}.get(
                precision, ()):
            config.set_flag(getattr(trt.BuilderFlag, name))
    for per_input in shapes:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in per_input.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
    started = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    path = Path(directory) / ENGINE_FILE
    path.write_bytes(bytes(plan))
    return {"build_seconds": round(time.perf_counter() - started, 3), "engine_bytes": path.stat().st_size,
            "strongly_typed": strongly_typed}


def ensure_engine(cache: EngineCache, key: CacheKey, onnx_path: Path, shapes: list[dict[str, tuple]],
                  precision: str, onnx_dtype: str, profile: Profile) -> Entry:
    """The cached engine for `key`, building it first when there is none."""
    entry = cache.lookup(key)
    if entry is not None:
        return entry

    def build(directory: Path) -> dict[str, Any]:
        info = build_engine(onnx_path, shapes, precision, onnx_dtype, directory)
        serial = [{name: [list(s) for s in triple] for name, triple in per.items()} for per in shapes]
        return {**info, "shapes": serial, "profile": {"sizes": [list(s) for s in profile.sizes],
                                                      "min_rows": profile.min_rows, "opt_rows": profile.opt_rows,
                                                      "max_rows": profile.max_rows}}

    return cache.store(key, build, replaces=TENSORRT_SCOPE)


def _torch_dtype(trt_dtype) -> torch.dtype:
    import tensorrt as trt

    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int64: torch.int64,
             trt.bool: torch.bool}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    return table[trt_dtype]


class TensorRTBackend(Backend):
    """A deserialized engine with one execution context per profile; eager for shapes no profile covers."""

    name = "tensorrt"

    def __init__(self, denoiser: Denoiser, entry: Entry, device: torch.device):
        super().__init__(denoiser)
        reason = tensorrt_unavailable(device)
        if reason:
            raise BackendUnavailable(f"backend 'tensorrt' is not available: {reason}")
        import tensorrt as trt

        self.entry = entry
        self.device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(entry.file(ENGINE_FILE).read_bytes())
        if self.engine is None:
            raise BackendUnavailable(f"TensorRT could not load {entry.file(ENGINE_FILE)}; delete it to rebuild")
        self.profile = Profile(**_profile_fields(entry.info["profile"]))
        self.output_name = next(
            self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)
            if self.engine.get_tensor_mode(self.engine.get_tensor_name(i)) == trt.TensorIOMode.OUTPUT
        )
        self.dtypes = {name: _torch_dtype(self.engine.get_tensor_dtype(name))
                       for name in (*self.input_names, self.output_name)}
        # input shapes (less batch) of each profile's lane size -> profile index
        self._profiles = {
            self._signature_of({name: triple[2] for name, triple in per.items()}): index
            for index, per in enumerate(entry.info["shapes"])
        }
        self._contexts: dict[int, Any] = {}
        self._eager_shapes: set = set()

    def _signature_of(self, shapes: Mapping[str, Sequence[int]]) -> tuple:
        return tuple(tuple(shapes[name]) if name in self.shared_inputs else tuple(shapes[name][1:])
                     for name in self.input_names)

    def _context(self, index: int):
        context = self._contexts.get(index)
        if context is None:
            context = self.engine.create_execution_context()
            stream = torch.cuda.current_stream(self.device)
            context.set_optimization_profile_async(index, stream.cuda_stream)
            self._contexts[index] = context
        return context

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        names, shared = self.input_names, self.shared_inputs
        rows = batch_rows(inputs, names, shared)
        index = self._profiles.get(self._signature_of({n: t.shape for n, t in zip(names, inputs)}))
        if index is None or rows < self.profile.min_rows:
            shape = tuple(inputs[0].shape)
            if shape not in self._eager_shapes:
                self._eager_shapes.add(shape)
                log.warning("tensorrt: no profile of %s covers input shape %s; running it eagerly",
                            self.entry.path.name, shape)
            return self.denoiser(*inputs)
        if rows > self.profile.max_rows:
            return torch.cat([self.forward(*chunk) for chunk in split_rows(inputs, names, shared, self.profile.max_rows)])
        context = self._context(index)
        held = []
        for name, tensor in zip(names, inputs):
            tensor = tensor.to(device=self.device, dtype=self.dtypes[name]).contiguous()
            if tensor.data_ptr() % ALIGNMENT:  # a row slice of a bigger batch: TensorRT wants aligned addresses
                tensor = tensor.clone()
            held.append(tensor)
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
        out = torch.empty(tuple(context.get_tensor_shape(self.output_name)), dtype=self.dtypes[self.output_name],
                          device=self.device)
        context.set_tensor_address(self.output_name, out.data_ptr())
        if not context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError("TensorRT execution failed (see its log)")
        return out

    def warmup_rows(self, max_rows: int) -> list[int]:
        return sorted({self.profile.min_rows, min(max_rows, self.profile.max_rows)})

    def describe(self):
        return {**super().describe(), "engine": str(self.entry.file(ENGINE_FILE)), "profile": self.profile.describe(),
                "precision": self.entry.key["precision"]}
