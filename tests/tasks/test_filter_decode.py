"""filter + decode on the real fixture videos and on synthetic videos built to fail one check."""

import json
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks.config.params import DecodeParams, FilterParams
from tasks.operations import ray_runtime
from tasks.preprocessing.assessment import NUMERIC_FIELDS, assess_video
from tasks.preprocessing.clips import clip_starts, decode_clips, decode_video_clips
from tasks.preprocessing import synthetic
from tasks.preprocessing.synthetic import render
from tasks.stages.filter import _typed, filter_videos, report
from tasks.storage.atomic import write_parquet
from tasks.storage.previews import write_mp4
from tasks.storage.video_io import VideoError, center_crop, cover_size, resize_frames, video_path

GOOD = ["h264_340x256_28fps.mp4", "mpeg4_320x240_25fps.avi", "pancake_426x240_30fps.mkv"]
EXPECTED_REASONS = {
    "rotated90_3frames.mov": "too_short",
    "corrupt_frames_1280x720.mp4": "undecodable",
    "empty.mp4": "unreadable",
    "not_there": "missing_file",
    "escape": "path_outside_root",
}
CAPTION = "a short real video clip"


def fixture_csv(videos: Path) -> pd.DataFrame:
    rows = [
        {"videoid": path.name, "contentUrl": "", "duration": "PT00H00M10S", "page_dir": ".", "name": CAPTION}
        for path in sorted(videos.iterdir())
        if path.suffix != ".md"
    ]
    rows.append({"videoid": "not_there", "contentUrl": "", "duration": "PT00H00M05S", "page_dir": ".", "name": CAPTION})
    rows.append({"videoid": "escape", "contentUrl": "", "duration": "PT00H00M05S", "page_dir": "../../etc", "name": CAPTION})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def fixture_run(fixture_videos, ray_session, tmp_path_factory):
    rows = fixture_csv(fixture_videos)
    decode_cfg = DecodeParams()
    kept, rejected = filter_videos(rows, str(fixture_videos), FilterParams(), decode_cfg)
    out = tmp_path_factory.mktemp("clips")
    index, decode_rejected = decode_clips(kept, decode_cfg, out, fixture_videos)
    return rows, kept, rejected, index, decode_rejected, out, decode_cfg


def test_every_fixture_row_is_kept_or_rejected_with_its_specific_reason(fixture_run):
    rows, kept, rejected, *_ = fixture_run
    assert sorted(kept["videoid"]) == GOOD
    reasons = dict(zip(rejected["videoid"], rejected["reason"]))
    assert reasons == EXPECTED_REASONS
    assert sorted([*kept["row_index"], *rejected["row_index"]]) == list(range(len(rows)))
    assert all(rejected["detail"].str.len() > 0)
    summary = report(kept, rejected)
    assert summary["input_rows"] == len(rows) and summary["reasons"]["undecodable"] == 1


def test_another_checkout_of_the_same_videos_gives_byte_identical_filter_and_decode_outputs(fixture_run, fixture_videos, tmp_path):
    """DVC hashes kept.parquet, rejected.parquet and the clip shards: with absolute paths in them
    a clone elsewhere (or a teammate's `dvc pull`) had other hashes and pointed into our disk.
    Paths and messages are relative to data.videos_root, which decode joins back."""
    rows, kept, rejected, index, _, out, decode_cfg = fixture_run
    elsewhere = tmp_path / "another" / "checkout" / "videos"
    shutil.copytree(fixture_videos, elsewhere)
    kept_there, rejected_there = filter_videos(rows, str(elsewhere), FilterParams(), decode_cfg)
    index_there, _ = decode_clips(kept_there, decode_cfg, tmp_path / "clips", elsewhere)
    assert kept["path"].tolist() == sorted(GOOD)  # as listed: {page_dir}/{videoid}, page_dir "."
    for name, here, there in (("kept", kept, kept_there), ("rejected", rejected, rejected_there), ("index", index, index_there)):
        write_parquet(here, tmp_path / f"{name}-here.parquet")
        write_parquet(there, tmp_path / f"{name}-there.parquet")
        assert (tmp_path / f"{name}-here.parquet").read_bytes() == (tmp_path / f"{name}-there.parquet").read_bytes(), name
    assert not rejected["detail"].str.contains(str(fixture_videos)).any()
    assert "not_there.mp4 does not exist" in rejected.set_index("videoid").loc["not_there", "detail"]
    for shard in index["shard"].unique():
        shard_file = f"clips-{int(shard):05d}.npy"
        assert (out / shard_file).read_bytes() == (tmp_path / "clips" / shard_file).read_bytes()


def test_probe_metadata_of_kept_fixtures(fixture_run):
    kept = fixture_run[1].set_index("videoid")
    assert kept.loc["pancake_426x240_30fps.mkv", ["num_frames", "width", "height"]].tolist() == [310, 426, 240]
    assert kept.loc["mpeg4_320x240_25fps.avi", "codec"] == "mpeg4"
    assert kept.loc["mpeg4_320x240_25fps.avi", "container"] == "avi"
    assert kept.loc["h264_340x256_28fps.mp4", "fps"] == 28.0
    # 8 fps target: stride round(28/8) = 4 (banker's rounding of 3.5), round(25/8) = 3, round(30/8) = 4
    assert kept["stride"].to_dict() == {"h264_340x256_28fps.mp4": 4, "mpeg4_320x240_25fps.avi": 3, "pancake_426x240_30fps.mkv": 4}
    assert (kept["motion_score"] > 0.002).all()
    # The 28 fps MP4 jumps into a frozen, smeared stretch (frames ~232-264) and back out: two
    # discontinuities; the filter keeps the clean segment before them.
    assert kept["num_cuts"].to_dict() == {"h264_340x256_28fps.mp4": 2, "mpeg4_320x240_25fps.avi": 0, "pancake_426x240_30fps.mkv": 0}
    assert kept.loc["h264_340x256_28fps.mp4", ["segment_start", "segment_end"]].tolist() == [0, 229]


def test_decoded_clips_have_the_exact_shape_and_the_source_frames(fixture_run, fixture_videos):
    _, kept, _, index, decode_rejected, out, cfg = fixture_run
    assert decode_rejected.empty
    assert sorted(index["video_id"].unique()) == GOOD
    shards = {shard: np.load(out / f"clips-{shard:05d}.npy", mmap_mode="r") for shard in index["shard"].unique()}
    for shard in shards.values():
        assert shard.dtype == np.uint8 and shard.shape[1:] == (cfg.frames, cfg.height, cfg.width, 3)
    assert sum(len(shard) for shard in shards.values()) == len(index)
    # The first clip of the AVI equals its source frames (start + k * stride), decoded one by one
    # with PyAV at full size and resized/cropped independently.
    import av

    row = index[index["video_id"] == "mpeg4_320x240_25fps.avi"].iloc[0]
    with av.open(str(fixture_videos / "mpeg4_320x240_25fps.avi")) as container:
        frames = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])
    wanted = frames[row.start_frame + row.stride * np.arange(cfg.frames)]
    expected = center_crop(resize_frames(wanted, *cover_size(240, 320, cfg.height, cfg.width)), cfg.height, cfg.width)
    clip = shards[row.shard][row.shard_row].astype(np.int16)
    assert np.abs(clip - expected).mean() < 4.0  # decoder-side vs torch resize: a few grey levels
    assert np.abs(clip - np.roll(expected, 1, axis=0)).mean() > 2 * np.abs(clip - expected).mean()


def test_clip_starts_spread_over_the_segment():
    cfg = DecodeParams(frames=8, clips_per_video=3)
    assert clip_starts(0, 100, 4, cfg) == [0, 36, 71]  # window 29, last start 71: 0, 35.5 -> 36, 71
    assert clip_starts(10, 39, 4, cfg) == [10]  # exactly one window
    assert clip_starts(10, 38, 4, cfg) == []
    assert clip_starts(0, 40, 1, DecodeParams(frames=8, clips_per_video=2)) == [0, 32]


def test_clip_starts_move_back_to_keyframes_without_overlapping():
    cfg = DecodeParams(frames=16, clips_per_video=2)  # window 61 at stride 4
    assert clip_starts(0, 309, 4, cfg) == [0, 248]
    # The MKV fixture's keyframes: 248 moves back to 150 (decoding starts there, not at 150 -> 248)
    assert clip_starts(0, 309, 4, cfg, keyframes=[0, 150, 300]) == [0, 150]
    # 40 would overlap the first clip (frames 0-60) and 300 would not fit: nothing moves
    assert clip_starts(0, 309, 4, cfg, keyframes=[0, 40, 300]) == [0, 248]


def synthetic_video(folder: Path, name: str, *, static=False, cut_at=None, frames=48) -> dict:
    video, _ = render(80, 112, frames, np.random.default_rng(len(name)), static=static, cut_at=cut_at)
    write_mp4(video, folder / f"{name}.mp4", fps=24)
    return {"videoid": name, "contentUrl": "", "duration": "PT00H00M02S", "page_dir": ".", "name": f"{name} shape video clip"}


def test_filter_reasons_on_built_videos(tmp_path, ray_session):
    rows = [
        synthetic_video(tmp_path, "moving"),
        synthetic_video(tmp_path, "still", static=True),
        synthetic_video(tmp_path, "cut_late", cut_at=36),  # clean part [0, 36) holds a clip
        # 42 frames at stride 3 = 14 samples; a cut at frame 21 leaves 7 + 7 < 8 clean samples
        synthetic_video(tmp_path, "cut_middle", cut_at=21, frames=42),
    ]
    rows.append({**rows[0], "name": "two"})  # too short a caption...
    rows.append({**rows[0], "name": "moving shape again, re-crawled"})  # ...but a later row of the same id wins
    (tmp_path / "copy.mp4").write_bytes((tmp_path / "moving.mp4").read_bytes())
    rows.append({**rows[0], "videoid": "copy", "name": "the same file under another id"})
    frame = pd.DataFrame(rows)
    decode = DecodeParams(frames=8, fps=8.0)

    kept, rejected = filter_videos(frame, str(tmp_path), FilterParams(), decode)
    reasons = dict(zip(rejected["row_index"], rejected["reason"]))
    assert reasons == {0: "duplicate_videoid", 1: "static", 3: "scene_cut", 4: "duplicate_videoid", 6: "duplicate_content"}
    assert "moving" in rejected.loc[rejected["reason"] == "duplicate_content", "detail"].iloc[0]
    late = kept.set_index("videoid").loc["cut_late"]
    assert (late["num_cuts"], late["segment_start"], late["segment_end"]) == (1, 0, 34)  # frames 0..33 at stride 3
    assert kept.set_index("videoid").loc["moving", "name"] == "moving shape again, re-crawled"

    strict, strict_rejected = filter_videos(frame, str(tmp_path), FilterParams(scene_cut_policy="reject"), decode)
    assert "cut_late" in set(strict_rejected.loc[strict_rejected["reason"] == "scene_cut", "videoid"])


def test_stage_commands_exit_0_on_the_fixtures(fixture_videos, tmp_path):
    """The acceptance run through the real command line, as dvc.yaml calls it."""
    fixture_csv(fixture_videos).to_csv(tmp_path / "fixtures.csv", index=False)
    synthetic.generate_images(tmp_path / "images", num_images=16, height=64, width=64, seed=0)
    (tmp_path / "params.yaml").write_text(
        f"preset: smoke\ndata:\n  csv: fixtures.csv\n  videos_root: {fixture_videos}\n  images: images\n"
    )
    for stage in ("filter", "decode"):
        done = subprocess.run([sys.executable, "-m", "flows.cli", "stage", stage], cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "data/filtered/report.json").read_text())
    assert (summary["input_rows"], summary["kept"]) == (8, 3)
    clips = json.loads((tmp_path / "data/clips/report.json").read_text())
    assert clips["clip_shape"] == [8, 64, 64, 3] and clips["videos_decoded"] == 3
    assert summary["images"]["kept"] == 13 and summary["images"]["input_rows"] == 16
    images = json.loads((tmp_path / "data/clips/images/report.json").read_text())
    assert images["clip_shape"] == [1, 64, 64, 3] and images["clips"] == 13
    assert not list((tmp_path / "data").rglob(".tmp-*"))


@pytest.mark.parametrize("rate, frames, stride", [(Fraction(30000, 1001), 72, 4), (Fraction(6), 30, 1)])
def test_odd_frame_rates_get_the_right_stride_and_the_right_frames(tmp_path, rate, frames, stride):
    """29.97 fps (NTSC) and 6 fps sources, 8 fps target: strides round(3.75) = 4 and 1."""
    import decord

    video, _ = render(80, 112, frames, np.random.default_rng(1), static=False, cut_at=None)
    write_mp4(video, tmp_path / "clip.mp4", fps=rate)
    row = {"videoid": "clip", "contentUrl": "", "duration": "", "page_dir": ".", "name": "a moving shape video"}
    decode = DecodeParams(frames=8, fps=8.0, height=64, width=64)
    assessed = assess_video(row, str(tmp_path), FilterParams(), decode)
    assert assessed["reason"] == "" and assessed["stride"] == stride
    assert assessed["fps"] == pytest.approx(float(rate), rel=1e-3)
    starts, clips = decode_video_clips(str(tmp_path / assessed["path"]), 80, 112, assessed["segment_start"], assessed["segment_end"], stride, decode)
    full = decord.VideoReader(str(tmp_path / "clip.mp4")).get_batch(list(range(frames))).asnumpy()
    for start, clip in zip(starts, clips):
        expected = center_crop(resize_frames(full[start + stride * np.arange(8)], 64, 90), 64, 64)
        assert np.abs(clip.astype(np.int16) - expected).mean() < 4.0
        assert np.abs(clip.astype(np.int16) - np.roll(expected, 1, axis=0)).mean() > 2 * np.abs(clip.astype(np.int16) - expected).mean()


def test_a_csv_whose_videos_are_all_missing_is_rejected_row_by_row(tmp_path, ray_session):
    rows = pd.DataFrame([{"videoid": f"gone{i}", "contentUrl": "", "duration": "", "page_dir": ".", "name": CAPTION} for i in range(3)])
    kept, rejected = filter_videos(rows, str(tmp_path), FilterParams(), DecodeParams())
    assert kept.empty and rejected["reason"].tolist() == ["missing_file"] * 3
    index, decode_rejected = decode_clips(kept, DecodeParams(), tmp_path / "clips", tmp_path)
    assert index.empty and decode_rejected.empty


def test_missing_files_between_good_videos_are_rejected_whatever_the_order(tmp_path, ray_session):
    """Two good videos, nine missing files, a good one: Ray's to_pandas returned the all-failed
    batch's numeric columns as objects mixing None and pd.NA, and the stage crashed in _typed."""
    good = [synthetic_video(tmp_path, name) for name in ("first", "second", "last")]
    missing = [{**good[0], "videoid": f"gone{i}"} for i in range(9)]
    rows = pd.DataFrame(good[:2] + missing + good[2:])
    kept, rejected = filter_videos(rows, str(tmp_path), FilterParams(num_workers=2), DecodeParams())
    assert kept["videoid"].tolist() == ["first", "second", "last"] and rejected["reason"].tolist() == ["missing_file"] * 9
    assert all(kept[name].dtype == rejected[name].dtype == ("float64" if isinstance(fill, float) else "int64")
               for name, fill in NUMERIC_FIELDS.items() if name in kept)

    mixed = pd.DataFrame({"row_index": [0, 1, 2], "fps": pd.Series([None, pd.NA, "24.0"], dtype=object),
                          "num_frames": pd.Series([pd.NA, None, 48], dtype=object)})
    typed = _typed(mixed)
    assert typed["fps"].isna().tolist() == [True, True, False] and typed["fps"].iloc[2] == 24.0
    assert typed["num_frames"].tolist() == [NUMERIC_FIELDS["num_frames"]] * 2 + [48] and typed["num_frames"].dtype == "int64"


def test_decode_rejects_a_video_that_fails_and_keeps_the_rest(fixture_run, fixture_videos, tmp_path):
    """A kept video that no longer decodes (say, corrupted since the filter ran) is listed with its
    reason; the shard still holds the other video's clips."""
    _, kept, *_ = fixture_run
    good = kept[kept["videoid"] == "mpeg4_320x240_25fps.avi"]
    broken = good.assign(videoid="corrupt", path="corrupt_frames_1280x720.mp4", height=720, width=1280, fps=10.0, stride=1, segment_start=0, segment_end=50)
    cfg = DecodeParams(clips_per_shard=8)
    index, rejected = decode_clips(pd.concat([broken, good], ignore_index=True), cfg, tmp_path / "clips", fixture_videos)
    assert rejected[["video_id", "reason"]].values.tolist() == [["corrupt", "undecodable"]]
    assert set(index["video_id"]) == {"mpeg4_320x240_25fps.avi"}
    assert np.load(tmp_path / "clips" / "clips-00000.npy").shape[0] == len(index)


def test_symlinks_cannot_lead_a_row_out_of_videos_root(tmp_path):
    """The containment check used to normalise the path without resolving links, so a link to a
    file (or a page_dir linking to a folder) outside videos_root was kept."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.mp4").write_bytes(b"not yours")
    root = tmp_path / "videos"
    (root / "page").mkdir(parents=True)
    (root / "page/real.mp4").write_bytes(b"video")
    (root / "page/leak.mp4").symlink_to(outside / "secret.mp4")
    (root / "escape_dir").symlink_to(outside)
    (root / "page/alias.mp4").symlink_to(root / "page/real.mp4")  # a link that stays inside is fine
    for page_dir, videoid in (("page", "leak"), ("escape_dir", "secret"), ("/etc", "passwd"), ("..", "outside/secret")):
        with pytest.raises(VideoError, match="outside videos_root|absolute path") as error:
            video_path(root, page_dir, videoid)
        assert error.value.reason == "path_outside_root"
    assert video_path(root, "page", "alias") == root / "page/alias.mp4"
    linked_root = tmp_path / "videos_link"  # data.videos_root itself a link to a big disk
    linked_root.symlink_to(root)
    assert video_path(linked_root, "page", "real") == linked_root / "page/real.mp4"
    assert assess_video({"videoid": "leak", "page_dir": "page", "name": CAPTION}, str(root), FilterParams(), DecodeParams())["reason"] == "path_outside_root"


def test_filter_and_decode_report_rows_done_of_total_as_they_stream(fixture_videos, ray_session, tmp_path, capsys, monkeypatch):
    """With a progress line due at every batch, filter counts rows probed and decode videos
    decoded, up to the totals and then `all done`: nothing silent for hours at WebVid scale."""
    monkeypatch.setattr(ray_runtime, "PROGRESS_SECONDS", 0.0)
    rows = fixture_csv(fixture_videos).query("videoid in @GOOD")  # three rows: three batches each way
    kept, _ = filter_videos(rows, str(fixture_videos), FilterParams(), DecodeParams())
    decode_clips(kept, DecodeParams(clips_per_shard=2), tmp_path / "clips", fixture_videos)
    lines = capsys.readouterr().out.splitlines()
    for stage, total, unit in (("filter", len(rows), "rows probed"), ("decode", len(kept), "videos decoded")):
        counts = [int(line.split(": ")[1].split("/")[0]) for line in lines if line.startswith(f"{stage}: ") and line.endswith(unit)]
        assert len(counts) >= 2 and counts == sorted(counts) and counts[-1] == total, lines
        assert f"{stage}: {total}/{total} {unit}, all done" in lines
