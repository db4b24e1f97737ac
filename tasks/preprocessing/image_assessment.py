"""What the filter stage learns about the image-text pairs of one source file (a WebDataset
shard or a Parquet table, tasks/storage/image_text.py): caption, download status, decodability,
size, aspect ratio and content hash; `reason` names the first failed check, '' when it passes.

Checks that compare records with each other (repeated keys, identical images) stay in the stage.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from tasks.config.params import FilterParams
from tasks.storage.image_text import RECORD_COLUMNS, ImageTextFormatError, SourceReader, content_sha256, decode_image, list_records, source_with_metadata
from tasks.storage.object_store import local_folder
from tasks.storage.video_io import VideoError

IMAGE_REASONS = (
    "unreadable_source",  # a shard that cannot be listed (truncated download): one row for the whole file
    "download_failed",  # img2dataset's status is not success: no image was fetched
    "caption_empty",
    "caption_too_short",
    "duplicate_key",
    "missing_file",
    "path_outside_root",
    "unreadable",
    "undecodable",
    "resolution",
    "aspect_ratio",
    "duplicate_content",
    "internal_error",
)

# One schema for every assessed record, whatever happened to it, so Ray blocks concatenate.
IMAGE_COLUMNS = [*RECORD_COLUMNS, "height", "width", "content_sha256", "reason", "detail"]


def assess_source(sources_folder: str, source: str, cfg: FilterParams) -> pd.DataFrame:
    """One row per record of `source` (IMAGE_COLUMNS), named relative to `sources_folder`
    (image_text.images_folder of data.images); read from a local copy of the source when that
    folder is in object storage."""
    with local_folder(sources_folder, source_with_metadata(source)) as folder:
        return _assess_source(folder, source, cfg)


def _assess_source(images_root: str, source: str, cfg: FilterParams) -> pd.DataFrame:
    try:
        records = list_records(images_root, source)
    except ImageTextFormatError as error:
        if not source.endswith(".tar"):
            raise  # a Parquet without captions or image paths is the wrong kind of file: the user must act
        return pd.DataFrame([{**dict.fromkeys(RECORD_COLUMNS, ""), "key": source, "source": source, "height": -1, "width": -1,
                              "content_sha256": "", "reason": "unreadable_source", "detail": str(error)}], columns=IMAGE_COLUMNS)
    try:
        reader = SourceReader(images_root, source)
    except Exception as error:  # listed, yet cannot be opened again: every record is rejected, none lost
        detail = f"{source}: {type(error).__name__}: {error}"
        return records.assign(height=-1, width=-1, content_sha256="", reason="unreadable", detail=detail).loc[:, IMAGE_COLUMNS]
    assessed = []
    with reader:
        for record in records.to_dict(orient="records"):
            record.update(height=-1, width=-1, content_sha256="", reason="", detail="")
            try:
                _assess(record, reader, cfg)
            except VideoError as error:
                record.update(reason=error.reason, detail=error.detail)
            except Exception as error:  # a bug or an unforeseen file: reject the record, keep the stage going
                record.update(reason="internal_error", detail=f"{source}:{record['member']}: {type(error).__name__}: {error}")
            assessed.append(record)
    return pd.DataFrame.from_records(assessed, columns=IMAGE_COLUMNS)


def _assess(record: dict, reader: SourceReader, cfg: FilterParams) -> None:
    where = f"{record['source']}:{record['key']}"
    if record["status"] not in ("success", ""):
        raise VideoError("download_failed", f"{where}: img2dataset status {record['status']!r} ({record['error_message'] or 'no message'})")
    caption = record["caption"].strip() if isinstance(record["caption"], str) else ""  # None (no .txt) reads back as NaN
    if not caption:
        raise VideoError("caption_empty", f"{where}: no caption (no .txt member, or an empty caption column)")
    if len(caption.split()) < cfg.min_caption_words:
        raise VideoError("caption_too_short", f"{where}: {caption!r} has fewer than {cfg.min_caption_words} words")
    if not record["member"]:
        raise VideoError("missing_file", f"{where}: no image (no .jpg/.png/.webp member, or no file for the row)")
    data = reader.read(record["member"])
    image = decode_image(data, f"{record['source']}:{record['member']}")
    record["height"], record["width"] = height, width = image.shape[:2]
    if min(height, width) < cfg.min_short_side:
        raise VideoError("resolution", f"{where}: {width}x{height}, short side < {cfg.min_short_side}")
    if max(height, width) / min(height, width) > cfg.max_aspect_ratio:
        raise VideoError("aspect_ratio", f"{where}: {width}x{height}, aspect ratio > {cfg.max_aspect_ratio}")
    record["content_sha256"] = content_sha256(data)


def assess_sources_batch(batch: pd.DataFrame, sources_folder: str, cfg: FilterParams) -> pd.DataFrame:
    return pd.concat([assess_source(sources_folder, source, cfg) for source in batch["source"]], ignore_index=True)


def reject_repeats(assessed: pd.DataFrame) -> pd.DataFrame:
    """Across sources: a key seen before, and an image whose bytes an earlier record has, are
    rejected (the first is kept); `assessed` is in source-file order."""
    assessed = assessed.reset_index(drop=True).copy()
    passing = assessed["reason"] == ""
    repeated_key = passing & assessed["key"].where(passing).duplicated(keep="first")
    assessed.loc[repeated_key, "reason"] = "duplicate_key"
    assessed.loc[repeated_key, "detail"] = "an earlier record has the key " + assessed.loc[repeated_key, "key"]
    passing = assessed["reason"] == ""
    copies = passing & assessed["content_sha256"].where(passing).duplicated(keep="first")
    if copies.any():
        first = assessed[passing].drop_duplicates("content_sha256").set_index("content_sha256")["key"]
        assessed.loc[copies, "reason"] = "duplicate_content"
        assessed.loc[copies, "detail"] = "same bytes as key " + assessed.loc[copies, "content_sha256"].map(first)
    assessed["height"] = assessed["height"].astype("int64")
    assessed["width"] = assessed["width"].astype("int64")
    assessed["row_index"] = np.arange(len(assessed), dtype="int64")
    return assessed
