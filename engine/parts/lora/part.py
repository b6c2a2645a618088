"""LoRA as a part: Xinference's launch-time fused LoRAs, or per-row LoRAs that differ from row to row of one
batched forward.

Modes (launch option max_loras):
- fused (0, Xinference's): the launch list is merged into the weights once at load; every request gets it, and a
  request asking for anything else is refused (400) rather than silently served without it. Any backend runs
  it; the engine caches key on the fused set (`family.weights_tag`).
- per-row (N >= 1): the adapted layers become slot layers (layers.py) with N slots; each job carries its own
  LoRAs and scales (its uncond and cond rows the same), written into the rows' selection before each forward,
  so rows with different LoRAs, scales, stacks or none share one forward and one lane. Text-encoder LoRAs apply
  while the job's prompts are encoded (the prompt cache keys on them). A job starts only once its LoRAs are in
  slots (`admission`): parsed in the background, copied in between steps, pinned until the job leaves. eager and
  compile run it.
- off (no LoRA launched): a request naming a LoRA is refused.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import time
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from ...errors import InvalidRequest, ModelLoadError
from ...lora_options import Selection, requested
from ...memory import HEADROOM, free_bytes
from ..base import Part
from .files import Adapter, LoraFileError, loader_of, read_adapter, sites_of
from .layers import RowSelection, SlotLayer, fuse, install
from .residency import Library, Slots

PER_ROW_BACKENDS = frozenset({"eager", "compile"})
_WAITS_REMEMBERED = 4096


class LoraPart(Part):
    name = "lora"

    def __init__(self, family: Any, options: Any, spec: Any = None):
        super().__init__(family, options, spec)
        self.config = config = options.lora
        self.mode = "per-row" if config.per_row else "fused" if config.loras else "off"
        self.default: Selection = config.default_selection()
        self.denoiser = family.spec.denoiser
        self.loader = loader_of(family.spec)
        self.sites = sites_of(family.pipeline, self.loader)
        self.library = Library(config, self._read, lambda: self.wake())
        self.layers: dict[tuple[str, str], SlotLayer] = {}
        self.load_seconds = 0.0
        self.slot_waits = 0
        self._waited: OrderedDict[int, None] = OrderedDict()  # jobs held back (each counted once)
        self.slots = Slots(config.max_loras, self._fill)
        adapters = [self._launch_adapter(lora.name, lora.path) for lora in config.loras]
        if self.mode == "fused":
            self._fuse(adapters)
        elif self.mode == "per-row":
            self._install(adapters, options)

    @classmethod
    def backends_for(cls, options: Any) -> tuple[frozenset[str] | None, str]:
        """Per-row slot layers take per-row selections the exported graphs do not have; fused LoRAs are plain
        weights every backend runs."""
        if options.lora.per_row:
            return PER_ROW_BACKENDS, ("per-row LoRAs (max_loras >= 1) run on eager or compile; with max_loras 0 "
                                      "the launch LoRAs are fused and every backend runs them")
        return None, ""

    # --- load -------------------------------------------------------------------------------------------------
    def _read(self, name: str, path: str) -> Adapter:
        """Parse a file for this model (any thread); in per-row mode its rank must fit the slots."""
        started = time.perf_counter()
        adapter = read_adapter(name, path, self.loader, self.denoiser, self.sites, dict(self.config.load_kwargs),
                               getattr(self.family.pipeline, self.denoiser).config)
        self.load_seconds += time.perf_counter() - started
        if self.config.per_row and adapter.rank > self.config.max_lora_rank:
            raise LoraFileError(f"LoRA {name!r} ({path}) has rank {adapter.rank}, above max_lora_rank "
                                f"{self.config.max_lora_rank}; launch with a larger max_lora_rank")
        return adapter

    def _launch_adapter(self, name: str, path: str) -> Adapter:
        """A launch LoRA, parsed now: a file that does not fit fails the launch. Per-row mode keeps it in host
        memory (it refills slots); fused mode merges it and lets it go."""
        try:
            return self.library.load(name) if self.mode == "per-row" else self._read(name, path)
        except LoraFileError as error:
            raise ModelLoadError(str(error)) from None

    def _fuse(self, adapters: list[Adapter]) -> None:
        """Merge the launch LoRAs into the weights, as Xinference's load_lora_weights + fuse_lora leaves them:
        the fused components (fuse_lora's `components`, by default the mixin's: FLUX's is the transformer alone)
        at each LoRA's scale times lora_scale, the others still applied at the LoRA's own scale. In float32,
        then cast, as diffusers fuses."""
        components = self.config.fuse_components or tuple(
            inspect.signature(self.loader.fuse_lora).parameters["components"].default)
        unknown = sorted(set(components) - set(self.sites))
        if unknown:
            raise ModelLoadError(f"image_lora_fuse_kwargs.components: {self.family.spec.name} models have no "
                                 f"{', '.join(unknown)}; accepted: {', '.join(self.sites)}")
        own = {lora.name: lora.scale for lora in self.config.loras}
        scales = dict(self.default)
        fused = set()
        for adapter in adapters:
            if adapter.name not in scales:
                continue
            for (component, layer), (a, b) in adapter.weights.items():
                module = getattr(self.family.pipeline, component).get_submodule(layer)
                fuse(module, a, b, scales[adapter.name] if component in components else own[adapter.name])
                fused.add((component, layer))
        if self.config.safe_fusing:
            for component, layer in sorted(fused):
                if not torch.isfinite(getattr(self.family.pipeline, component).get_submodule(layer).weight).all():
                    raise ModelLoadError(f"safe_fusing: fusing the LoRAs made {component}.{layer} non-finite")
        digest = hashlib.sha256(repr(sorted((a.key, scales[a.name]) for a in adapters if a.name in scales)
                                     + sorted(components)).encode()).hexdigest()[:16]
        self.family.weights_tag = f"lora-{digest}"

    def _install(self, adapters: list[Adapter], options: Any) -> None:
        """Slot layers on every layer a launch LoRA adapts (with lora_dir: every adaptable layer, since later
        files may adapt any), then the launch LoRAs into slots."""
        config, family = self.config, self.family
        if config.lora_dir is not None:
            targets = {(c, layer) for c, layers in self.sites.items() for layer, site in layers.items() if site.plain}
        else:
            targets = {key for adapter in adapters for key in adapter.weights}
        rows = family.spec.rows_per_job * options.max_batch_size
        width, slots = config.max_loras_per_request, config.max_loras + 1
        self._check_slot_memory(targets, slots)
        self.rows = RowSelection(rows, width, family.device, family.dtype)
        self.text = RowSelection(1, width, family.device, family.dtype)
        for component in self.sites:
            names = sorted(layer for c, layer in targets if c == component)
            selection = self.rows if component == self.denoiser else self.text
            model = getattr(family.pipeline, component)
            for name, layer in install(model, names, selection, slots, config.max_lora_rank).items():
                self.layers[(component, name)] = layer
        for adapter in adapters:
            self.slots.place(adapter)

    def _check_slot_memory(self, targets: set[tuple[str, str]], slots: int) -> None:
        """Refuse slots that cannot fit before allocating them: a launch error, not an out-of-memory crash."""
        rank, family = self.config.max_lora_rank, self.family
        sites = [self.sites[component][layer] for component, layer in targets]
        per_slot = sum(rank * (site.in_features * math.prod(site.kernel) + site.out_features) for site in sites)
        per_slot *= family.dtype.itemsize
        free = free_bytes(family.device)
        if free is not None and per_slot * slots > free * HEADROOM:
            raise ModelLoadError(
                f"per-row LoRA slots need {per_slot * slots / 2**30:.1f} GiB ({slots} slots, slot 0 included, at "
                f"max_lora_rank {rank} over {len(targets)} layers), but {free / 2**30:.1f} GiB are free on "
                f"{family.device}; lower max_loras or max_lora_rank")

    def _fill(self, slot: int, adapter: Adapter) -> None:
        started = time.perf_counter()
        for key, layer in self.layers.items():
            layer.fill(slot, adapter.weights.get(key))
        self.load_seconds += time.perf_counter() - started

    # --- requests ---------------------------------------------------------------------------------------------
    def used_by(self, request) -> bool:
        """Every job in per-row mode (each forward's selection is then written for all its rows); otherwise
        the requests that name LoRAs, to check them."""
        return self.mode == "per-row" or self.name in request.part_inputs

    def selection(self, request) -> Selection:
        return requested(request.part_inputs.get(self.name, {}), self.default)

    def check(self, request) -> None:
        picked = self.selection(request)
        if self.mode != "per-row":
            if not _same(picked, self.default):
                raise InvalidRequest(self._cannot(picked), "lora", "lora_not_supported")
            return
        limit = min(self.config.max_loras_per_request, self.config.max_loras)
        if len(picked) > limit:
            raise InvalidRequest(f"lora lists {len(picked)} LoRAs; this model takes at most {limit} per request "
                                 "(launch options max_loras_per_request and max_loras)", "lora")
        for name, _ in picked:
            if self.library.path(name) is None:
                known = self.library.names()
                raise InvalidRequest(f"unknown LoRA {name!r}; available: {', '.join(known) or 'none'}", "lora",
                                     "lora_not_found")
            failure = self.library.failure(name)
            if failure is not None:
                raise failure

    def _cannot(self, picked: Selection) -> str:
        asked = ", ".join(f"{n}@{s:g}" for n, s in picked) or "no LoRA"
        if self.mode == "off":
            return (f"this model was launched without LoRAs, so lora ({asked}) cannot apply; launch it with "
                    "peft_model_config (--lora-modules) or lora_dir")
        fused = ", ".join(f"{n}@{s:g}" for n, s in self.default)
        return (f"this model runs its LoRAs fused (max_loras 0, as Xinference): every request gets {fused}, so "
                f"lora ({asked}) cannot apply. LoRAs chosen per request need per-row mode: launch with max_loras "
                "of 1 or more and backend eager or compile (onnx, openvino and tensorrt run fused LoRAs only)")

    def lane_key(self, request):
        """None: rows with any LoRAs share lanes; with lora_batching per-config, the LoRA set (the peers' way)."""
        if self.mode == "per-row" and self.config.lora_batching == "per-config":
            return self.selection(request) or None
        return None

    def admission(self) -> Callable[[Any], bool] | None:
        """A job waits until each of its LoRAs is parsed and in a slot. Once one waits for a slot, later jobs
        with LoRAs wait too, so the slots drain for it instead of staying pinned by a stream of newer jobs."""
        if self.mode != "per-row":
            return None
        blocked = False

        def admit(job) -> bool:
            nonlocal blocked
            picked = self.selection(job.request)
            if not picked:
                return True
            found = [self.slots.by_name.get(name) or self.library.get(name) for name, _ in picked]
            if any(isinstance(item, LoraFileError) for item in found):
                return True  # prepare fails the job with the file's error
            if blocked or any(item is None for item in found) or self.slots.reserve(job.id, found) is None:
                blocked = blocked or all(item is not None for item in found)
                self._wait(job.id)
                return False
            self._waited.pop(job.id, None)
            return True

        return admit

    def _wait(self, job_id: int) -> None:
        if job_id not in self._waited:
            self.slot_waits += 1
            self._waited[job_id] = None
            while len(self._waited) > _WAITS_REMEMBERED:
                self._waited.popitem(last=False)

    def release(self, job_id: int) -> None:
        self.slots.release(job_id)

    def encoder_context(self, request) -> tuple[tuple[str, float], ...] | None:
        """The job's LoRAs that adapt a text encoder, with their scales (and files' fingerprints)."""
        if self.mode != "per-row":
            return None
        context = tuple((adapter.key, scale) for name, scale in self.selection(request)
                        if (adapter := self.slots.by_name.get(name)) is not None  # pinned by the job's admission
                        and adapter.components - {self.denoiser})
        return context or None

    @contextmanager
    def encoding(self, context: tuple[tuple[str, float], ...]) -> Iterator[None]:
        self.text.set([(tuple(self.slots.slot_of[key] for key, _ in context), tuple(s for _, s in context))])
        try:
            yield
        finally:
            self.text.clear()

    def prepare(self, state) -> None:
        """The job's slots and scales, pinned by its admission; a LoRA that failed to parse fails the job."""
        if self.mode != "per-row":
            return
        picked = self.selection(state.job.request)
        for name, _ in picked:
            failure = self.library.failure(name)
            if failure is not None:
                raise failure
        slots = self.slots.pins.get(state.job.id, ()) if picked else ()
        if len(slots) != len(picked):
            raise RuntimeError(f"job {state.job.id} was admitted without its LoRAs in slots")
        state.parts[self.name] = (slots, tuple(scale for _, scale in picked))

    def before_forward(self, batch) -> None:
        if self.mode != "per-row":
            return
        self.rows.set([state.parts.get(self.name, ((), ())) for state, _ in batch.rows])

    # --- what the model shows ---------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        if self.mode == "off":
            return {}
        config = self.config
        info: dict[str, Any] = {
            "mode": self.mode,
            "registered": self.library.names(),
            "default": [{"name": name, "scale": scale} for name, scale in self.default],
        }
        if self.mode == "fused":
            return {"lora": {**info, "fused": [name for name, _ in self.default]}}
        slot_bytes = sum(b.nbytes for layer in self.layers.values() for b in (layer.lora_a, layer.lora_b))
        return {"lora": {**info, "resident": self.slots.resident, "max_loras": config.max_loras,
                "max_lora_rank": config.max_lora_rank, "max_loras_per_request": config.max_loras_per_request,
                "max_cpu_loras": config.host_capacity, "lora_dir": config.lora_dir, "adapted_layers": len(self.layers),
                "slot_bytes": slot_bytes}}

    def metrics(self) -> tuple[tuple[str, str, float], ...]:
        if self.mode != "per-row":
            return ()
        return (
            ("kiln_lora_resident", "LoRAs in per-row slots.", len(self.slots.holder)),
            ("kiln_lora_loads_total", "LoRAs copied into a slot.", self.slots.loads),
            ("kiln_lora_load_seconds_total", "Time spent parsing LoRA files and filling slots.", self.load_seconds),
            ("kiln_lora_slot_waits_total", "Jobs that waited for their LoRA to be parsed or get a slot.",
             self.slot_waits),
        )


def _same(a: Selection, b: Selection) -> bool:
    """The same LoRAs at the same scales, in any order."""
    return len(a) == len(b) and all(math.isclose(dict(b).get(n, math.nan), s, abs_tol=1e-6) for n, s in a)
