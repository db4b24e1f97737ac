"""Property test of filter + decode: random mixes and orders of good, broken and missing rows
(the project's own rendered videos, damaged in the ways real crawls are), with random worker
counts and shard sizes. The stages never crash, every row is kept or rejected once
(`rows in = kept + rejected`), every damaged file is rejected, and every kept video is decoded
or rejected by decode."""

import os
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasks.config.params import DecodeParams, FilterParams
from tasks.preprocessing.clips import decode_clips
from tasks.preprocessing.synthetic import render
from tasks.stages.filter import filter_videos
from tasks.storage.previews import write_mp4

GOOD = ("moving", "odd_fps", "ntsc")
DAMAGED = ("truncated", "zero_byte", "not_a_video", "tiny", "one_frame", "missing")


@pytest.fixture(scope="module")
def video_pool(tmp_path_factory):
    """One file per kind; rows may name a kind several times (re-crawls, copies)."""
    root = tmp_path_factory.mktemp("pool")
    rng = np.random.default_rng(0)
    moving, _ = render(80, 112, 48, rng, static=False, cut_at=None)
    write_mp4(moving, root / "moving.mp4", fps=24)
    write_mp4(render(80, 112, 30, rng, static=False, cut_at=None)[0], root / "odd_fps.mp4", fps=Fraction(7))
    write_mp4(render(80, 112, 60, rng, static=False, cut_at=None)[0], root / "ntsc.mp4", fps=Fraction(30000, 1001))
    whole = (root / "moving.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(whole[: len(whole) // 3])
    (root / "zero_byte.mp4").write_bytes(b"")
    (root / "not_a_video.mp4").write_text("<html>403 Forbidden</html>")
    write_mp4(render(16, 16, 24, rng, static=False, cut_at=None)[0], root / "tiny.mp4", fps=24)
    write_mp4(moving[:1], root / "one_frame.mp4", fps=24)
    return root


row_kinds = st.lists(st.sampled_from(GOOD + DAMAGED), min_size=1, max_size=8)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(row_kinds, st.integers(1, 2), st.integers(1, 2), st.integers(1, 5))
def test_any_mix_of_rows_is_kept_or_rejected_once_and_never_crashes(video_pool, ray_session, tmp_path_factory, kinds, filter_workers, decode_workers, clips_per_shard):
    rows = pd.DataFrame([{"videoid": f"{kind}-{k}", "contentUrl": "", "duration": "PT00H00M02S", "page_dir": ".", "name": f"a {kind} shape video"}
                         for k, kind in enumerate(kinds)])
    # each row's own name, a hard link to its kind's file (a symlink would lead out of videos_root):
    # every videoid is distinct, as in a crawl
    root = tmp_path_factory.mktemp("rows")
    for k, kind in enumerate(kinds):
        if kind != "missing":
            os.link(video_pool / f"{kind}.mp4", root / f"{kind}-{k}.mp4")
    decode_cfg = DecodeParams(clips_per_shard=clips_per_shard, clips_per_video=1, num_workers=decode_workers)
    kept, rejected = filter_videos(rows, str(root), FilterParams(num_workers=filter_workers, min_short_side=64), decode_cfg)

    assert len(kept) + len(rejected) == len(rows)
    assert sorted([*kept["row_index"], *rejected["row_index"]]) == list(range(len(rows)))
    kinds_kept = {videoid.rsplit("-", 1)[0] for videoid in kept["videoid"]}
    assert not kinds_kept & set(DAMAGED), f"kept damaged rows: {kept['videoid'].tolist()}"
    # copies of one file under several ids: the first is kept, the others are duplicate_content
    assert kinds_kept == set(kinds) & set(GOOD)

    index, decode_rejected = decode_clips(kept, decode_cfg, root / "clips", root)
    assert set(index["video_id"]) | set(decode_rejected["video_id"]) == set(kept["videoid"])
    assert not set(index["video_id"]) & set(decode_rejected["video_id"])
    for shard, clips in index.groupby("shard"):
        stored = np.load(root / "clips" / f"clips-{int(shard):05d}.npy", mmap_mode="r")
        assert stored.shape == (len(clips), 8, 64, 64, 3) and sorted(clips["shard_row"]) == list(range(len(clips)))
