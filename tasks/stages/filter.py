"""Stage `filter`: probe and score every CSV row's video; keep the usable ones, reject the rest
with one specific reason each. Every input row lands in exactly one of kept.parquet and
rejected.parquet; report.json counts rows per reason (metrics/filter.json: kept and rejected).

Per-video work (probe, decode sample frames, scores, content hash) runs on Ray Data; checks that
compare rows with each other (re-crawled videoids, identical files) run on the driver.

The image-text pairs of data.images (joint training) are filtered beside them, one Ray task per
shard or Parquet file: every record lands in exactly one of images_kept.parquet and
images_rejected.parquet, with its reason (tasks/preprocessing/image_assessment.py).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import ray

from tasks.config.params import DecodeParams, FilterParams, Params
from tasks.config.paths import FILTER_METRICS, FILTER_REPORT, FILTERED, IMAGES_KEPT, IMAGES_REJECTED, KEPT, REJECTED
from tasks.operations.ray_runtime import collect_with_progress, ensure_ray, on_record
from tasks.preprocessing.assessment import NUMERIC_FIELDS, REASONS, TEXT_FIELDS, assess_batch
from tasks.preprocessing.image_assessment import IMAGE_COLUMNS, IMAGE_REASONS, assess_sources_batch, reject_repeats
from tasks.storage.image_text import images_folder, source_files
from tasks.storage.object_store import absolute
from tasks.storage.atomic import atomic_folder, write_json, write_metrics, write_parquet
from tasks.storage.webvid import read_webvid_csv
from tasks.storage.weight_files import require_weight_files


def _assess_on_ray(rows: pd.DataFrame, videos_root: str, cfg: FilterParams, decode: DecodeParams) -> pd.DataFrame:
    """assess_video for every row, one row per task, `num_workers` tasks at a time."""
    if rows.empty:
        return pd.DataFrame(columns=[*rows.columns, *NUMERIC_FIELDS, *TEXT_FIELDS])
    ensure_ray()
    assessed = (
        ray.data.from_pandas(rows)
        .repartition(max(1, min(len(rows), 4 * cfg.num_workers)))
        .map_batches(
            on_record(assess_batch),
            batch_format="pandas",
            batch_size=1,
            num_cpus=1,
            compute=ray.data.TaskPoolStrategy(size=cfg.num_workers),
            fn_kwargs={"videos_root": videos_root, "cfg": cfg, "decode": decode},
        )
    )
    return collect_with_progress(assessed, "filter", len(rows), "rows probed")


def filter_videos(rows: pd.DataFrame, videos_root: str, cfg: FilterParams, decode: DecodeParams) -> tuple[pd.DataFrame, pd.DataFrame]:
    """rows: a WebVid CSV as strings. Returns (kept, rejected); together they hold every row once."""
    rows = rows.reset_index(drop=True).assign(row_index=lambda frame: np.arange(len(frame)))
    # Re-crawled videoids: the last row wins, as in prepare (the newest caption).
    repeated = rows.duplicated(subset="videoid", keep="last")
    unique = rows[~repeated]

    # Absolute (or a URI): workers on an existing cluster (RAY_ADDRESS) do not run in this stage's directory
    assessed = _assess_on_ray(unique, absolute(videos_root), cfg, decode)
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
        assessed = _apply_clip_filter(assessed, cfg, absolute(videos_root))

    kept = assessed[assessed["reason"] == ""].drop(columns=["reason", "detail"]).reset_index(drop=True)
    rejected = assessed[assessed["reason"] != ""].reset_index(drop=True)
    assert len(kept) + len(rejected) == len(rows), "filter lost or duplicated rows"
    return _typed(kept), _typed(rejected)


def _apply_clip_filter(assessed: pd.DataFrame, cfg: FilterParams, videos_root: str) -> pd.DataFrame:
    from tasks.inference.clip_score import ClipFrameScorer  # imports open_clip only when enabled

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
            fn_constructor_kwargs={"model_name": cfg.clip_model, "weights": cfg.clip_weights, "videos_root": videos_root},
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
    """Numeric columns to their schema's dtype, whatever Ray's to_pandas inferred: a batch whose
    rows all failed comes back as object columns mixing None and pd.NA, which astype refuses."""
    frame = frame.copy()
    for name, missing in NUMERIC_FIELDS.items():
        if name in frame:
            values = pd.to_numeric(frame[name].astype(object).where(frame[name].notna(), np.nan), errors="coerce").fillna(missing)
            frame[name] = values.astype("float64" if isinstance(missing, float) else "int64")
    frame["row_index"] = frame["row_index"].astype("int64")
    return frame


def filter_images(images_root: str, cfg: FilterParams) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every record of every source file of `images_root`: (kept, rejected), together each once."""
    sources = source_files(images_root)
    if not sources:
        return no_images()
    ensure_ray()
    assessed = (
        ray.data.from_pandas(pd.DataFrame({"source": sources}))
        .repartition(len(sources))
        .map_batches(
            on_record(assess_sources_batch), batch_format="pandas", batch_size=1, num_cpus=1,
            compute=ray.data.TaskPoolStrategy(size=cfg.num_workers),
            fn_kwargs={"sources_folder": images_folder(absolute(images_root)), "cfg": cfg},  # resolved once, here
        )
    )
    assessed = collect_with_progress(assessed, "filter_images", len(sources), "image sources read", count=lambda batch: batch["source"].nunique())
    # source-file order, then the file's own order: the same inputs give the same bytes
    order = {source: position for position, source in enumerate(sources)}
    assessed = assessed.reindex(columns=IMAGE_COLUMNS) if not assessed.empty else pd.DataFrame(columns=IMAGE_COLUMNS)
    assessed = reject_repeats(assessed.sort_values("source", key=lambda column: column.map(order), kind="stable"))
    kept = assessed[assessed["reason"] == ""].drop(columns=["reason", "detail"]).reset_index(drop=True)
    rejected = assessed[assessed["reason"] != ""].reset_index(drop=True)
    return kept, rejected


def no_images() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Empty kept and rejected tables of the image-text pairs, with their columns."""
    rejected = pd.DataFrame(columns=[*IMAGE_COLUMNS, "row_index"])
    return rejected.drop(columns=["reason", "detail"]), rejected


def report(kept: pd.DataFrame, rejected: pd.DataFrame, reasons: tuple[str, ...] = REASONS) -> dict:
    counts = rejected["reason"].value_counts()
    return {
        "input_rows": len(kept) + len(rejected),
        "kept": len(kept),
        "rejected": len(rejected),
        "reasons": {reason: int(counts.get(reason, 0)) for reason in reasons},
    }


def main(params: Params) -> None:
    require_weight_files(params, "filter")  # a bad clip_weights is found now, not after every video was probed
    rows = read_webvid_csv(params.data.csv)
    kept, rejected = filter_videos(rows, params.data.videos_root, params.filter, params.decode)
    summary = report(kept, rejected)
    # no image-text set (data.images ''): empty tables, so every declared output exists
    images_kept, images_rejected = filter_images(params.data.images, params.filter) if params.data.images else no_images()
    summary["images"] = report(images_kept, images_rejected, IMAGE_REASONS)
    # the outputs are written together beside the previous ones and swapped in as one folder:
    # a crash never pairs a new kept.parquet with an old rejected.parquet
    with atomic_folder(FILTERED) as staging:
        write_parquet(kept, staging / KEPT.name)
        write_parquet(rejected, staging / REJECTED.name)
        write_parquet(images_kept, staging / IMAGES_KEPT.name)
        write_parquet(images_rejected, staging / IMAGES_REJECTED.name)
        write_json(summary, staging / FILTER_REPORT.name)
    images = summary["images"]
    write_metrics({"kept": summary["kept"], "rejected": summary["rejected"], "images_kept": images["kept"], "images_rejected": images["rejected"]}, FILTER_METRICS)
    for what, counts in (("rows", summary), ("images", images)):
        if counts["input_rows"]:
            reasons = ", ".join(f"{reason} {count}" for reason, count in counts["reasons"].items() if count)
            print(f"filter: kept {counts['kept']} of {counts['input_rows']} {what}; rejected: {reasons or 'none'}")
