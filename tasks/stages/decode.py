"""Stage `decode`: kept videos -> fixed-shape uint8 clips (frames, height, width, 3).

Clips are taken from each video's clean segment (found by the filter) at stride
round(source_fps / decode.fps), spread evenly over the segment. All frames of one video's clips
are fetched in one decord `get_batch`, resized inside the decoder so the short side covers the
target, then centre-cropped.

Outputs (data/clips/): clips-NNNNN.npy shards of shape (n, frames, height, width, 3), loadable
with `np.load(path, mmap_mode="r")`; index.parquet (one row per clip: clip_id, video_id, shard,
shard_row, start_frame, stride, caption); rejected.parquet (videos whose clips failed to decode,
with reason); report.json. Videos are assigned to shards in kept.parquet order on the driver, so
the same inputs always give the same shards; each Ray task decodes and writes one shard.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from tasks.config.params import DecodeParams, Params
from tasks.config.paths import CLIPS, KEPT
from tasks.preprocessing.clips import decode_clips
from tasks.storage.atomic import atomic_folder, write_json, write_parquet


def main(params: Params) -> None:
    cfg = params.decode
    if not KEPT.exists():
        raise FileNotFoundError(f"{KEPT} not found: run the filter stage first (versvideo stage filter)")
    kept = pd.read_parquet(KEPT)
    # Built beside the previous clips and swapped in whole: until this run completes, readers
    # (and a crash) keep the previous complete set.
    with atomic_folder(CLIPS) as staging:
        summary = decode_into(kept, cfg, staging, params.data.videos_root)
    print(f"decode: {summary['clips']} clips of {tuple(summary['clip_shape'])} from {summary['videos_decoded']} videos in {summary['shards']} shard(s); {summary['videos_rejected']} video(s) rejected")


def decode_into(kept: pd.DataFrame, cfg: DecodeParams, folder: Path, videos_root: str) -> dict:
    index, rejected = decode_clips(kept, cfg, folder, videos_root)
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
