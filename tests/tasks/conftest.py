"""Fixtures of the stage tests that run the real data stages on the real fixture videos: filtered
once, decoded once and cached once per test session, since several modules check what those runs
wrote (the latent cache's values, and the same stages writing into object storage)."""

from __future__ import annotations

import pandas as pd
import pytest

from tasks.config.params import CacheLatentsParams, DecodeParams, FilterParams
from tasks.inference.encoders import encoder_info
from tasks.preprocessing import synthetic
from tasks.preprocessing.clips import decode_clips
from tasks.preprocessing.image_clips import decode_images
from tasks.preprocessing.latents import cache_latents
from tasks.stages.filter import filter_images, filter_videos
from tests.tasks.test_filter_decode import fixture_csv

FIXTURE_DECODE = DecodeParams(clips_per_shard=2)  # 3 kept fixture videos, 2 clips each: 3 shards
FIXTURE_ENCODERS = CacheLatentsParams(sample_posterior=True, seed=5, num_workers=2)


@pytest.fixture(scope="session")
def fixture_filtered(fixture_videos, ray_session) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The filter's (kept, rejected) rows of the fixture videos' CSV (3 videos kept)."""
    return filter_videos(fixture_csv(fixture_videos), str(fixture_videos), FilterParams(), FIXTURE_DECODE)


@pytest.fixture(scope="session")
def fixture_kept(fixture_filtered) -> pd.DataFrame:
    return fixture_filtered[0]


@pytest.fixture(scope="session")
def clips_dir(fixture_videos, fixture_kept, tmp_path_factory):
    """decode on the fixture videos: 3 kept videos, 2 clips each, 2 clips per shard."""
    out = tmp_path_factory.mktemp("ws") / "data" / "clips"
    index, _ = decode_clips(fixture_kept, FIXTURE_DECODE, out, fixture_videos)
    index.to_parquet(out / "index.parquet", index=False)
    assert len(index) == 6 and index["shard"].nunique() == 3
    # and the image stream: four synthetic image-text pairs as one-frame clips, two shards
    images = out.parent / "raw_images"
    synthetic.generate_images(images, num_images=4, height=64, width=64, seed=0)
    image_index, _ = decode_images(filter_images(str(images), FilterParams())[0], FIXTURE_DECODE, out / "images", images)
    image_index.to_parquet(out / "images" / "index.parquet", index=False)
    assert len(image_index) == 4
    return out


@pytest.fixture(scope="session")
def cached(clips_dir, tmp_path_factory):
    """One cache_latents run (in this process's Ray) with seeded posterior samples."""
    out = tmp_path_factory.mktemp("latents")
    index = pd.read_parquet(clips_dir / "index.parquet")
    status = cache_latents(index, FIXTURE_ENCODERS, encoder_info(FIXTURE_ENCODERS), clips_dir, out)
    index.to_parquet(out / "index.parquet", index=False)  # main() writes it last; here the test does
    return index, status, out, FIXTURE_ENCODERS
