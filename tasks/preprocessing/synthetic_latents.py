"""A synthetic latent cache in the cache_latents stage's format, for benchmarks and tests of
training that need no videos and no encoders: moving-blob latents and random text contexts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from tasks.storage.atomic import write_json
from tasks.storage.latent_shards import shard_name, write_latent_shard


def moving_blob_latents(rng: np.random.Generator, clips: int, frames: int, height: int, width: int, channels: int = 4) -> np.ndarray:
    """(clips, t, c, h, w) float32 latents, as the cache stores them: a bright cell on a dark
    field, moving one cell per frame in a random diagonal direction (learnable, with motion)."""
    latents = np.full((clips, frames, channels, height, width), -0.1, np.float32)
    for clip in range(clips):
        y, x, dy, dx = rng.integers(0, min(height, width), 2).tolist() + rng.choice([-1, 1], 2).tolist()
        for t in range(frames):
            latents[clip, t, :, (y + dy * t) % height, (x + dx * t) % width] = 1.5
    return latents


def synthetic_cache(folder: Path, frames: int = 8, size: int = 8, width: int = 64, seed: int = 0, shards: int = 4, clips_per_shard: int = 64,
                    videos: int = 0) -> Path:
    """A latent cache in the stage's format with moving-blob latents and random 77 x `width`
    contexts; its image stream (images/) holds one shard of one-frame blobs. The clips belong to
    one video ("synthetic"), or with `videos` > 0 to videos v0, v1, ... in turn (the fixture
    clips' ids, for held-out splits)."""
    rng = np.random.default_rng(seed)
    _write_shards(folder, rng, shards, clips_per_shard, frames, size, width, "s", "a blob moves", videos)
    _write_shards(folder / "images", rng, 1, clips_per_shard, 1, size, width, "i", "a blob")
    np.save(folder / "null_context.npy", np.zeros((77, width), np.float16))
    write_json({"image_vae": {"weights": ""}}, folder / "encoders.json")
    return folder


def _write_shards(folder: Path, rng: np.random.Generator, shards: int, clips_per_shard: int, frames: int, size: int, width: int, prefix: str, caption: str,
                  videos: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for shard in range(shards):
        latents = moving_blob_latents(rng, clips_per_shard, frames, size, size)
        ids = [f"{prefix}{shard}c{k}" for k in range(clips_per_shard)]
        video_ids = ids if frames == 1 else [f"v{k % videos}" for k in range(clips_per_shard)] if videos else "synthetic"
        clips = pd.DataFrame({"clip_id": ids, "video_id": video_ids, "caption": caption})
        context = (rng.standard_normal((clips_per_shard, 77, width)) * 0.1).astype(np.float16)
        write_latent_shard(folder / shard_name(shard), clips, latents, context, fingerprint="bench")
        rows.append(clips.assign(shard=shard, shard_row=np.arange(clips_per_shard)))
    pd.concat(rows).to_parquet(folder / "index.parquet", index=False)
