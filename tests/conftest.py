"""Shared test fixtures: the real fixture videos beside the checkout, one local Ray, one Prefect
server, one MLflow server and one S3-compatible object store for the whole session (starting each
costs seconds, so tests share them)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VERSVIDEO_SHARED", REPO.parent / "shared"))
FIXTURE_VIDEOS = SHARED / "fixtures" / "videos"


@pytest.fixture(scope="session")
def fixture_videos() -> Path:
    if not FIXTURE_VIDEOS.is_dir():
        pytest.fail(f"fixture videos not found at {FIXTURE_VIDEOS}; set VERSVIDEO_SHARED to the shared/ folder")
    return FIXTURE_VIDEOS


@pytest.fixture(scope="session")
def object_store(tmp_path_factory):
    """A real S3 endpoint on 127.0.0.1 (moto's server) with one bucket, for the whole session:
    {"bucket": "s3://...", **the AWS variables}. The variables are exported to this process, so
    that the local Ray's workers (which inherit the environment Ray starts with), pyarrow, boto3
    and DVC reach it as a user's shell with them exported would."""
    from tests.services import create_bucket, running, s3_server

    server, env = s3_server(tmp_path_factory.mktemp("s3"))
    with running(server), pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        yield {"bucket": create_bucket("versvideo-tests", env), **env}


@pytest.fixture(scope="session")
def ray_session(object_store):
    import ray

    from tasks.operations.ray_runtime import ensure_ray

    os.environ.pop("RAY_ADDRESS", None)
    ensure_ray()
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """A real `prefect server start` on 127.0.0.1 for the tests that run flows: {"PREFECT_API_URL": ...}."""
    from tests.services import prefect_server, running

    server, env = prefect_server(tmp_path_factory.mktemp("prefect"))
    with running(server):
        yield env


@pytest.fixture(scope="session")
def mlflow_api(tmp_path_factory, object_store):
    """A real `mlflow server` on 127.0.0.1 for the tests that talk to a tracking server, as a team
    runs one: a sqlite store, artifacts proxied into the object store's bucket
    (s3://versvideo-tests/mlflow-artifacts/). {"MLFLOW_TRACKING_URI": ...}."""
    from tests.services import mlflow_server, running

    artifacts = f"{object_store['bucket']}/mlflow-artifacts"
    server, env = mlflow_server(tmp_path_factory.mktemp("mlflow"), artifacts)
    with running(server):
        yield env


def read_fixture_clip(name: str, frames: int = 8, size: int = 64, skip: int = 0) -> np.ndarray:
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


FIXTURE_SOURCES = ("h264_340x256_28fps.mp4", "mpeg4_320x240_25fps.avi", "pancake_426x240_30fps.mkv")


def write_fixture_clips(clips_dir: Path) -> pd.DataFrame:
    """A decode-stage clip folder made of the fixture videos: 3 videos x 2 clips (8 x 64 x 64) in
    shard 0, and its index; returns the index (clip_id, video_id, shard, shard_row, caption)."""
    import numpy as np
    import pandas as pd

    clips_dir.mkdir(parents=True, exist_ok=True)
    rows, clips = [], []
    for v, name in enumerate(FIXTURE_SOURCES):
        for k in range(2):
            rows.append({"clip_id": f"v{v}-{k}", "video_id": f"v{v}", "shard": 0, "shard_row": len(clips), "caption": f"clip {k} of {name}"})
            clips.append(read_fixture_clip(name, skip=8 * k))
    np.save(clips_dir / "clips-00000.npy", np.stack(clips))
    index = pd.DataFrame(rows)
    index.to_parquet(clips_dir / "index.parquet")
    return index


def write_tiny_models(root: Path, scale: float = 0.0) -> None:
    """Random-init smoke exports in models/unet (merged experts) and models/decoder (TCM-VAE);
    `scale` > 0 moves the UNet's zero-initialised layers off zero, as training would."""
    import numpy as np
    import torch

    from model.image_vae import build_tiny_image_vae
    from model.presets import get_preset
    from model.tcm_vae import TCMDecoder, TCMVAEConfig
    from model.unet import VersVideoUNet
    from tasks.config.params import CacheLatentsParams, TrainUnetParams, clip_shape
    from tasks.inference.models import save_decoder
    from tasks.training.unet import UNetRecipe

    torch.manual_seed(0)
    unet = VersVideoUNet(get_preset("smoke").unet)
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.add_(scale * torch.randn_like(parameter))
    UNetRecipe("smoke", TrainUnetParams(), np.zeros(1), [], CacheLatentsParams(), clip_shape("smoke")).export(unet, root / "models" / "unet")
    save_decoder(TCMDecoder(build_tiny_image_vae(seed=0), TCMVAEConfig(refine_channels=8)), root / "models" / "decoder")
