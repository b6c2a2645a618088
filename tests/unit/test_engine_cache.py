"""The engine/export cache: keys, lookups, atomic stores, invalidation, weights fingerprints, and the keys and
profiles the onnx and tensorrt backends derive (no GPU needed for any of it)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from kiln.engine.backends.cache import (
    CacheKey,
    EngineCache,
    file_digest,
    module_fingerprint,
    weights_fingerprint,
)
from kiln.engine.backends.tensorrt import Profile, engine_key, find_engine, profile_shapes

PARTS = {"weights": "w1", "dtype": "float16", "opset": 18, "torch": "2.13.0"}


def key(**changes) -> CacheKey:
    return CacheKey.make("onnx", "sd-turbo", **{**PARTS, **changes})


def write(content: bytes = b"graph"):
    def build(directory: Path):
        (directory / "model.onnx").write_bytes(content)
        return {"export_seconds": 1.5}

    return build


# --- keys -----------------------------------------------------------------------------------------------------
def test_key_digest_is_stable_and_order_free():
    assert key().digest == CacheKey.make("onnx", "sd-turbo", torch="2.13.0", opset=18, dtype="float16",
                                         weights="w1").digest
    assert len(key().digest) == 24 and key()["opset"] == "18"
    assert CacheKey.from_dict(key().as_dict()) == key()


@pytest.mark.parametrize("change", [
    {"weights": "w2"}, {"dtype": "float32"}, {"opset": 17}, {"torch": "2.14.0"}, {"extra": "x"},
])
def test_any_changed_part_changes_the_digest(change):
    assert key(**change).digest != key().digest


def test_kind_and_model_are_part_of_the_key():
    assert CacheKey.make("tensorrt", "sd-turbo", **PARTS).digest != key().digest
    assert CacheKey.make("onnx", "sdxl-turbo", **PARTS).digest != key().digest


# --- store and lookup ---------------------------------------------------------------------------------------------
def test_store_builds_once_then_looks_up(tmp_path):
    cache = EngineCache(tmp_path)
    assert cache.lookup(key()) is None
    calls = []

    def build(directory):
        calls.append(directory)
        return write()(directory)

    entry = cache.store(key(), build)
    again = cache.store(key(), build)
    assert len(calls) == 1 and again.path == entry.path
    assert entry.path == tmp_path / "onnx" / "sd-turbo" / key().digest
    assert entry.file("model.onnx").read_bytes() == b"graph"
    assert entry.info == {"export_seconds": 1.5}
    assert cache.lookup(key()).path == entry.path
    meta = json.loads((entry.path / "meta.json").read_text())
    assert meta["key"]["parts"]["weights"] == "w1" and meta["files"] == {"model.onnx": 5}


def test_a_changed_part_misses(tmp_path):
    cache = EngineCache(tmp_path)
    cache.store(key(), write())
    assert cache.lookup(key(weights="w2")) is None
    assert cache.lookup(key(torch="2.14.0")) is None


def test_a_failed_build_leaves_nothing_behind(tmp_path):
    cache = EngineCache(tmp_path)

    def broken(directory):
        (directory / "model.onnx").write_bytes(b"half")
        raise RuntimeError("exporter crashed")

    with pytest.raises(RuntimeError, match="exporter crashed"):
        cache.store(key(), broken)
    assert cache.lookup(key()) is None
    assert list((tmp_path / "onnx" / "sd-turbo").iterdir()) == []  # the staging directory is gone too


def test_incomplete_or_truncated_entries_do_not_match(tmp_path):
    cache = EngineCache(tmp_path)
    entry = cache.store(key(), write(b"a full graph"))
    entry.file("model.onnx").write_bytes(b"a full")  # truncated copy
    assert cache.lookup(key()) is None
    entry.file("model.onnx").write_bytes(b"a full graph")
    assert cache.lookup(key()) is not None
    (entry.path / "meta.json").unlink()  # crashed before meta.json: not an entry
    assert cache.lookup(key()) is None
    rebuilt = cache.store(key(), write(b"again"))  # and a store replaces the leftover
    assert rebuilt.file("model.onnx").read_bytes() == b"again"


def test_staging_directories_of_builds_in_progress_are_invisible(tmp_path):
    cache = EngineCache(tmp_path)
    cache.store(key(), write())
    staging = tmp_path / "onnx" / "sd-turbo" / f".{key(weights='w9').digest}.tmp"
    staging.mkdir()
    (staging / "meta.json").write_text(json.dumps({"key": key(weights="w9").as_dict(), "files": {}}))
    assert [entry.key for entry in cache.entries("onnx", "sd-turbo")] == [key()]


def test_a_foreign_meta_at_the_digest_does_not_match(tmp_path):
    cache = EngineCache(tmp_path)
    entry = cache.store(key(), write())
    meta = json.loads((entry.path / "meta.json").read_text())
    meta["key"]["parts"]["weights"] = "someone else's"
    (entry.path / "meta.json").write_text(json.dumps(meta))
    assert cache.lookup(key()) is None


# --- invalidation -------------------------------------------------------------------------------------------------
def test_a_new_build_removes_the_entries_it_supersedes_only(tmp_path):
    cache = EngineCache(tmp_path)
    old = cache.store(key(weights="old"), write())
    other_dtype = cache.store(key(weights="old", dtype="float32"), write(), replaces=["dtype"])
    other_model = EngineCache(tmp_path).store(CacheKey.make("onnx", "sdxl-turbo", **PARTS), write())
    assert old.path.exists()  # other_dtype did not supersede it: another dtype

    new = cache.store(key(weights="new"), write(), replaces=["dtype"])
    assert not old.path.exists()  # same model and dtype, other weights: superseded
    assert other_dtype.path.exists() and other_model.path.exists() and new.path.exists()
    assert [entry.key["weights"] for entry in cache.entries("onnx", "sd-turbo", dtype="float16")] == ["new"]


def test_entries_filter_by_parts(tmp_path):
    cache = EngineCache(tmp_path)
    cache.store(key(), write())
    cache.store(key(dtype="float32"), write())
    assert {e.key["dtype"] for e in cache.entries("onnx", "sd-turbo")} == {"float16", "float32"}
    assert [e.key["dtype"] for e in cache.entries("onnx", "sd-turbo", dtype="float32")] == ["float32"]
    assert cache.entries("tensorrt") == [] and cache.entries("onnx", "nothing") == []
    assert cache.remove(key()) and cache.lookup(key()) is None and not cache.remove(key())


def test_default_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("KILN_ENGINE_CACHE", raising=False)
    monkeypatch.setenv("KILN_CACHE", str(tmp_path))
    assert EngineCache().root == tmp_path / "engines"
    monkeypatch.setenv("KILN_ENGINE_CACHE", str(tmp_path / "elsewhere"))
    assert EngineCache().root == tmp_path / "elsewhere"


# --- fingerprints ---------------------------------------------------------------------------------------------
def test_weights_fingerprint_follows_content_and_is_memoised(tmp_path):
    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "config.json").write_text('{"a": 1}')
    (folder / "weights.safetensors").write_bytes(b"\x00" * 1000)
    memo = tmp_path / "memo"
    first = weights_fingerprint(folder, memo)
    assert weights_fingerprint(folder, memo) == first and len(list(memo.iterdir())) == 2
    (folder / "weights.safetensors").write_bytes(b"\x01" + b"\x00" * 999)
    os.utime(folder / "weights.safetensors", ns=(1, 1))  # a new mtime invalidates the memo
    assert weights_fingerprint(folder, memo) != first
    with pytest.raises(FileNotFoundError):
        weights_fingerprint(tmp_path / "empty")


def test_hugging_face_blobs_are_not_reread(tmp_path):
    blob = tmp_path / "blobs" / ("ab" * 32)
    blob.parent.mkdir()
    blob.write_bytes(b"weights")
    link = tmp_path / "snapshot.safetensors"
    link.symlink_to(blob)
    assert file_digest(link) == "ab" * 32


def test_module_fingerprint_follows_the_weights():
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    first = module_fingerprint(layer)
    assert module_fingerprint(layer) == first
    with torch.no_grad():
        layer.weight[0, 0] += 1
    assert module_fingerprint(layer) != first


# --- what the tensorrt backend keys and builds (no GPU needed) -------------------------------------------------
def test_profile_description_and_coverage():
    profile = Profile.make([(1024, 1024), (512, 512), (1024, 1024)], 1, 32)
    assert profile.sizes == ((512, 512), (1024, 1024)) and profile.opt_rows == 16
    assert profile.describe() == "512x512,1024x1024;rows=1-16-32"
    assert profile.covers((512, 512), 32) and not profile.covers((512, 512), 33)
    assert not profile.covers((768, 768), 1)
    with pytest.raises(ValueError):
        Profile.make([(64, 64)], 4, 2)


@pytest.mark.parametrize("change", [
    {"capability": "9.0"}, {"version": "10.9.0"}, {"precision": "bf16"},
    {"profile": Profile.make([(64, 64)], 1, 16)}, {"onnx": key(weights="w2")},
])
def test_engine_key_covers_gpu_version_precision_profile_and_export(change):
    base = {"onnx": key(), "capability": "8.9", "version": "10.8.0", "precision": "fp16",
            "profile": Profile.make([(64, 64)], 1, 8)}
    make = lambda a: engine_key(a["onnx"], a["capability"], a["version"], a["precision"], a["profile"])  # noqa: E731
    assert make({**base, **change}).digest != make(base).digest
    assert make(base)["weights"] == "w1" and make(base)["onnx"] == key().digest


def test_find_engine_prefers_one_covering_the_lane(tmp_path):
    cache = EngineCache(tmp_path)
    small, wide = Profile.make([(64, 64)], 1, 4), Profile.make([(64, 64), (128, 128)], 1, 8)

    def stored(profile, capability="8.9"):
        info = {"profile": {"sizes": [list(s) for s in profile.sizes], "min_rows": profile.min_rows,
                            "opt_rows": profile.opt_rows, "max_rows": profile.max_rows}}
        engine = engine_key(key(), capability, "10.8.0", "fp16", profile)
        return cache.store(engine, lambda directory: info)

    stored(small)
    wanted = stored(wide)
    stored(wide, capability="9.0")
    assert find_engine(cache, key(), "8.9", "10.8.0", "fp16", (128, 128), 8).path == wanted.path
    assert find_engine(cache, key(), "8.9", "10.8.0", "fp16", (256, 256), 8) is not None  # any, lanes go eager
    assert find_engine(cache, key(), "8.6", "10.8.0", "fp16", (64, 64), 1) is None  # other GPU architecture
    assert find_engine(cache, key(), "8.9", "10.9.0", "fp16", (64, 64), 1) is None  # other TensorRT
    assert find_engine(cache, key(weights="w2"), "8.9", "10.8.0", "fp16", (64, 64), 1) is None  # other weights


def test_profile_shapes_range_the_batch_and_keep_shared_inputs():
    class Flat:
        input_names = ("hidden_states", "timestep", "img_ids")
        shared_inputs = frozenset({"img_ids"})

    examples = {(64, 64): {"hidden_states": torch.zeros(1, 16, 64), "timestep": torch.zeros(1),
                           "img_ids": torch.zeros(16, 3)}}
    [shapes] = profile_shapes(Flat(), examples, Profile.make([(64, 64)], 1, 6))
    assert shapes["hidden_states"] == ((1, 16, 64), (3, 16, 64), (6, 16, 64))
    assert shapes["timestep"] == ((1,), (3,), (6,))
    assert shapes["img_ids"] == ((16, 3),) * 3
