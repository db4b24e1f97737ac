"""What the decode stage does to one kept video and to one shard of them: pick the clip windows
inside the clean segment, decode them (decord, resized in the decoder, centre-cropped) and write
one fixed-shape uint8 clip shard."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import ray

from tasks.config.params import DecodeParams
from tasks.operations.ray_runtime import collect_with_progress, ensure_ray, on_record
from tasks.storage.clip_shards import shard_name
from tasks.storage.object_store import absolute, local_folder
from tasks.storage.shard_store import MANIFEST, STORED_KEYS, save_npy_shard, write_manifest
from tasks.storage.video_io import VideoError, center_crop, cover_size, open_reader, path_under, read_frames, relative_to_root, window_length


def clip_starts(segment_start: int, segment_end: int, stride: int, cfg: DecodeParams, keyframes: list[int] | None = None) -> list[int]:
    """First source frame of each clip: up to clips_per_video windows, non-overlapping when the
    segment is long enough, spread evenly from its start to its end.

    With the video's keyframes, a start moves back to the latest keyframe that does not overlap
    the previous clip: the decoder then seeks straight to it instead of decoding (and dropping)
    every frame from the keyframe before the start up to the start.
    """
    window = window_length(cfg.frames, stride)
    room = segment_end - segment_start - window  # the last start that still fits, relative
    if room < 0:
        return []
    count = max(1, min(cfg.clips_per_video, (segment_end - segment_start) // window))
    starts = [segment_start + int(round(offset)) for offset in np.linspace(0, room, count)]
    for k in range(1, len(starts)):
        free_from = starts[k - 1] + window  # first frame after the previous clip
        candidates = [key for key in keyframes or () if free_from <= key <= starts[k]]
        if candidates:
            starts[k] = max(candidates)
    return starts


def decode_video_clips(path: str, height: int, width: int, segment_start: int, segment_end: int, stride: int, cfg: DecodeParams) -> tuple[list[int], np.ndarray]:
    """One video's clips: (starts, (n_clips, frames, cfg.height, cfg.width, 3) uint8)."""
    decoded_h, decoded_w = cover_size(height, width, cfg.height, cfg.width)
    reader = open_reader(Path(path), decoded_h, decoded_w)
    starts = clip_starts(segment_start, segment_end, stride, cfg, keyframes=list(reader.get_key_indices()))
    if not starts:
        raise VideoError("too_short", f"segment [{segment_start}, {segment_end}) is shorter than one clip")
    indices = np.concatenate([start + stride * np.arange(cfg.frames) for start in starts])
    frames = center_crop(read_frames(reader, Path(path), indices, decoded_h, decoded_w), cfg.height, cfg.width)
    return starts, np.ascontiguousarray(frames).reshape(len(starts), cfg.frames, cfg.height, cfg.width, 3)


def decode_shard(batch: pd.DataFrame, cfg: DecodeParams, out_dir: str, videos_root: str, storage: str | None) -> pd.DataFrame:
    """Ray Data UDF: decode the videos of each shard in the batch, write the shard (into out_dir,
    or into the data storage: then a kind=shard row names its object), return its index rows
    (kind=clip) and failed videos (kind=rejected)."""
    rows = []
    for shard, videos in batch.groupby("shard", sort=True):
        clips = []
        for row in videos.itertuples():
            # kept.parquet's paths are relative to data.videos_root (a local copy, when it is in object storage)
            with local_folder(videos_root, [row.path]) as root:
                try:
                    starts, video_clips = decode_video_clips(str(path_under(root, row.path)), row.height, row.width, row.segment_start, row.segment_end, row.stride, cfg)
                except VideoError as error:
                    rows.append({"kind": "rejected", "video_id": row.videoid, "shard": shard, "reason": error.reason, "detail": relative_to_root(error.detail, root)})
                    continue
            for start, clip in zip(starts, video_clips):
                rows.append(
                    {
                        "kind": "clip",
                        "clip_id": f"{row.videoid}-{start:06d}",
                        "video_id": row.videoid,
                        "shard": shard,
                        "shard_row": len(clips),
                        "start_frame": start,
                        "stride": int(row.stride),
                        "source_fps": float(row.fps),
                        "caption": row.name,
                    }
                )
                clips.append(clip)
        if clips:
            rows += stored_shard_rows(save_npy_shard(np.stack(clips), out_dir, shard_name(int(shard)), storage), shard)
    return pd.DataFrame.from_records(rows, columns=INDEX_COLUMNS)


STORED_COLUMNS = list(STORED_KEYS)  # a kind=shard row's: where the data storage holds the shard
INDEX_COLUMNS = ["kind", "clip_id", "video_id", "shard", "shard_row", "start_frame", "stride", "source_fps", "caption", "reason", "detail", *STORED_COLUMNS]


def stored_shard_rows(entry: dict | None, shard: int) -> list[dict]:
    """The kind=shard result row of a shard written to the data storage (none for a local file)."""
    return [] if entry is None else [{"kind": "shard", "shard": shard, **entry}]


def decode_in_shards(rows: pd.DataFrame, decode_one_shard: Callable[..., pd.DataFrame], out_dir: Path, cfg: DecodeParams, result_columns: list[str],
                     label: str, unit: str, storage: str | None, count: Callable[[pd.DataFrame], int] = len, **shard_kwargs) -> pd.DataFrame:
    """Run `decode_one_shard(batch, cfg, out_dir, storage=storage, **shard_kwargs)` on each shard
    of `rows` (their `shard` column), one Ray task per shard on cfg.num_workers CPUs, writing into
    out_dir, a new or empty folder, or with a data storage into it and out_dir's shards.json;
    returns the shards' result rows, sorted by shard, kind and shard row."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.glob("clips-*.npy")) or (out_dir / MANIFEST).exists():
        raise ValueError(f"{out_dir}: already holds clip shards; decode into a new or empty folder, so no shard of an earlier run survives under a reused name")
    if not len(rows):
        if storage is not None:
            write_manifest(out_dir, storage, {})
        return pd.DataFrame(columns=result_columns)
    ensure_ray()
    shards = ray.data.from_pandas([group for _, group in rows.groupby("shard")]).map_batches(
        on_record(decode_one_shard), batch_format="pandas", batch_size=None, num_cpus=1,  # one block = one shard
        compute=ray.data.TaskPoolStrategy(size=cfg.num_workers),
        fn_kwargs={"cfg": cfg, "out_dir": str(out_dir.resolve()), "storage": storage, **shard_kwargs},  # absolute paths: Ray workers do not share our cwd
    )
    result = collect_with_progress(shards, label, len(rows), unit, count)
    stored = result[result["kind"] == "shard"]
    if storage is not None:
        write_manifest(out_dir, storage, {shard_name(int(row.shard)): {"object": row.object, "sha256": row.sha256, "bytes": int(row.bytes)} for row in stored.itertuples()})
    result = result[result["kind"] != "shard"]
    return result.loc[:, result_columns].sort_values(["shard", "kind", "shard_row"], kind="stable")


def decode_clips(kept: pd.DataFrame, cfg: DecodeParams, out_dir: Path, videos_root: str | Path, storage: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Decode all kept videos (their `path` relative to videos_root, as the filter writes it) into
    shards under out_dir, a new or empty folder (the decode stage builds one beside the previous
    clips and swaps it in), or into the data `storage` (tasks/storage/shard_store.py); returns
    (clip index, rejected videos)."""
    videos_per_shard = max(1, cfg.clips_per_shard // cfg.clips_per_video)
    kept = kept.reset_index(drop=True).assign(shard=lambda frame: frame.index // videos_per_shard)
    columns = ["shard", "videoid", "path", "height", "width", "fps", "segment_start", "segment_end", "stride", "name"]
    result = decode_in_shards(kept.loc[:, columns], decode_shard, out_dir, cfg, INDEX_COLUMNS, "decode", "videos decoded", storage,
                              count=lambda batch: batch["video_id"].nunique(), videos_root=absolute(videos_root))
    index = result[result["kind"] == "clip"].drop(columns=["kind", "reason", "detail", *STORED_COLUMNS]).reset_index(drop=True)
    rejected = result[result["kind"] == "rejected"].loc[:, ["video_id", "reason", "detail"]].reset_index(drop=True)
    for column in ("shard", "shard_row", "start_frame", "stride"):
        index[column] = index[column].astype("int64")
    return index, rejected
