"""The raw videos and image-text shards in object storage (`data.videos_root` and `data.images`
as `s3://...` URIs), against a real S3 endpoint on 127.0.0.1 (moto's server): the filter's and
decode's Ray tasks fetch each file they read into a temporary folder on their own node, so on a
cluster only the driver needs the checkout. What they write is what they write from the disk,
byte for byte: the same kept and rejected rows (rejection details name files relative to the
root), the same clip shards, the same image clips."""

import io
import uuid
from pathlib import Path

import boto3
import numpy as np
import pandas as pd
import pytest

from tasks.config.params import FilterParams
from tasks.preprocessing.clips import decode_clips
from tasks.preprocessing.image_clips import decode_images
from tasks.stages.filter import filter_images, filter_videos
from tasks.storage.image_text import ImageTextFormatError, source_files
from tasks.storage.object_store import local_folder
from tests.tasks.conftest import FIXTURE_DECODE
from tests.tasks.test_filter_decode import fixture_csv


def upload_folder(folder: Path, location: str) -> None:
    bucket, prefix = location.removeprefix("s3://").split("/", 1)
    s3 = boto3.client("s3")
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")


def parquet_bytes(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.reset_index(drop=True).to_parquet(buffer, index=False)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def raw_in_bucket(fixture_videos, clips_dir, object_store) -> dict[str, str]:
    """The fixture videos and the session's synthetic image shards, copied into the bucket."""
    root = f"{object_store['bucket']}/raw-{uuid.uuid4().hex[:8]}"
    upload_folder(fixture_videos, f"{root}/videos")
    upload_folder(clips_dir.parent / "raw_images", f"{root}/images")
    return {"videos": f"{root}/videos", "images": f"{root}/images"}


def test_filter_and_decode_read_the_videos_from_the_bucket_as_from_the_disk(fixture_videos, fixture_filtered, clips_dir, raw_in_bucket, tmp_path):
    kept, rejected = filter_videos(fixture_csv(fixture_videos), raw_in_bucket["videos"], FilterParams(), FIXTURE_DECODE)
    local_kept, local_rejected = fixture_filtered
    assert parquet_bytes(kept) == parquet_bytes(local_kept) and len(kept) == 3
    assert parquet_bytes(rejected) == parquet_bytes(local_rejected)  # every reason and detail, the missing and the escaping row too
    details = dict(zip(rejected["videoid"], rejected["detail"]))
    assert details["not_there"] == "not_there.mp4 does not exist" and "versvideo-fetched" not in "".join(details.values())

    index, decode_rejected = decode_clips(kept, FIXTURE_DECODE, tmp_path / "clips", raw_in_bucket["videos"])
    pd.testing.assert_frame_equal(index, pd.read_parquet(clips_dir / "index.parquet"))
    assert decode_rejected.empty
    for shard in sorted(clips_dir.glob("clips-*.npy")):
        assert (tmp_path / "clips" / shard.name).read_bytes() == shard.read_bytes()


def test_filter_and_decode_read_the_image_shards_from_the_bucket_as_from_the_disk(clips_dir, raw_in_bucket, tmp_path):
    local_root = clips_dir.parent / "raw_images"
    assert source_files(raw_in_bucket["images"]) == source_files(local_root) == ["00000.tar"]
    kept, rejected = filter_images(raw_in_bucket["images"], FilterParams())
    local_kept, local_rejected = filter_images(str(local_root), FilterParams())
    assert parquet_bytes(kept) == parquet_bytes(local_kept) and parquet_bytes(rejected) == parquet_bytes(local_rejected) and len(kept) == 4
    index, _ = decode_images(kept, FIXTURE_DECODE, tmp_path / "images", raw_in_bucket["images"])
    pd.testing.assert_frame_equal(index, pd.read_parquet(clips_dir / "images" / "index.parquet"))
    for shard in sorted((clips_dir / "images").glob("clips-*.npy")):
        np.testing.assert_array_equal(np.load(tmp_path / "images" / shard.name), np.load(shard))


def test_a_bucket_of_image_tables_is_refused_and_no_fetch_leaves_the_root(object_store, tmp_path):
    root = f"{object_store['bucket']}/tables-{uuid.uuid4().hex[:8]}"
    bucket, prefix = root.removeprefix("s3://").split("/", 1)
    pd.DataFrame({"caption": ["a red circle moves left"], "path": ["a.png"]}).to_parquet(tmp_path / "t.parquet")
    boto3.client("s3").upload_file(str(tmp_path / "t.parquet"), bucket, f"{prefix}/t.parquet")
    with pytest.raises(ImageTextFormatError, match=r"t.parquet .* is a Parquet table pointing at image files; in object storage data.images must be WebDataset"):
        source_files(root)
    # a name that climbs out of the root is not fetched (the reader then rejects it as path_outside_root)
    with local_folder(root, ["../outside.parquet", "t.parquet", "missing.mp4"]) as folder:
        assert sorted(path.name for path in Path(folder).rglob("*")) == ["t.parquet"]
    assert not Path(folder).exists()  # removed on leaving
