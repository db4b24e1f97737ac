"""Stage `decode`: kept videos -> fixed-shape uint8 clips (frames, height, width, 3).

Clips are taken from each video's clean segment (found by the filter) at stride
round(source_fps / decode.fps), spread evenly over the segment. All frames of one video's clips
are fetched in one decord `get_batch`, resized inside the decoder so the short side covers the
target, then centre-cropped.

Outputs (data/clips/): clips-NNNNN.npy shards of shape (n, frames, height, width, 3), loadable
with `np.load(path, mmap_mode="r")`; index.parquet (one row per clip: clip_id, video_id, shard,
shard_row, start_frame, stride, caption); rejected.parquet (videos whose clips failed to decode,
with reason); report.json. With VERSVIDEO_DATA_STORAGE set, the shards go there instead and
data/clips/shards.json names them (tasks/storage/shard_store.py). Videos are assigned to shards
in kept.parquet order on the driver, so the same inputs always give the same shards; each Ray
task decodes and writes one shard.

The kept image-text pairs (data/filtered/images_kept.parquet) become one-frame clips of the same
size in data/clips/images/ (same files, index.parquet without the frame columns): the UNet's image
stream of joint image-video training (tasks/preprocessing/image_clips.py).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from tasks.config.params import DecodeParams, Params
from tasks.config.paths import CLIPS, IMAGE_CLIPS, IMAGES_KEPT, KEPT
from tasks.preprocessing.clips import decode_clips
from tasks.preprocessing.image_clips import decode_images
from tasks.storage.atomic import atomic_folder, write_json, write_parquet
from tasks.storage.shard_store import data_storage


def main(params: Params) -> None:
    cfg = params.decode
    if not KEPT.exists():
        raise FileNotFoundError(f"{KEPT} not found: run the filter stage first (versvideo stage filter)")
    kept = pd.read_parquet(KEPT)
    if not IMAGES_KEPT.exists():  # the filter always writes it, empty without images
        raise FileNotFoundError(f"{IMAGES_KEPT} not found: these filter outputs predate the image stream; rerun the filter stage (versvideo stage filter)")
    images_kept = pd.read_parquet(IMAGES_KEPT)
    # Built beside the previous clips and swapped in whole: until this run completes, readers
    # (and a crash) keep the previous complete set.
    storage = data_storage()  # None: the shards go into data/clips itself
    with atomic_folder(CLIPS) as staging:
        summary = decode_into(kept, cfg, staging, params.data.videos_root, storage)
        images = decode_images_into(images_kept, cfg, staging / IMAGE_CLIPS.name, params.data.images, storage)
    print(f"decode: {summary['clips']} clips of {tuple(summary['clip_shape'])} from {summary['videos_decoded']} videos in {summary['shards']} shard(s); {summary['videos_rejected']} video(s) rejected")
    if len(images_kept):
        print(f"decode: {images['clips']} images as one-frame clips of {tuple(images['clip_shape'])} in {images['shards']} shard(s); {images['images_rejected']} image(s) rejected")


def decode_into(kept: pd.DataFrame, cfg: DecodeParams, folder: Path, videos_root: str, storage: str | None = None) -> dict:
    index, rejected = decode_clips(kept, cfg, folder, videos_root, storage)
    write_parquet(index, folder / "index.parquet")
    write_parquet(rejected, folder / "rejected.parquet")
    summary = {
        "videos": len(kept),
        "videos_decoded": int(index["video_id"].nunique()),
        "videos_rejected": len(rejected),
        "clips": len(index),
        "shards": int(index["shard"].nunique()),
        "clip_shape": [cfg.frames, cfg.height, cfg.width, 3],
    }
    write_json(summary, folder / "report.json")
    return summary


def decode_images_into(kept: pd.DataFrame, cfg: DecodeParams, folder: Path, images_root: str, storage: str | None = None) -> dict:
    """The image stream's clips; an empty index when there are no images (the folder always exists)."""
    index, rejected = decode_images(kept, cfg, folder, images_root, storage)
    write_parquet(index, folder / "index.parquet")
    write_parquet(rejected, folder / "rejected.parquet")
    summary = {"images": len(kept), "clips": len(index), "images_rejected": len(rejected), "shards": int(index["shard"].nunique()),
               "clip_shape": [1, cfg.height, cfg.width, 3]}
    write_json(summary, folder / "report.json")
    return summary
