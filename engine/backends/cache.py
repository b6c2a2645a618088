"""The on-disk cache of built artefacts: ONNX exports and TensorRT engines.

A build is slow (seconds for an ONNX export, minutes for a TensorRT engine) and its output is valid only for
what it was built from, so every entry is keyed by all of that: the model, a fingerprint of its weights, and
kind-specific parts (dtype, opset, torch/diffusers/TensorRT versions, GPU compute capability, precision, the
optimisation profile). The digest of the key names the entry's directory, so a change to any part is a miss and a
rebuild; `store` then removes the entries that the new one replaces (`invalidate`).

Entries are written to a staging directory beside their final place and renamed into it once complete, with
`meta.json` (the key, what was built, file sizes) written last: readers never see half an entry, a crashed build
leaves only a staging directory that no lookup matches, and of two processes building the same key one wins.

Layout: `<root>/<kind>/<model>/<digest>/{meta.json, files...}`; root is `$KILN_CACHE/engines` (else
`~/.cache/kiln/engines`), or `$KILN_ENGINE_CACHE` when set.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

CACHE_FORMAT = 1  # bump when the layout or meta.json changes: every old entry then misses
META = "meta.json"
_HEX64 = re.compile(r"[0-9a-f]{64}")


def default_cache_root() -> Path:
    """$KILN_ENGINE_CACHE, else $KILN_CACHE/engines, else ~/.cache/kiln/engines."""
    if os.environ.get("KILN_ENGINE_CACHE"):
        return Path(os.environ["KILN_ENGINE_CACHE"]).expanduser()
    base = os.environ.get("KILN_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "kiln") / "engines"


def _text(value: Any) -> str:
    """A key part as canonical text: strings as they are, anything else as sorted JSON."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class CacheKey:
    """What an artefact was built from. `parts` are (name, text) pairs in name order."""

    kind: str
    model: str
    parts: tuple[tuple[str, str], ...]

    @classmethod
    def make(cls, kind: str, model: str, **parts: Any) -> CacheKey:
        return cls(kind, model, tuple(sorted((name, _text(value)) for name, value in parts.items())))

    def __getitem__(self, name: str) -> str:
        return dict(self.parts)[name]

    def replace(self, **parts: Any) -> CacheKey:
        return CacheKey.make(self.kind, self.model, **{**dict(self.parts), **parts})

    def as_dict(self) -> dict[str, Any]:
        return {"format": CACHE_FORMAT, "kind": self.kind, "model": self.model, "parts": dict(self.parts)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CacheKey:
        return cls(data["kind"], data["model"], tuple(sorted(data["parts"].items())))

    @property
    def digest(self) -> str:
        text = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Entry:
    """A complete cache entry: its key, directory and what the build recorded."""

    key: CacheKey
    path: Path
    info: Mapping[str, Any]
    created: float

    def file(self, name: str) -> Path:
        return self.path / name


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "model"


class EngineCache:
    """Keyed, atomic, self-invalidating storage of built artefacts under one root directory."""

    def __init__(self, root: Path | str | None = None):
        self.root = Path(root) if root is not None else default_cache_root()

    def path(self, key: CacheKey) -> Path:
        return self.root / _slug(key.kind) / _slug(key.model) / key.digest

    # --- reading ------------------------------------------------------------------------------------------------
    def lookup(self, key: CacheKey) -> Entry | None:
        """The complete entry for exactly this key, or None. An entry whose meta.json does not name this key, or
        whose files are missing or of another size than recorded (a truncated copy), does not match."""
        return self._read(self.path(key), expect=key)

    def _read(self, path: Path, expect: CacheKey | None = None) -> Entry | None:
        try:
            meta = json.loads((path / META).read_text(encoding="utf-8"))
            key = CacheKey.from_dict(meta["key"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        if meta["key"].get("format") != CACHE_FORMAT or (expect is not None and key != expect):
            return None
        for name, size in meta.get("files", {}).items():
            try:
                if (path / name).stat().st_size != size:
                    return None
            except OSError:
                return None
        return Entry(key, path, meta.get("info", {}), meta.get("created", 0.0))

    def entries(self, kind: str | None = None, model: str | None = None, **parts: Any) -> list[Entry]:
        """Complete entries of a kind and model whose key has these parts (all of them), newest first."""
        found = []
        for path in self.root.glob(f"{_slug(kind) if kind else '*'}/{_slug(model) if model else '*'}/*"):
            if path.name.startswith(".") or not path.is_dir():
                continue  # staging directories of builds in progress
            entry = self._read(path)
            if entry is None or (kind and entry.key.kind != kind) or (model and entry.key.model != model):
                continue
            if all(dict(entry.key.parts).get(name) == _text(value) for name, value in parts.items()):
                found.append(entry)
        return sorted(found, key=lambda entry: entry.created, reverse=True)

    # --- writing ------------------------------------------------------------------------------------------------
    def store(self, key: CacheKey, build: Callable[[Path], Mapping[str, Any] | None],
              replaces: Iterable[str] | None = None) -> Entry:
        """The entry for `key`: looked up, else built by `build(directory)` (which writes its files there and may
        return info to record) and moved into place atomically. With `replaces`, entries of the same kind and
        model that agree with `key` on those parts but differ elsewhere are removed after the build (see
        invalidate; `replaces=()` supersedes every other entry of the model)."""
        existing = self.lookup(key)
        if existing is not None:
            return existing
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key.digest}.", dir=target.parent))
        try:
            info = dict(build(staging) or {})
            files = {
                str(path.relative_to(staging)): path.stat().st_size
                for path in sorted(staging.rglob("*")) if path.is_file()
            }
            meta = {"key": key.as_dict(), "created": time.time(), "info": info, "files": files}
            _write_atomic(staging / META, json.dumps(meta, indent=1, sort_keys=True))
            if target.exists():  # a broken or foreign leftover at our digest: replace it
                if self.lookup(key) is not None:
                    return self.lookup(key)  # type: ignore[return-value]
                shutil.rmtree(target, ignore_errors=True)
            try:
                os.rename(staging, target)
            except OSError:
                if self.lookup(key) is None:  # not a lost race: a real failure
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if replaces is not None:
            self.invalidate(key, replaces)
        entry = self.lookup(key)
        if entry is None:
            raise OSError(f"cache entry {target} vanished right after it was written")
        return entry

    def stale(self, key: CacheKey, scope: Iterable[str]) -> list[Entry]:
        """Entries that `key` supersedes: same kind and model, same values of the `scope` parts, another digest.

        E.g. a TensorRT engine for the same GPU architecture, precision and profile built from other weights or
        another TensorRT version; engines for other GPUs or profiles are not stale, they are other variants."""
        scope = {name: key[name] for name in scope}
        return [entry for entry in self.entries(key.kind, key.model, **scope) if entry.key != key]

    def invalidate(self, key: CacheKey, scope: Iterable[str]) -> list[Path]:
        """Remove the entries `key` supersedes (see stale); the removed directories."""
        removed = []
        for entry in self.stale(key, scope):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
        return removed

    def remove(self, key: CacheKey) -> bool:
        path = self.path(key)
        if not path.exists():
            return False
        shutil.rmtree(path, ignore_errors=True)
        return True


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


# --- weights fingerprints ---------------------------------------------------------------------------------------
def file_digest(path: Path, memo_root: Path | None = None) -> str:
    """sha256 of a file's bytes.

    Files in a Hugging Face cache are symlinks to blobs named by their sha256: that name is used, unread. Other
    files are hashed once and remembered (in `memo_root`) by path, size and modification time, so a restart
    does not re-read gigabytes of weights."""
    resolved = path.resolve()
    if resolved.parent.name == "blobs" and _HEX64.fullmatch(resolved.name):
        return resolved.name
    stat = resolved.stat()
    memo = None
    if memo_root is not None:
        memo = memo_root / (hashlib.sha1(str(resolved).encode()).hexdigest() + ".json")
        try:
            saved = json.loads(memo.read_text(encoding="utf-8"))
            if saved["size"] == stat.st_size and saved["mtime_ns"] == stat.st_mtime_ns:
                return saved["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
    digest = hashlib.sha256()
    with open(resolved, "rb") as file:
        for block in iter(lambda: file.read(1 << 24), b""):
            digest.update(block)
    value = digest.hexdigest()
    if memo is not None:
        memo.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(memo, json.dumps({"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": value}))
    return value


def weights_fingerprint(directory: Path, memo_root: Path | None = None) -> str:
    """A fingerprint of a component folder (e.g. a checkpoint's unet/): every file's relative path and content."""
    directory = Path(directory)
    files = sorted(path for path in directory.rglob("*") if path.is_file())
    if not files:
        raise FileNotFoundError(f"no files under {directory} to fingerprint")
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.relative_to(directory).as_posix()}\0{file_digest(path, memo_root)}\n".encode())
    return digest.hexdigest()[:32]


def module_fingerprint(module: Any) -> str:
    """A fingerprint of a torch module's parameters and buffers, for weights that have no files (tests, models
    built in memory). Reads every tensor, so prefer weights_fingerprint for real checkpoints."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        data = tensor.detach().contiguous().cpu()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}\n".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]
