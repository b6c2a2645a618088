"""Where LoRAs live: a host library of parsed files (disk -> memory, in a background thread, least recently used
beyond max_cpu_loras), and the slots of the per-row layers (memory -> slot, on the scheduler thread).

A slot pinned by an admitted job is never reassigned; unpinned ones are reused least recently used first, so
the LoRAs in demand stay resident. Both are touched by the scheduler thread alone, except the library's
background parse, which only adds entries under its lock.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter, OrderedDict
from typing import Callable

from ...lora_options import LoraOptions
from .files import Adapter, LoraFileError, fingerprint

log = logging.getLogger("kiln.engine")

LORA_SUFFIX = ".safetensors"


class Library:
    """The LoRAs a model knows by name (the launch list, then lora_dir's files by stem) and the parsed ones
    kept in host memory. `get` never blocks: a LoRA not parsed yet is parsed in a thread of its own (first uses
    are rare) and `wake` is called once it is ready (or has failed)."""

    def __init__(self, options: LoraOptions, read: Callable[[str, str], Adapter], wake: Callable[[], None]):
        self.options = options
        self._read = read
        self.wake = wake
        self._launch = {lora.name: lora.path for lora in options.loras}
        self._host: OrderedDict[str, Adapter] = OrderedDict()
        self._failed: dict[str, tuple[str, LoraFileError]] = {}  # name -> (file fingerprint, error)
        self._loading: set[str] = set()
        self._lock = threading.Lock()

    # --- names ----------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Every name a request may use: the launch list, then lora_dir's .safetensors stems."""
        names = list(self._launch)
        folder = self.options.lora_dir
        if folder is not None:
            try:
                files = sorted(os.listdir(folder))
            except OSError:
                files = []
            names += [f[: -len(LORA_SUFFIX)] for f in files
                      if f.endswith(LORA_SUFFIX) and f[: -len(LORA_SUFFIX)] not in self._launch]
        return names

    def path(self, name: str) -> str | None:
        """The file of a name: the launch list's, or lora_dir/<name>.safetensors if it is a file inside lora_dir
        (a link pointing out of it does not count)."""
        if name in self._launch:
            return self._launch[name]
        folder = self.options.lora_dir
        if folder is None:
            return None
        real = os.path.realpath(os.path.join(folder, name + LORA_SUFFIX))
        return real if real.startswith(folder + os.sep) and os.path.isfile(real) else None

    # --- parsed adapters ------------------------------------------------------------------------------------
    def load(self, name: str) -> Adapter:
        """Parse now (at launch); raises LoraFileError."""
        adapter = self._read(name, self._launch[name])
        with self._lock:
            self._keep(adapter)
        return adapter

    def get(self, name: str) -> Adapter | LoraFileError | None:
        """The parsed LoRA, its failure, or None while it is being parsed (started now if needed)."""
        with self._lock:
            adapter = self._host.get(name)
            if adapter is not None:
                self._host.move_to_end(name)
                return adapter
            failure = self._failure(name)
            if failure is not None:
                return failure
            if name not in self._loading:
                self._loading.add(name)
                threading.Thread(target=self._background, args=(name,), name="kiln-lora-read", daemon=True).start()
        return None

    def failure(self, name: str) -> LoraFileError | None:
        """The error of the name's file as it is now, if parsing it failed."""
        with self._lock:
            return self._failure(name)

    def _background(self, name: str) -> None:
        path = self.path(name)
        try:
            if path is None:
                raise LoraFileError(f"LoRA {name!r} is no longer in lora_dir")
            adapter = self._read(name, path)
        except LoraFileError as error:
            with self._lock:
                self._failed[name] = (fingerprint(path or ""), error)
        except Exception as error:  # noqa: BLE001 - a loader fault fails the LoRA's requests, not the model
            log.exception("reading LoRA %s failed", name)
            with self._lock:
                self._failed[name] = (fingerprint(path or ""), LoraFileError(f"LoRA {name!r}: {error}"))
        else:
            with self._lock:
                self._keep(adapter)
        finally:
            with self._lock:
                self._loading.discard(name)
            self.wake()

    def _failure(self, name: str) -> LoraFileError | None:
        known = self._failed.get(name)
        if known is None:
            return None
        if known[0] != fingerprint(self.path(name) or ""):  # the file changed: try it again
            del self._failed[name]
            return None
        return known[1]

    def _keep(self, adapter: Adapter) -> None:
        self._host[adapter.name] = adapter
        self._host.move_to_end(adapter.name)
        while len(self._host) > self.options.host_capacity:
            self._host.popitem(last=False)


class Slots:
    """Slots 1..count of the per-row layers (slot 0 is the zero slot): which adapter each holds and which
    admitted jobs pin it. `fill(slot, adapter)` copies an adapter into every layer's slot."""

    def __init__(self, count: int, fill: Callable[[int, Adapter], None]):
        self._fill = fill
        self._order: OrderedDict[int, None] = OrderedDict((slot, None) for slot in range(1, count + 1))  # LRU first
        self.holder: dict[int, Adapter] = {}
        self.slot_of: dict[str, int] = {}  # adapter key -> slot
        self.by_name: dict[str, Adapter] = {}  # the resident adapters by name
        self.pins: dict[int, tuple[int, ...]] = {}  # job id -> its slots, in its request's order
        self._refs: Counter[int] = Counter()
        self.loads = 0

    def reserve(self, job_id: int, adapters: list[Adapter]) -> tuple[int, ...] | None:
        """Pin a slot for each adapter, filling unpinned slots with those not resident; None (nothing changed)
        when too few slots are free."""
        keep = {self.slot_of[a.key] for a in adapters if a.key in self.slot_of}
        missing = [a for a in adapters if a.key not in self.slot_of]
        spare = [slot for slot in self._order if self._refs[slot] == 0 and slot not in keep][: len(missing)]
        if len(spare) < len(missing):
            return None
        for adapter, slot in zip(missing, spare):
            self._put(slot, adapter)
        slots = tuple(self.slot_of[a.key] for a in adapters)
        for slot in slots:
            self._refs[slot] += 1
            self._order.move_to_end(slot)
        self.pins[job_id] = slots
        return slots

    def place(self, adapter: Adapter) -> bool:
        """Make an adapter resident without pinning it (launch LoRAs at load), if an empty slot is left."""
        empty = next((slot for slot in self._order if slot not in self.holder), None)
        if empty is None or adapter.key in self.slot_of:
            return False
        self._put(empty, adapter)
        return True

    def release(self, job_id: int) -> None:
        for slot in self.pins.pop(job_id, ()):
            self._refs[slot] -= 1

    @property
    def resident(self) -> list[str]:
        """By slot; safe from other threads (a copy of the dict is one step, and the scheduler thread refills
        slots meanwhile)."""
        holder = self.holder.copy()
        return [holder[slot].name for slot in sorted(holder)]

    def _put(self, slot: int, adapter: Adapter) -> None:
        old = self.holder.pop(slot, None)
        if old is not None:
            del self.slot_of[old.key]
            del self.by_name[old.name]
        self._fill(slot, adapter)
        self.holder[slot] = adapter
        self.slot_of[adapter.key] = slot
        self.by_name[adapter.name] = adapter
        self.loads += 1
