"""Stage `filter`: probe and score every CSV row's video; keep the usable ones, reject the rest
with one specific reason each. Every input row lands in exactly one of kept.parquet and
rejected.parquet; report.json counts rows per reason (a DVC metric).

Per-video work (probe, decode sample frames, scores, content hash) runs on Ray Data; checks that
compare rows with each other (re-crawled videoids, identical files) run on the driver.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import ray

from model.weights import file_sha256
from tasks import curation
from tasks.atomic import remove_stale_temporaries, write_json, write_parquet
from tasks.params import DecodeParams, FilterParams, Params
from tasks.ray_runtime import ensure_ray
from tasks.video_io import (
    VideoError,
    clip_stride,
    cover_size,
    decode_frames,
    probe_video,
    video_path,
    window_length,
)
from tasks.webvid import read_webvid_csv

OUT_DIR = Path("data/filtered")
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
    """Everything we can learn about one row on its own; `reason` is '' when it passes."""
    record = {**row, **NUMERIC_FIELDS, **{name: "" for name in TEXT_FIELDS}}
    try:
        _assess(record, videos_root, cfg, decode)
    except VideoError as error:
        record.update(reason=error.reason, detail=error.detail)
    except Exception as error:  # a bug or an unforeseen file: reject the row, keep the stage going
        record.update(reason="internal_error", detail=f"{type(error).__name__}: {error}")
    return record


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
        "path": str(path),
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


def _assess_on_ray(rows: pd.DataFrame, videos_root: str, cfg: FilterParams, decode: DecodeParams) -> pd.DataFrame:
    """assess_video for every row, one row per task, `num_workers` tasks at a time."""
    if rows.empty:
        return pd.DataFrame(columns=[*rows.columns, *NUMERIC_FIELDS, *TEXT_FIELDS])
    ensure_ray()
    return (
        ray.data.from_pandas(rows)
        .repartition(max(1, min(len(rows), 4 * cfg.num_workers)))
        .map_batches(
            assess_batch,
            batch_format="pandas",
            batch_size=1,
            num_cpus=1,
            compute=ray.data.TaskPoolStrategy(size=cfg.num_workers),
            fn_kwargs={"videos_root": videos_root, "cfg": cfg, "decode": decode},
        )
        .to_pandas()
    )


def filter_videos(rows: pd.DataFrame, videos_root: str, cfg: FilterParams, decode: DecodeParams) -> tuple[pd.DataFrame, pd.DataFrame]:
    """rows: a WebVid CSV as strings. Returns (kept, rejected); together they hold every row once."""
    rows = rows.reset_index(drop=True).assign(row_index=lambda frame: np.arange(len(frame)))
    # Re-crawled videoids: the last row wins, as in prepare (the newest caption).
    repeated = rows.duplicated(subset="videoid", keep="last")
    unique = rows[~repeated]

    # Absolute: workers on an existing cluster (RAY_ADDRESS) do not run in this stage's directory
    assessed = _assess_on_ray(unique, os.path.abspath(videos_root), cfg, decode)
    duplicates = rows[repeated].assign(**NUMERIC_FIELDS, **dict.fromkeys(TEXT_FIELDS, "")).assign(
        reason="duplicate_videoid", detail="a later row has the same videoid (its caption is kept)"
    )
    assessed = pd.concat([assessed, duplicates], ignore_index=True).sort_values("row_index", kind="stable")
    # Identical files under different ids: keep the first, reject the copies.
    hashed = (assessed["reason"] == "") & (assessed["content_sha256"] != "")
    copies = hashed & assessed["content_sha256"].where(hashed).duplicated(keep="first")
    if copies.any():
        first_row = assessed[hashed].drop_duplicates("content_sha256").set_index("content_sha256")["videoid"]
        assessed.loc[copies, "reason"] = "duplicate_content"
        assessed.loc[copies, "detail"] = "same bytes as videoid " + assessed.loc[copies, "content_sha256"].map(first_row)

    if cfg.clip_weights:  # scores are recorded; rows below clip_min_score are rejected
        assessed = _apply_clip_filter(assessed, cfg)

    kept = assessed[assessed["reason"] == ""].drop(columns=["reason", "detail"]).reset_index(drop=True)
    rejected = assessed[assessed["reason"] != ""].reset_index(drop=True)
    assert len(kept) + len(rejected) == len(rows), "filter lost or duplicated rows"
    return _typed(kept), _typed(rejected)


def _apply_clip_filter(assessed: pd.DataFrame, cfg: FilterParams) -> pd.DataFrame:
    from tasks.clip_score import ClipFrameScorer  # imports open_clip only when enabled

    candidates = assessed[assessed["reason"] == ""]
    if candidates.empty:
        return assessed
    scored = (
        ray.data.from_pandas(candidates.loc[:, ["row_index", "path", "name", "segment_start", "segment_end", "height", "width"]])
        .map_batches(
            ClipFrameScorer,
            batch_format="pandas",
            batch_size=16,
            compute=ray.data.ActorPoolStrategy(size=1),  # one CLIP model in memory
            fn_constructor_kwargs={"model_name": cfg.clip_model, "weights": cfg.clip_weights},
        )
        .to_pandas()
        .set_index("row_index")["clip_score"]
    )
    assessed = assessed.assign(clip_score=assessed["row_index"].map(scored).astype("float64"))
    low = (assessed["reason"] == "") & (assessed["clip_score"] < cfg.clip_min_score)
    assessed.loc[low, "reason"] = "low_clip_score"
    assessed.loc[low, "detail"] = assessed.loc[low, "clip_score"].map(lambda s: f"CLIP text-frame similarity {s:.3f} < {cfg.clip_min_score}")
    return assessed


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    for name, missing in NUMERIC_FIELDS.items():
        if name in frame:
            frame[name] = frame[name].astype("float64" if isinstance(missing, float) else "int64")
    frame["row_index"] = frame["row_index"].astype("int64")
    return frame


def report(kept: pd.DataFrame, rejected: pd.DataFrame) -> dict:
    counts = rejected["reason"].value_counts()
    return {
        "input_rows": len(kept) + len(rejected),
        "kept": len(kept),
        "rejected": len(rejected),
        "reasons": {reason: int(counts.get(reason, 0)) for reason in REASONS},
    }


def main(params: Params) -> None:
    remove_stale_temporaries(OUT_DIR)  # leftovers of a run that was killed mid-write
    rows = read_webvid_csv(params.data.csv)
    kept, rejected = filter_videos(rows, params.data.videos_root, params.filter, params.decode)
    write_parquet(kept, OUT_DIR / "kept.parquet")
    write_parquet(rejected, OUT_DIR / "rejected.parquet")
    summary = report(kept, rejected)
    write_json(summary, OUT_DIR / "report.json")
    reasons = ", ".join(f"{reason} {count}" for reason, count in summary["reasons"].items() if count)
    print(f"filter: kept {summary['kept']} of {summary['input_rows']} rows; rejected: {reasons or 'none'}")
