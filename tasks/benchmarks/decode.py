"""`versvideo bench decode`: clips/s of the decode stage's code path on real videos.

Baseline, same run, same clips: PyAV decodes every frame at full size to RGB, then the clip
frames are picked and resized/cropped with the same resize as ours (so only the decoding
strategy differs). Both decode with one thread, as each Ray worker does. Then the stage itself
(Ray Data, a few videos per shard) with 1 and 2 workers. Clip size is the L preset's (16 x 256 x 256), where decode cost matters.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import av
import numpy as np
import pandas as pd

from tasks.benchmarks.common import best_seconds
from tasks.config.params import PRESET_DEFAULTS, DecodeParams, FilterParams
from tasks.operations.ray_runtime import ensure_ray
from tasks.preprocessing.assessment import assess_video
from tasks.preprocessing.clips import decode_clips, decode_video_clips
from tasks.storage.video_io import center_crop, cover_size, resize_frames

DEFAULT_VIDEOS = Path("../shared/fixtures/videos")
RAY_COPIES = 16  # each good video this many times, so two workers have work to share
VIDEOS_PER_SHARD = 4  # one Ray task per shard; tiny tasks would measure Ray's overhead instead


def naive_video_clips(row: dict, cfg: DecodeParams) -> np.ndarray:
    """The baseline: decode every frame with PyAV (one thread, like a Ray worker), then pick the
    clip frames the stage picked, resize and crop them."""
    with av.open(row["path"]) as container:
        container.streams.video[0].codec_context.thread_count = 1
        frames = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])
    indices = np.concatenate([start + row["stride"] * np.arange(cfg.frames) for start in row["starts"]])
    height, width = cover_size(row["height"], row["width"], cfg.height, cfg.width)
    clips = center_crop(resize_frames(frames[indices], height, width), cfg.height, cfg.width)
    return clips.reshape(len(row["starts"]), cfg.frames, cfg.height, cfg.width, 3)


def ours_video_clips(row: dict, cfg: DecodeParams) -> np.ndarray:
    return decode_video_clips(row["path"], row["height"], row["width"], row["segment_start"], row["segment_end"], row["stride"], cfg)[1]


def run(args: argparse.Namespace) -> dict:
    videos = Path(getattr(args, "videos", None) or DEFAULT_VIDEOS)
    cfg = DecodeParams(**{**PRESET_DEFAULTS["L"]["decode"], "clips_per_shard": VIDEOS_PER_SHARD * DecodeParams.clips_per_video})
    # The filter decides which fixtures are usable and where their clean segments are.
    assessed = [
        assess_video({"videoid": path.name, "page_dir": ".", "name": "benchmark clip caption", "duration": "", "contentUrl": ""},
                     str(videos), FilterParams(), cfg)
        for path in sorted(videos.iterdir())
        if path.suffix in (".mp4", ".avi", ".mkv", ".mov")
    ]
    rows = [row for row in assessed if row["reason"] == ""]
    if not rows:
        raise FileNotFoundError(f"{videos}: no decodable videos to benchmark (pass --videos DIR)")
    for row in rows:  # the baseline decodes the very clips the stage chooses
        row["starts"] = decode_video_clips(row["path"], row["height"], row["width"], row["segment_start"], row["segment_end"], row["stride"], cfg)[0]

    clips_per_pass = sum(len(row["starts"]) for row in rows)
    seconds = best_seconds(
        {name: functools.partial(lambda decode_one: [decode_one(row, cfg) for row in rows], decode_one)
         for name, decode_one in (("ours", ours_video_clips), ("naive", naive_video_clips))},
        args.repeats,
    )
    ours, naive = clips_per_pass / seconds["ours"], clips_per_pass / seconds["naive"]
    parity = float(np.abs(ours_video_clips(rows[0], cfg).astype(np.int16) - naive_video_clips(rows[0], cfg)).mean())

    ensure_ray()
    kept = pd.DataFrame([{**row, "videoid": f"{row['videoid']}-{copy}"} for copy in range(RAY_COPIES) for row in rows])
    out = Path("/tmp/versvideo-bench-decode")
    stage_clips = RAY_COPIES * clips_per_pass
    worker_configs = {workers: DecodeParams(**{**cfg.__dict__, "num_workers": workers}) for workers in (1, 2)}
    seconds = best_seconds({workers: functools.partial(decode_clips, kept, worker_cfg, out) for workers, worker_cfg in worker_configs.items()}, args.repeats)
    stage = {workers: stage_clips / value for workers, value in seconds.items()}
    return {
        "clip_shape": [cfg.frames, cfg.height, cfg.width, 3],
        "videos": [row["videoid"] for row in rows],
        "clips_per_pass": int(clips_per_pass),
        "ours_clips_per_s": round(ours, 2),
        "naive_pyav_clips_per_s": round(naive, 2),
        "speedup_vs_naive": round(ours / naive, 2),
        "mean_abs_pixel_diff_vs_naive": round(parity, 3),
        "stage_1_worker_clips_per_s": round(stage[1], 2),
        "stage_2_workers_clips_per_s": round(stage[2], 2),
        "speedup_2_vs_1_workers": round(stage[2] / stage[1], 2),
    }
