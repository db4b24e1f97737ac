"""The image-text source of joint training: img2dataset's WebDataset shards and LAION-style
Parquet tables of images, filtered record by record (nothing lost, every rejection named), then
decoded into one-frame clips of the videos' size. The images are real frames of the fixture
videos, encoded as JPEG and PNG."""

import io
import tarfile
from pathlib import Path

import decord
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tasks.config.params import DecodeParams, FilterParams
from tasks.preprocessing import synthetic
from tasks.preprocessing.image_clips import decode_images, image_frame
from tasks.stages.filter import filter_images
from tasks.storage.image_text import ImageSample, ImageTextFormatError, list_records, source_files, write_webdataset_shard
from tasks.storage.video_io import center_crop, cover_size

CAPTION = "a frame of a real video"


def real_frames(fixture_videos: Path, count: int) -> list[np.ndarray]:
    """`count` different frames (h, w, 3) of the fixture videos, at their own sizes."""
    frames = []
    for name in ("h264_340x256_28fps.mp4", "pancake_426x240_30fps.mkv"):
        reader = decord.VideoReader(str(fixture_videos / name), num_threads=1)
        frames += list(reader.get_batch(list(range(0, len(reader), max(1, len(reader) // count)))[: count // 2 + 1]).asnumpy())
    return frames[:count]


def encoded(frame: np.ndarray, kind: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format=kind)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def image_set(fixture_videos, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A data.images folder holding both formats, and the reason expected for each record ('' = kept)."""
    root = tmp_path_factory.mktemp("images")
    frames = real_frames(fixture_videos, 8)
    good = encoded(frames[0])
    samples = [
        ImageSample("000000000", good, ".jpg", CAPTION),
        ImageSample("000000001", encoded(frames[1], "PNG"), ".png", CAPTION),
        ImageSample("000000002", good[: len(good) // 2], ".jpg", CAPTION),  # a download cut short
        ImageSample("000000003", encoded(frames[2]), ".jpg", None),  # no .txt member
        ImageSample("000000004", good, ".jpg", "another caption, same bytes"),  # a re-post of 000000000
        ImageSample("000000005", encoded(frames[3][:40, :40]), ".jpg", CAPTION),  # 40 px < min_short_side
        ImageSample("000000006", encoded(frames[4][:70]), ".jpg", CAPTION),  # 340 x 70: far from any clip aspect ratio
        ImageSample("000000007", encoded(frames[5]), ".jpg", "two words"),
    ]
    write_webdataset_shard(root / "00000.tar", samples)
    # img2dataset records a failed download in the shard's Parquet and writes no image for it
    metadata = pd.read_parquet(root / "00000.parquet")
    failed = pd.DataFrame([{"key": "000000008", "url": "https://example.com/gone.jpg", "caption": CAPTION, "status": "failed_to_download",
                            "error_message": "HTTP Error 404: Not Found", "sha256": None}])
    pd.concat([metadata, failed], ignore_index=True).to_parquet(root / "00000.parquet", index=False)
    with tarfile.open(root / "00000.tar", "a") as archive:  # its .json only, as img2dataset leaves it
        data = b'{"key": "000000008", "status": "failed_to_download"}'
        info = tarfile.TarInfo("000000008.json")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    # img2dataset's files layout: 00001.parquet (LAION's TEXT and URL columns) beside 00001/{key}.jpg
    (root / "00001").mkdir()
    for key, frame in (("000010000", frames[6]), ("000010001", frames[7])):
        (root / "00001" / f"{key}.jpg").write_bytes(encoded(frame))
    pd.DataFrame({"key": ["000010000", "000010001", "000010002", "000010003"], "URL": ["https://example.com/a.jpg"] * 4,
                  "TEXT": [CAPTION, CAPTION, CAPTION, ""]}).to_parquet(root / "00001.parquet", index=False)
    (root / "00001" / "000010003.jpg").write_bytes(encoded(frames[6][::-1]))
    # a plain table of paths (Parquet with path + caption), one pointing out of data.images
    pd.DataFrame({"path": ["00001/000010000.jpg", "../outside.jpg"], "caption": ["the same file listed twice", CAPTION]}).to_parquet(root / "paths.parquet", index=False)
    # a shard that is not a tar at all
    (root / "broken.tar").write_bytes(b"not a tar archive" * 10)
    expected = {
        "000000000": "", "000000001": "", "000000002": "undecodable", "000000003": "caption_empty", "000000004": "duplicate_content",
        "000000005": "resolution", "000000006": "aspect_ratio", "000000007": "caption_too_short", "000000008": "download_failed",
        "000010000": "", "000010001": "", "000010002": "missing_file", "000010003": "caption_empty",
        "paths/000000000": "duplicate_content", "paths/000000001": "path_outside_root", "broken.tar": "unreadable_source",
    }
    return root, expected


def test_every_record_of_both_formats_is_kept_or_rejected_with_its_reason(image_set, ray_session):
    root, expected = image_set
    assert source_files(root) == ["00000.tar", "00001.parquet", "broken.tar", "paths.parquet"]  # 00000.parquet is the tar's metadata
    kept, rejected = filter_images(str(root), FilterParams())
    outcome = {**dict.fromkeys(kept["key"], ""), **dict(zip(rejected["key"], rejected["reason"]))}
    assert len(kept) + len(rejected) == len(outcome) == len(expected)  # each record once: nothing lost, nothing twice
    assert outcome == expected
    details = dict(zip(rejected["key"], rejected["detail"]))
    assert "HTTP Error 404" in details["000000008"] and "000000000" in details["000000004"]  # the reason says what and where
    assert details["000000003"].startswith("00000.tar:000000003") and "broken.tar" in details["broken.tar"]
    assert kept.set_index("key").loc["000000001", ["height", "width", "caption"]].tolist() == [256, 340, CAPTION]


def test_a_laion_metadata_table_without_images_is_refused_with_what_to_do(tmp_path):
    pd.DataFrame({"URL": ["https://example.com/a.jpg"], "TEXT": [CAPTION]}).to_parquet(tmp_path / "part-00000.parquet", index=False)
    with pytest.raises(ImageTextFormatError, match="fetch them with img2dataset"):
        list_records(tmp_path, "part-00000.parquet")
    with pytest.raises(FileNotFoundError, match="data.images .*: not found"):
        source_files(tmp_path / "absent")
    (tmp_path / "jpegs").mkdir()
    (tmp_path / "jpegs" / "a.jpg").write_bytes(b"")
    with pytest.raises(ImageTextFormatError, match="no .tar or .parquet file in it"):  # a folder of loose images: the wrong path
        source_files(tmp_path / "jpegs")
    (tmp_path / "none").mkdir()  # an empty folder: no images, the videos alone
    kept, rejected = filter_images(str(tmp_path / "none"), FilterParams())
    assert kept.empty and rejected.empty and "key" in kept and "reason" in rejected


def test_kept_images_decode_to_one_frame_clips_as_the_videos_frames_are_cropped(image_set, ray_session, tmp_path):
    root, _ = image_set
    kept, _ = filter_images(str(root), FilterParams())
    cfg = DecodeParams(clips_per_shard=2)
    index, rejected = decode_images(kept, cfg, tmp_path / "clips", root)
    assert rejected.empty and index["clip_id"].tolist() == kept["key"].tolist() and index["caption"].tolist() == kept["caption"].tolist()
    assert index["shard"].tolist() == [0, 0, 1, 1] and index["shard_row"].tolist() == [0, 1, 0, 1]
    first = np.load(tmp_path / "clips" / "clips-00000.npy")
    assert first.shape == (2, 1, cfg.height, cfg.width, 3) and first.dtype == np.uint8
    source = np.asarray(Image.open(root / "00001" / "000010000.jpg").convert("RGB"))
    row = index.index[index["clip_id"] == "000010000"][0]
    clip = np.load(tmp_path / "clips" / f"clips-{index.loc[row, 'shard']:05d}.npy")[index.loc[row, "shard_row"]]
    height, width = cover_size(*source.shape[:2], cfg.height, cfg.width)
    reference = center_crop(np.asarray(Image.fromarray(source).resize((width, height), Image.Resampling.BICUBIC, reducing_gap=3.0)), cfg.height, cfg.width)
    np.testing.assert_array_equal(clip[0], reference)
    np.testing.assert_array_equal(image_frame(source, cfg)[0], reference)


def test_an_image_that_changed_since_the_filter_is_rejected_at_decode_and_the_rest_kept(image_set, ray_session, tmp_path):
    root, _ = image_set
    kept, _ = filter_images(str(root), FilterParams())
    changed = kept.copy()
    changed.loc[changed["key"] == "000010001", "member"] = "00001/vanished.jpg"
    index, rejected = decode_images(changed, DecodeParams(), tmp_path / "clips", root)
    assert rejected[["clip_id", "reason"]].values.tolist() == [["000010001", "missing_file"]]
    assert sorted(index["clip_id"]) == sorted(set(kept["key"]) - {"000010001"})


def test_the_synthetic_image_set_is_byte_identical_run_to_run_and_its_bad_samples_are_rejected(tmp_path, ray_session):
    for folder in ("a", "b"):
        synthetic.generate_images(tmp_path / folder, num_images=16, height=64, width=64, seed=0)
    assert (tmp_path / "a" / "00000.tar").read_bytes() == (tmp_path / "b" / "00000.tar").read_bytes()
    kept, rejected = filter_images(str(tmp_path / "a"), FilterParams())
    assert len(kept) == 13 and dict(zip(rejected["key"], rejected["reason"])) == {
        f"{synthetic.TRUNCATED_IMAGE:09d}": "undecodable", f"{synthetic.UNCAPTIONED_IMAGE:09d}": "caption_empty", f"{synthetic.TINY_IMAGE:09d}": "resolution"}
    assert kept["caption"].str.fullmatch(r"a \w+ \w+ on a \w+ background").all()
