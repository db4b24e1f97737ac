"""Shared test fixtures: the real fixture videos beside the checkout, and one local Ray for the
whole session (starting Ray costs seconds, so tests share it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VERSVIDEO_SHARED", REPO.parent / "shared"))
FIXTURE_VIDEOS = SHARED / "fixtures" / "videos"


@pytest.fixture(scope="session")
def fixture_videos() -> Path:
    if not FIXTURE_VIDEOS.is_dir():
        pytest.fail(f"fixture videos not found at {FIXTURE_VIDEOS}; set VERSVIDEO_SHARED to the shared/ folder")
    return FIXTURE_VIDEOS


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from tasks.ray_runtime import ensure_ray

    os.environ.pop("RAY_ADDRESS", None)
    ensure_ray()
    yield
    ray.shutdown()


def read_fixture_clip(name: str, frames: int = 8, size: int = 64, skip: int = 0) -> "np.ndarray":
    """`frames` successive frames of a fixture video, resized to size x size: (t, h, w, 3) uint8."""
    import av
    import numpy as np

    with av.open(str(FIXTURE_VIDEOS / name)) as container:
        decoded = [frame.to_ndarray(format="rgb24", width=size, height=size) for _, frame in zip(range(skip + frames), container.decode(video=0))]
    return np.stack(decoded[skip:])


@pytest.fixture(scope="session")
def fixture_clip_reader(fixture_videos):
    return read_fixture_clip


@pytest.fixture(scope="session")
def fixture_clip(fixture_videos):
    """Eight real frames (64x64) of the H.264 fixture: (8, 64, 64, 3) uint8."""
    return read_fixture_clip("h264_340x256_28fps.mp4")
