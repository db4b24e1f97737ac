"""What the decode stage does to the kept image-text pairs: each image becomes a one-frame clip
(1, height, width, 3) uint8, resized so its short side covers the clip size and centre-cropped as
the videos' frames are, written in shards of the videos' kind (tasks/storage/clip_shards.py). The
latent cache and the UNet's image stream then read them as they read the videos, with t = 1."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from tasks.config.params import DecodeParams
from tasks.preprocessing.clips import STORED_COLUMNS, decode_in_shards, stored_shard_rows
from tasks.storage.clip_shards import shard_name
from tasks.storage.image_text import SourceReader, decode_image, images_folder, source_with_metadata
from tasks.storage.object_store import absolute, local_folder
from tasks.storage.shard_store import save_npy_shard
from tasks.storage.video_io import VideoError, center_crop, cover_size

IMAGE_INDEX_COLUMNS = ["clip_id", "video_id", "shard", "shard_row", "source", "member", "caption"]
_RESULT_COLUMNS = ["kind", *IMAGE_INDEX_COLUMNS, "reason", "detail", *STORED_COLUMNS]


def image_frame(image: np.ndarray, cfg: DecodeParams) -> np.ndarray:
    """(h, w, 3) uint8 -> (1, cfg.height, cfg.width, 3): aspect-preserving bicubic resize to
    cover the clip size, then the centre crop (the videos' resize-then-crop)."""
    from PIL import Image

    height, width = cover_size(image.shape[0], image.shape[1], cfg.height, cfg.width)
    resized = np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC, reducing_gap=3.0))
    return np.ascontiguousarray(center_crop(resized, cfg.height, cfg.width))[None]


def decode_image_shard(batch: pd.DataFrame, cfg: DecodeParams, out_dir: str, sources_folder: str, storage: str | None) -> pd.DataFrame:
    """Ray Data UDF: the images of one shard (each source file opened once), written as one clip
    shard (into out_dir, or into the data storage: then a kind=shard row names its object);
    returns its index rows (kind=clip) and the images that no longer decode (kind=rejected: the
    file changed since the filter read it)."""
    rows, frames = [], []
    shard = int(batch["shard"].iloc[0])
    for source, records in batch.groupby("source", sort=False):
        with local_folder(sources_folder, source_with_metadata(str(source))) as folder, SourceReader(folder, str(source)) as reader:
            for record in records.itertuples():
                entry = {"clip_id": record.key, "video_id": record.key, "shard": shard, "source": source, "member": record.member, "caption": record.caption}
                try:
                    image = decode_image(reader.read(record.member), f"{source}:{record.member}")
                except VideoError as error:
                    rows.append({**entry, "kind": "rejected", "shard_row": -1, "reason": error.reason, "detail": error.detail})
                    continue
                rows.append({**entry, "kind": "clip", "shard_row": len(frames)})
                frames.append(image_frame(image, cfg))
    if frames:
        rows += stored_shard_rows(save_npy_shard(np.stack(frames), out_dir, shard_name(shard), storage), shard)
    return pd.DataFrame.from_records(rows, columns=_RESULT_COLUMNS)


def decode_images(kept: pd.DataFrame, cfg: DecodeParams, out_dir: Path, images_root: str | Path, storage: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every kept image (images_kept.parquet's rows, in their order) into one-frame clip shards of
    cfg.clips_per_shard under out_dir, a new or empty folder, or into the data `storage`; returns
    (index, rejected)."""
    kept = kept.reset_index(drop=True).assign(shard=lambda frame: frame.index // cfg.clips_per_shard)
    result = decode_in_shards(kept.loc[:, ["shard", "key", "source", "member", "caption"]], decode_image_shard, out_dir, cfg, _RESULT_COLUMNS,
                              "decode_images", "images decoded", storage, sources_folder=images_folder(absolute(images_root)))  # resolved once, here
    index = result[result["kind"] == "clip"].loc[:, IMAGE_INDEX_COLUMNS].reset_index(drop=True)
    rejected = result[result["kind"] == "rejected"].loc[:, ["clip_id", "source", "member", "reason", "detail"]].reset_index(drop=True)
    for column in ("shard", "shard_row"):
        index[column] = index[column].astype("int64")
    return index, rejected
