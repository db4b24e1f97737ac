"""The latent cache's file format, and the Ray Data reader training streams from.

data/latents/ holds
- latents-NNNNN.parquet (or, with VERSVIDEO_DATA_STORAGE, objects named in shards.json:
  tasks/storage/shard_store.py): one row per clip, in the clip shard's row order: clip_id, video_id,
  caption, `latents` (t, 4, h/8, w/8) float16 already multiplied by the VAE scale factor, and
  `context` (77, width) float16, the caption's text-encoder token states. The text context sits
  in the same row as its latents, so one read gives a whole training sample and a shuffled file
  order keeps them together. Tensor columns use Ray Data's tensor extension type, so Ray reads
  them as ndarrays. The schema metadata carries the shard's fingerprint (what it was computed
  from), which is how a rerun knows a shard is complete and current.
- index.parquet: one row per clip (clip_id, video_id, shard, shard_row, caption, ...), written
  last: a reader only ever opens shards the index names, never a temporary or stale file.
- null_context.npy: the empty prompt's context (77, width) float16, for classifier-free guidance.
- encoders.json: which VAE and text encoder made the cache (weights hashes, scale factor,
  random_init), read by the stages that decode latents or encode prompts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data.extensions import ArrowTensorArray

from tasks.operations.ray_runtime import ensure_ray
from tasks.storage.atomic import atomic_path
from tasks.storage.clip_shards import shard_name as clip_shard_name
from tasks.storage.object_store import filesystem
from tasks.storage.shard_store import load_npy, read_manifest, shard_location

FINGERPRINT_KEY = b"versvideo.fingerprint"
TENSOR_COLUMNS = ("latents", "context")


def shard_name(shard: int) -> str:
    return f"latents-{shard:05d}.parquet"


def latent_shard_table(rows: pd.DataFrame, latents: np.ndarray, context: np.ndarray, fingerprint: str) -> pa.Table:
    return pa.table(
        {
            "clip_id": pa.array(rows["clip_id"].astype(str).tolist(), pa.string()),
            "video_id": pa.array(rows["video_id"].astype(str).tolist(), pa.string()),
            "caption": pa.array(rows["caption"].astype(str).tolist(), pa.string()),
            "latents": ArrowTensorArray.from_numpy(np.ascontiguousarray(latents, dtype=np.float16)),
            "context": ArrowTensorArray.from_numpy(np.ascontiguousarray(context, dtype=np.float16)),
        }
    ).replace_schema_metadata({FINGERPRINT_KEY: fingerprint.encode()})


def _write_table(table: pa.Table, where) -> None:
    # fp16 latents barely compress; uncompressed pages keep reading at memory speed
    pq.write_table(table, where, compression="none", row_group_size=len(table))


def write_latent_shard(path: Path, rows: pd.DataFrame, latents: np.ndarray, context: np.ndarray, fingerprint: str) -> None:
    """Write one shard under a temporary name and rename it when complete."""
    with atomic_path(path) as tmp:
        _write_table(latent_shard_table(rows, latents, context, fingerprint), tmp)


def latent_shard_bytes(rows: pd.DataFrame, latents: np.ndarray, context: np.ndarray, fingerprint: str) -> bytes:
    """One shard's file, in memory: for the data storage (tasks/storage/shard_store.py)."""
    buffer = pa.BufferOutputStream()
    _write_table(latent_shard_table(rows, latents, context, fingerprint), buffer)
    return buffer.getvalue().to_pybytes()


def shard_fingerprint(path: Path) -> str | None:
    """The fingerprint a complete shard was written with; None when there is no readable shard."""
    try:
        metadata = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowInvalid):
        return None
    value = metadata.get(FINGERPRINT_KEY)
    return value.decode() if value else None


def read_latent_shard(location: str | Path, columns: tuple[str, ...] = TENSOR_COLUMNS) -> dict[str, np.ndarray]:
    """Columns of one shard (a file, or an object in the data storage) as arrays: tensors (n, ...)
    in float16, strings as object arrays."""
    fs, path = filesystem(str(location))
    table = pq.read_table(path, columns=list(columns), filesystem=fs)
    out = {}
    for name in columns:
        column = table.column(name)
        if name in TENSOR_COLUMNS:
            out[name] = np.concatenate([chunk.to_numpy() for chunk in column.chunks]) if column.num_chunks != 1 else column.chunk(0).to_numpy()
        else:
            out[name] = np.asarray(column.to_pylist(), dtype=object)
    return out


def read_index(folder: str | Path) -> pd.DataFrame:
    path = Path(folder) / "index.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the cache_latents stage first (versvideo stage cache_latents)")
    return pd.read_parquet(path)


def shard_locations(folder: str | Path, shards) -> list[str]:
    """Where the latent shards numbered `shards` of the cache in `folder` are (files or objects)."""
    manifest = read_manifest(folder)
    return [shard_location(folder, shard_name(int(shard)), manifest) for shard in shards]


def load_null_context(folder: str | Path) -> np.ndarray:
    return np.load(Path(folder) / "null_context.npy")


def load_encoders_info(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "encoders.json").read_text())


def _read_shards(batch: dict[str, np.ndarray], columns: tuple[str, ...], exclude_videos: frozenset[str]) -> dict[str, np.ndarray]:
    read = columns + ("video_id",) if exclude_videos and "video_id" not in columns else columns
    parts = [read_latent_shard(path, read) for path in batch["path"]]
    if exclude_videos:
        parts = [{name: part[name][~np.isin(part["video_id"], list(exclude_videos))] for name in read} for part in parts]
    return {name: np.concatenate([part[name] for part in parts]) for name in columns}


def latent_dataset(folder: str | Path, seed: int | None = None, columns: tuple[str, ...] = TENSOR_COLUMNS,
                   exclude_videos: frozenset[str] = frozenset()) -> ray.data.Dataset:
    """A streaming Ray Data dataset of the cached clips: rows of `latents` (t, 4, h/8, w/8) and
    `context` (77, width), float16.

    Shards come from index.parquet (only complete shards, in a seeded random order when `seed`
    is given); one read task per shard. Shuffle within the stream with
    `iter_torch_batches(local_shuffle_buffer_size=..., local_shuffle_seed=...)`, or pass the
    dataset to a Ray Train trainer and read `get_dataset_shard` in the workers.

    (ray.data.read_parquet would also work, but it lists files and prefetches every footer on
    each execution, which took 8-13 s per epoch for 40 shards on a 2-core machine; the index
    already knows the shards.) Rows of `exclude_videos` (held-out video ids) are dropped."""
    ensure_ray()  # before the dataset exists (see ensure_ray)
    shards = sorted(read_index(folder)["shard"].unique())
    if seed is not None:
        shards = list(np.random.default_rng(seed).permutation(shards))
    paths = shard_locations(folder, shards)  # here: read tasks on another node do not see the folder
    return ray.data.from_items([{"path": path} for path in paths]).map_batches(
        _read_shards, batch_size=1, batch_format="numpy", fn_kwargs={"columns": tuple(columns), "exclude_videos": frozenset(exclude_videos)}
    )


def _read_shard_pair(batch: dict[str, np.ndarray], exclude_videos: frozenset[str]) -> dict[str, np.ndarray]:
    latents = read_latent_shard(batch["latents_path"][0], ("latents", "context", "video_id"))
    frames = np.asarray(load_npy(batch["clips_path"][0])[np.asarray(batch["rows"][0], dtype=np.int64)])
    if len(frames) != len(latents["latents"]):
        raise ValueError(f"{batch['latents_path'][0]} has {len(latents['latents'])} clips but {batch['clips_path'][0]} rows give {len(frames)}: rerun cache_latents")
    keep = ~np.isin(latents["video_id"], list(exclude_videos))
    return {"latents": latents["latents"][keep], "context": latents["context"][keep], "frames": frames[keep]}


def latent_clip_dataset(latents_dir: Path, clips_dir: Path, seed: int, exclude_videos: frozenset[str]) -> ray.data.Dataset:
    """Rows of `latents` (t, 4, h, w), `context` (77, d) and `frames` (t, H, W, 3) uint8 of the same
    clip (train_controlnet computes its conditions from the frames): one read task per shard pair,
    latent shard k beside clip shard k, shards in a seeded order.

    The reader lives here, with the formats, so that Ray's data workers import only numpy, pandas
    and pyarrow to run it (the stage's module pulls in torch, open_clip and MLflow: 12 s a worker
    on 2 cores, which the first training step waited for)."""
    ensure_ray()  # before the dataset exists (see ensure_ray)
    index = read_index(latents_dir)
    latent_manifest, clip_manifest = read_manifest(latents_dir), read_manifest(clips_dir)
    items = []
    for shard, rows in index.groupby("shard", sort=True):
        items.append({
            "latents_path": shard_location(latents_dir, shard_name(int(shard)), latent_manifest),
            "clips_path": shard_location(clips_dir, clip_shard_name(int(shard)), clip_manifest),
            "rows": rows.sort_values("shard_row")["shard_row"].astype(int).tolist(),  # the latent shard's row order
        })
    items = [items[k] for k in np.random.default_rng(seed).permutation(len(items))]
    return ray.data.from_items(items).map_batches(_read_shard_pair, batch_size=1, batch_format="numpy", fn_kwargs={"exclude_videos": frozenset(exclude_videos)})
