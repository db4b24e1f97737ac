"""Where the heavy shards of decode and cache_latents live: in their DVC output folder (the
default), or in object storage, where the Ray tasks and training workers of every node read them.

VERSVIDEO_DATA_STORAGE (a local path or a URI such as `s3://bucket/prefix`) moves them: each
shard is then stored once, as `{storage}/shards/{key}`, named by what it is (the sha256 of its
bytes for a clip shard; the fingerprint of everything it was computed from for a latent shard),
so a rerun never overwrites a shard that another version of the pipeline names, and an unchanged
shard is written once for every run and clone. The output folder keeps its small files (index,
reports, encoders.json) and `shards.json`, which names each shard's object and its sha256: DVC
tracks the folder, so its hash still changes exactly when a shard's bytes do, and `dvc pull`
brings the manifest while the bytes stay in the bucket. An environment variable, not a param:
where the bytes lie changes no result, so it must not change a DVC hash of the inputs.

Readers ask `shard_location(folder, name)` on the driver (the one machine that sees the output
folder) and hand the location to their Ray tasks; `read_shard_bytes` and `load_npy` read either
kind of location.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from tasks.storage.atomic import write_json, write_npy
from tasks.storage.object_store import StorageError, absolute, filesystem, is_file, is_uri, join, require_reachable, sha256, write_bytes

DATA_STORAGE_VARIABLE = "VERSVIDEO_DATA_STORAGE"
MANIFEST = "shards.json"
STORED_KEYS = ("object", "sha256", "bytes")  # a manifest entry's


def data_storage() -> str | None:
    """VERSVIDEO_DATA_STORAGE, checked to answer; None: shards stay in their output folders."""
    location = os.environ.get(DATA_STORAGE_VARIABLE)
    if not location:
        return None
    try:
        require_reachable(location)
    except StorageError as error:
        raise StorageError(f"{DATA_STORAGE_VARIABLE}: {error}") from None
    return location if is_uri(location) else absolute(location)


def object_location(storage: str, key: str) -> str:
    return join(storage, "shards", key)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def stored_entry(key: str, data: bytes) -> dict[str, Any]:
    return {"object": key, "sha256": sha256_bytes(data), "bytes": len(data)}


def store_shard(storage: str, key: str, data: bytes) -> dict[str, Any]:
    """Put `data` under `key` in the storage unless it is already there (same key, same bytes);
    returns the manifest entry."""
    location = object_location(storage, key)
    if not is_file(location):
        write_bytes(location, data)
    return stored_entry(key, data)


def write_manifest(folder: Path, storage: str, entries: dict[str, dict[str, Any]]) -> None:
    """`shards.json`: the storage and, per shard name, its object, sha256 and size."""
    write_json({"storage": storage, "shards": dict(sorted(entries.items()))}, folder / MANIFEST)


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def shard_location(folder: str | Path, name: str, manifest: dict[str, Any] | None = None) -> str:
    """Where shard `name` of the output `folder` is: the object its manifest names, else the file
    in the folder (an absolute path: Ray tasks do not run in the driver's directory)."""
    manifest = manifest if manifest is not None else read_manifest(folder)
    if manifest is None:
        return absolute(Path(folder) / name)
    if name not in manifest["shards"]:
        raise missing_shard(folder, name)
    return object_location(manifest["storage"], manifest["shards"][name]["object"])


def shards_digest(folder: str | Path, names: list[str]) -> str:
    """sha256 over each named shard's sha256, in order: model.weights.file_digest's figure for the
    files, the same whether they lie in the folder or are objects its manifest names."""
    manifest = read_manifest(folder)
    digest = hashlib.sha256()
    for name in names:
        if manifest is None:
            digest.update(bytes.fromhex(sha256(absolute(Path(folder) / name))))
        elif name in manifest["shards"]:
            digest.update(bytes.fromhex(manifest["shards"][name]["sha256"]))
        else:
            raise missing_shard(folder, name)
    return digest.hexdigest()


def missing_shard(folder: str | Path, name: str) -> FileNotFoundError:
    return FileNotFoundError(f"{Path(folder) / MANIFEST} names no shard {name}: rerun the stage that wrote {folder}")


def read_shard_bytes(location: str) -> bytes:
    fs, path = filesystem(location)
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{location}: shard not found: a shards.json names it, but the store does not hold it (removed, or "
                                f"AWS_ENDPOINT_URL / the credentials reach another store); rerun the stage that wrote it with "
                                f"`versvideo pipeline --force STAGE` ({DATA_STORAGE_VARIABLE} says where it writes)") from None


def load_npy(location: str) -> np.ndarray:
    """A .npy shard, read-only: memory-mapped from a local file, read whole from object storage."""
    if not is_uri(location):
        return np.load(location, mmap_mode="r")
    return _downloaded_npy(location)


@functools.lru_cache(maxsize=2)
def _downloaded_npy(location: str) -> np.ndarray:
    """The last shards downloaded, kept: readers such as evaluate's real clips take one row at a
    time, mostly from the same shard, and would otherwise download it once per row. Read-only, as
    a memory map is, since every caller shares the array."""
    array = np.load(io.BytesIO(read_shard_bytes(location)))
    array.flags.writeable = False
    return array


def save_npy_shard(array: np.ndarray, out_dir: str, name: str, storage: str | None) -> dict[str, Any] | None:
    """Write a .npy shard: as `name` in out_dir, or, with a storage, as an object named by its
    sha256 there; returns that object's manifest entry (None for a file in out_dir)."""
    if storage is None:
        write_npy(array, Path(out_dir) / name)
        return None
    data = npy_bytes(array)
    return store_shard(storage, f"{sha256_bytes(data)}.npy", data)


def read_output_file(folder: Path, name: str) -> bytes | None:
    """A file of a persisted output `folder` (evaluate's cached real-data statistics): the object
    its manifest names, else the file in the folder; None when neither holds it."""
    manifest = read_manifest(folder)
    if manifest is not None and name in manifest["shards"]:
        return read_shard_bytes(shard_location(folder, name, manifest))
    path = Path(folder) / name
    return path.read_bytes() if path.is_file() else None


def write_output_file(folder: Path, name: str, data: bytes, storage: str | None) -> None:
    """Add file `name` to the persisted output `folder`: into it, or with a data storage as an
    object there (named `name`, which the caller makes unique to what the bytes are computed
    from), recorded in the folder's manifest beside the earlier ones. A manifest of another
    storage is started afresh: the folder is a cache, and its files are recomputed on demand."""
    if storage is None:
        write_bytes(str(Path(folder) / name), data)
        return
    manifest = read_manifest(folder)
    entries = manifest["shards"] if manifest is not None and manifest["storage"] == storage else {}
    write_manifest(Path(folder), storage, {**entries, name: store_shard(storage, name, data)})
