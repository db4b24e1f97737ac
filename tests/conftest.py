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
