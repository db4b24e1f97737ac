"""What the filter stage learns about one video on its own: probe, decodability, motion and
scene-cut scores (eval/curation.py), content hash; `reason` names the first failed check.

Checks that compare rows with each other (re-crawled ids, identical files) stay in the stage.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from eval import curation
from model.weights import file_sha256
from tasks.config.params import DecodeParams, FilterParams
from tasks.storage.object_store import local_folder
from tasks.storage.video_io import VideoError, clip_stride, cover_size, decode_frames, probe_video, relative_to_root, video_path, video_relative_path, window_length

REASONS = (
    "malformed_row",
    "caption_empty",
    "caption_too_short",
    "duplicate_videoid",
    "path_outside_root",
    "missing_file",
    "unreadable",
    "undecodable",
    "too_short",
    "resolution",
    "aspect_ratio",
    "fps",
    "scene_cut",
    "static",
    "duplicate_content",
    "low_clip_score",
    "internal_error",
)


# Sample frames decoded across the whole file, beyond the analysed window: a file can open,
# report its frame count and still fail part-way (the corrupt fixture does).
DECODABILITY_PROBES = 8


# One schema for every assessed row, whatever happened to it, so Ray blocks concatenate.
NUMERIC_FIELDS = {
    "num_frames": -1,
    "fps": np.nan,
    "height": -1,
    "width": -1,
    "duration_s": np.nan,
    "stride": -1,
    "segment_start": -1,
    "segment_end": -1,
    "motion_score": np.nan,
    "max_cut_score": np.nan,
    "num_cuts": -1,
    "clip_score": np.nan,
}


TEXT_FIELDS = ("reason", "detail", "path", "container", "codec", "content_sha256")


def assess_video(row: dict, videos_root: str, cfg: FilterParams, decode: DecodeParams) -> dict:
    """Everything we can learn about one row on its own; `reason` is '' when it passes. With
    videos_root in object storage the row's video is read from a local copy (local_folder)."""
    record = {**row, **NUMERIC_FIELDS, **{name: "" for name in TEXT_FIELDS}}
    with local_folder(videos_root, named_video(row)) as root:
        try:
            _assess(record, root, cfg, decode)
        except VideoError as error:
            record.update(reason=error.reason, detail=relative_to_root(error.detail, root))
        except Exception as error:  # a bug or an unforeseen file: reject the row, keep the stage going
            record.update(reason="internal_error", detail=relative_to_root(f"{type(error).__name__}: {error}", root))
    return record


def named_video(row: dict) -> list[str]:
    """The file `row` names, relative to videos_root; none when its name is unusable (_assess
    rejects the row and says why)."""
    try:
        return [video_relative_path(row["page_dir"], row["videoid"])]
    except VideoError:
        return []


def _assess(record: dict, videos_root: str, cfg: FilterParams, decode: DecodeParams) -> None:
    """Fill `record` with measurements as they are made; raise VideoError at the first failed
    check, so a rejected row still shows the numbers that explain its rejection."""
    row = record
    caption = str(row["name"]).strip()
    if not str(row["videoid"]).strip():
        raise VideoError("malformed_row", "empty videoid")
    if not caption:
        raise VideoError("caption_empty", "the caption (column `name`) is empty")
    if len(caption.split()) < cfg.min_caption_words:
        raise VideoError("caption_too_short", f"{caption!r} has fewer than {cfg.min_caption_words} words")

    path = video_path(videos_root, row["page_dir"], row["videoid"])
    probe = probe_video(path)
    record.update({
        "path": Path(os.path.relpath(path, os.path.abspath(videos_root))).as_posix(),  # readers join it to data.videos_root
        "container": probe.container,
        "codec": probe.codec,
        "num_frames": probe.num_frames,
        "fps": probe.fps,
        "height": probe.height,
        "width": probe.width,
        "duration_s": probe.duration_s,
    })
    short, long = sorted((probe.height, probe.width))
    if short < cfg.min_short_side:
        raise VideoError("resolution", f"{probe.width}x{probe.height}: short side below {cfg.min_short_side}")
    if long / short > cfg.max_aspect_ratio:
        raise VideoError("aspect_ratio", f"{probe.width}x{probe.height}: aspect {long / short:.2f} > {cfg.max_aspect_ratio}")
    if not cfg.min_fps <= probe.fps <= cfg.max_fps:
        raise VideoError("fps", f"{probe.fps:.2f} fps outside [{cfg.min_fps}, {cfg.max_fps}]")
    stride = clip_stride(probe.fps, decode.fps)
    window = window_length(decode.frames, stride)
    if probe.num_frames < window:
        raise VideoError("too_short", f"{probe.num_frames} frames < {window} for one clip of {decode.frames} at stride {stride}")

    # Decode, small, the frames a clip could use (at the clip stride) plus a few spread over the file.
    analysed = np.arange(0, probe.num_frames, stride)[: cfg.max_analysis_frames]
    spread = np.linspace(0, probe.num_frames - 1, DECODABILITY_PROBES).round().astype(int)
    wanted = np.union1d(analysed, spread)
    height, width = cover_size(probe.height, probe.width, cfg.analysis_short_side, cfg.analysis_short_side)
    frames = decode_frames(path, wanted, height, width)[np.searchsorted(wanted, analysed)]

    distances = curation.histogram_distances(frames)
    cuts = curation.cut_positions(distances, cfg.scene_cut_threshold, cfg.scene_cut_adaptive_ratio, cfg.scene_cut_min_distance)
    if cuts and cfg.scene_cut_policy == "reject":
        raise VideoError("scene_cut", f"{len(cuts)} hard cut(s) at source frame(s) {[int(analysed[c + 1]) for c in cuts]}")
    first, last = curation.longest_clean_segment(len(analysed), cuts)  # sampled positions [first, last)
    record.update({
        "stride": stride,
        "segment_start": int(analysed[first]),
        "segment_end": int(analysed[last - 1]) + 1,
        "max_cut_score": float(distances.max()) if len(distances) else 0.0,
        "num_cuts": len(cuts),
    })
    if last - first < decode.frames:
        raise VideoError("scene_cut", f"longest clean segment has {last - first} frames at stride {stride} < {decode.frames}")
    record["motion_score"] = motion = float(curation.motion_scores(frames[first:last]).mean())
    if motion < cfg.min_motion:
        raise VideoError("static", f"motion score {motion:.5f} < {cfg.min_motion}")
    record["content_sha256"] = file_sha256(path)


def assess_batch(batch: pd.DataFrame, videos_root: str, cfg: FilterParams, decode: DecodeParams) -> pd.DataFrame:
    records = [assess_video(row, videos_root, cfg, decode) for row in batch.to_dict(orient="records")]
    return pd.DataFrame.from_records(records)
