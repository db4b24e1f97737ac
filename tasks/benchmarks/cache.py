"""`versvideo bench cache`: what the latent cache buys training, on real videos.

1. Encode throughput of the cache_latents stage (Ray Data, encoder actor pool, 1 and 2 actors).
2. The baseline, same clips, same run: the on-the-fly path training would otherwise run for
   every sample: decode the clip's frames from the video (decord, resize-in-decoder, crop, as
   the decode stage does), encode them with the VAE and the caption with the text encoder. It
   runs warm, in one process with one thread, and its clips/s is multiplied by the reader's
   number of cores (perfect scaling: generous to the baseline).
3. The reader: one epoch of `latent_dataset(...).iter_torch_batches` with a local shuffle
   buffer, as training workers consume it, after a warm-up epoch; clips/s over the whole epoch,
   Ray Data's per-epoch start-up included (also reported alone, as time to the first batch).

Clips: the smoke preset's (8 x 64 x 64) with its tiny encoders; the clip windows the decode
stage takes from the fixture videos, cycled to `CLIPS` clips.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import ray
import torch

from tasks.benchmarks.common import best_seconds
from tasks.benchmarks.decode import DEFAULT_VIDEOS
from tasks.config.params import CacheLatentsParams, DecodeParams, FilterParams
from tasks.inference.encoders import Encoders, encoder_info
from tasks.operations.ray_runtime import ensure_ray
from tasks.preprocessing.assessment import assess_video
from tasks.preprocessing.clips import decode_video_clips
from tasks.preprocessing.latents import cache_latents
from tasks.storage.clip_shards import shard_name as clip_shard_name
from tasks.storage.latent_shards import latent_dataset
from tasks.storage.video_io import center_crop, cover_size, decode_frames

CLIPS = 512
CLIPS_PER_SHARD = 64
BATCH_SIZE = 16
WORKERS = 2


def clip_windows(videos: Path, cfg: DecodeParams) -> list[dict]:
    """Every clip window the decode stage would take from the usable videos in `videos`."""
    windows = []
    for path in sorted(videos.iterdir()):
        if path.suffix not in (".mp4", ".avi", ".mkv", ".mov"):
            continue
        row = assess_video({"videoid": path.name, "page_dir": ".", "name": f"a video named {path.stem}", "duration": "", "contentUrl": ""}, str(videos), FilterParams(), cfg)
        if row["reason"]:
            continue
        starts, _ = decode_video_clips(row["path"], row["height"], row["width"], row["segment_start"], row["segment_end"], row["stride"], cfg)
        windows += [{"path": row["path"], "height": row["height"], "width": row["width"], "start_frame": start, "stride": row["stride"], "caption": row["name"]} for start in starts]
    if not windows:
        raise FileNotFoundError(f"{videos}: no decodable videos to benchmark (pass --videos DIR)")
    return windows


def write_clip_shards(clips: pd.DataFrame, cfg: DecodeParams, folder: Path) -> pd.DataFrame:
    """The decode stage's output for `clips` (clip shards + index), so the stage can cache them."""
    folder.mkdir(parents=True)
    decoded = {}
    index = clips.assign(shard=np.arange(len(clips)) // CLIPS_PER_SHARD, shard_row=np.arange(len(clips)) % CLIPS_PER_SHARD)
    for shard, rows in index.groupby("shard"):
        stack = []
        for row in rows.itertuples():
            key = (row.path, row.start_frame)
            if key not in decoded:
                decoded[key] = decode_clip(row._asdict(), cfg)
            stack.append(decoded[key])
        np.save(folder / clip_shard_name(int(shard)), np.stack(stack))
    return index


def decode_clip(row: dict, cfg: DecodeParams) -> np.ndarray:
    height, width = cover_size(int(row["height"]), int(row["width"]), cfg.height, cfg.width)
    indices = int(row["start_frame"]) + int(row["stride"]) * np.arange(cfg.frames)
    return center_crop(decode_frames(Path(row["path"]), indices, height, width), cfg.height, cfg.width)


def on_the_fly(encoders: Encoders, clips: pd.DataFrame, cfg: DecodeParams) -> None:
    """The baseline for one pass: every clip decoded from its video and encoded, batch by batch."""
    for _, batch in clips.groupby(np.arange(len(clips)) // BATCH_SIZE):
        torch.from_numpy(np.stack([encoders.encode_clip(decode_clip(row, cfg), row["clip_id"]) for row in batch.to_dict("records")]))
        torch.from_numpy(encoders.encode_text(batch["caption"].tolist()))


def read_pass(latents: Path, seed: int) -> dict[str, float]:
    """One epoch of the reader as training consumes it: clips/s over the whole pass (start-up
    included) and from the first batch on."""
    dataset = latent_dataset(latents, seed=seed)
    started = time.perf_counter()
    first_at, clips = None, 0
    for batch in dataset.iter_torch_batches(batch_size=BATCH_SIZE, local_shuffle_buffer_size=4 * BATCH_SIZE, local_shuffle_seed=seed):
        first_at = first_at or time.perf_counter()
        clips += len(batch["latents"])
    ended = time.perf_counter()
    return {"pass_clips_per_s": clips / (ended - started), "after_first_batch_clips_per_s": (clips - BATCH_SIZE) / (ended - first_at), "first_batch_s": first_at - started}


def run(args: argparse.Namespace) -> dict:
    videos = Path(getattr(args, "videos", None) or DEFAULT_VIDEOS)
    decode_cfg = DecodeParams(clips_per_video=8)  # the smoke preset's 8 x 64 x 64 clips
    cfg = CacheLatentsParams(num_workers=WORKERS)
    windows = clip_windows(videos, decode_cfg)
    clips = pd.DataFrame([{**window, "clip_id": f"clip{k:05d}", "video_id": Path(window["path"]).stem} for k, window in zip(range(CLIPS), itertools.cycle(windows))])

    ensure_ray()
    ray.data.DataContext.get_current().enable_progress_bars = False
    work = Path(tempfile.mkdtemp(prefix="versvideo-bench-cache-"))
    try:
        index = write_clip_shards(clips, decode_cfg, work / "clips")
        encode = {}
        for workers in (1, 2):  # a fresh output folder each time, so nothing is skipped
            worker_cfg = CacheLatentsParams(num_workers=workers)
            out = work / f"latents-{workers}"
            started = time.perf_counter()
            status = cache_latents(index, worker_cfg, encoder_info(worker_cfg), work / "clips", out)
            encode[workers] = {"stage_clips_per_s": len(index) / (time.perf_counter() - started), "actor_clips_per_s": len(index) / status["seconds"].sum()}
        latents = work / f"latents-{WORKERS}"
        index.to_parquet(latents / "index.parquet", index=False)

        # the baseline in this process, one thread (as one Ray worker or DataLoader worker has)
        torch.set_num_threads(1)
        encoders = Encoders(cfg)
        baseline_seconds = best_seconds({"on_the_fly": lambda: on_the_fly(encoders, clips, decode_cfg)}, args.repeats)["on_the_fly"]
        read_pass(latents, seed=0)  # warm-up: Ray Data's worker processes start
        reader = [read_pass(latents, seed=1 + repeat) for repeat in range(max(1, args.repeats))]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    # Generous to the baseline: assume it would scale perfectly over the reader's WORKERS cores.
    baseline = WORKERS * len(clips) / baseline_seconds
    best = max(reader, key=lambda figures: figures["pass_clips_per_s"])
    return {
        "clips": len(clips),
        "distinct_clip_windows": len(windows),
        "clip_shape": [decode_cfg.frames, decode_cfg.height, decode_cfg.width, 3],
        "latent_shape": [decode_cfg.frames, 4, decode_cfg.height // 8, decode_cfg.width // 8],
        "encoders": "smoke (tiny random-init VAE and text tower)",
        "encode_stage_clips_per_s": {str(w): round(figures["stage_clips_per_s"], 1) for w, figures in encode.items()},
        "encode_actor_clips_per_s": {str(w): round(figures["actor_clips_per_s"], 1) for w, figures in encode.items()},
        "on_the_fly_clips_per_s": round(baseline, 1),
        "on_the_fly_clips_per_s_one_core": round(len(clips) / baseline_seconds, 1),
        "reader_clips_per_s": round(best["pass_clips_per_s"], 1),
        "reader_after_first_batch_clips_per_s": round(best["after_first_batch_clips_per_s"], 1),
        "reader_first_batch_s": round(best["first_batch_s"], 2),
        "reader_vs_on_the_fly": round(best["pass_clips_per_s"] / baseline, 2),
        "workers": WORKERS,
        "repeats": len(reader),
    }
