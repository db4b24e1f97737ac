"""Reading the decode stage's clip shards (data/clips/clips-NNNNN.npy, (n, t, h, w, 3) uint8, or
the objects data/clips/shards.json names) for training on pixels (the TCM-VAE decoder), and the
seeded held-out split of videos.

The split is by video, never by clip, so no held-out clip shares frames or a scene with a training
clip; a video is held out when a hash of (seed, video_id) falls below `share`, which keeps its
assignment stable when videos are added or removed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import ray

from tasks.operations.ray_runtime import ensure_ray
from tasks.storage.shard_store import load_npy, read_manifest, shard_location


def video_fraction(video_id: str, seed: int) -> float:
    """A seeded, uniform-looking number in [0, 1) per video."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{video_id}".encode()).digest()[:8], "big") / 2**64


def is_held_out(video_id: str, share: float, seed: int) -> bool:
    return video_fraction(video_id, seed) < share


def split_clips(index: pd.DataFrame, share: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training clips, held-out clips) of a clip index; at least one video on each side."""
    videos = sorted(index["video_id"].astype(str).unique())
    if len(videos) < 2:
        raise ValueError(f"{len(videos)} video(s) in the clip index: a held-out split needs at least 2; add videos")
    held = {video for video in videos if is_held_out(video, share, seed)}
    if not held:  # tiny datasets: hold out the video with the lowest fraction
        held = {min(videos, key=lambda video: video_fraction(video, seed))}
    if len(held) == len(videos):
        held.discard(max(videos, key=lambda video: video_fraction(video, seed)))
    mask = index["video_id"].astype(str).isin(held)
    return index[~mask].reset_index(drop=True), index[mask].reset_index(drop=True)


def read_clips(clips_dir: str | Path, rows: pd.DataFrame) -> np.ndarray:
    """The clips of `rows` (index rows: shard, shard_row), in row order: (n, t, h, w, 3) uint8."""
    clips = []
    manifest = read_manifest(clips_dir)
    for shard, group in rows.reset_index(drop=True).groupby("shard", sort=False):
        array = load_npy(shard_location(clips_dir, shard_name(int(shard)), manifest))
        clips.append((group.index, np.asarray(array[group["shard_row"].to_numpy()])))
    order = np.argsort(np.concatenate([positions for positions, _ in clips]))
    return np.concatenate([frames for _, frames in clips])[order]


def _read_shard(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"frames": np.asarray(load_npy(batch["location"][0])[np.asarray(batch["rows"][0], dtype=np.int64)])}


def clip_dataset(clips_dir: str | Path, rows: pd.DataFrame, seed: int | None = None) -> ray.data.Dataset:
    """A streaming Ray Data dataset of the clips in `rows`: `frames` (t, h, w, 3) uint8, one read task
    per shard (shards in a seeded order when `seed` is given)."""
    ensure_ray()  # before the dataset exists (see ensure_ray)
    manifest = read_manifest(clips_dir)  # here, on the driver: read tasks on other nodes do not see clips_dir
    shards = [{"location": shard_location(clips_dir, shard_name(int(shard)), manifest), "rows": group["shard_row"].astype(int).tolist()}
              for shard, group in rows.groupby("shard")]
    if seed is not None:
        shards = [shards[i] for i in np.random.default_rng(seed).permutation(len(shards))]
    return ray.data.from_items(shards).map_batches(_read_shard, batch_size=1, batch_format="numpy")


def shard_name(shard: int) -> str:
    return f"clips-{shard:05d}.npy"


def held_out_videos(index: pd.DataFrame, share: float, seed: int) -> frozenset[str]:
    """Video ids of split_clips' held-out side (none when share is 0): train_unet's
    `held_out_share` and `seed` give the videos the UNet and the ControlNet never train on, and
    evaluate's heldout protocol draws the same ones."""
    if share == 0:
        return frozenset()
    return frozenset(split_clips(index, share, seed)[1]["video_id"].astype(str))
