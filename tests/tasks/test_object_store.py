"""Run folders in object storage (tasks/storage/object_store.py) against a real S3 endpoint on
127.0.0.1 (moto's server, the session's `object_store`): the same calls on a local folder and on
a bucket give the same answers, a dead endpoint or a missing bucket fails in seconds naming it,
and the newest complete checkpoint is found in either place."""

import hashlib
import json
import tempfile
import time
from pathlib import Path

import pytest
import torch
from ray import cloudpickle
from safetensors.torch import save_file

from tasks.config.params import CacheLatentsParams, Params, TrainUnetParams
from tasks.preprocessing.synthetic_latents import synthetic_cache
from tasks.training.unet import train_unet
from tasks.storage.object_store import StorageError, file_names, filesystem, is_uri, join, read_text, require_reachable, sha256, subfolders, write_text
from tasks.training.checkpoints import checkpoint_step, latest_complete_checkpoint, local_folder, newest_checkpoint
from tests.services import free_port


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path):
    """A folder that does not exist yet: on the local disk, or under the session's bucket."""
    if request.param == "local":
        return str(tmp_path / "runs")
    return f"{request.getfixturevalue('object_store')['bucket']}/object-store-test-{tmp_path.name}"


def test_text_files_listings_and_digests_read_back_the_same_on_disk_and_in_a_bucket(location):
    assert read_text(join(location, "run", "mlflow_run_id")) is None  # nothing there yet
    write_text(join(location, "run", "mlflow_run_id"), "abc123")
    write_text(join(location, "run", "checkpoint_000001", "state.json"), '{"step": 1}')
    write_text(join(location, "run", "other", "x.txt"), "x")
    run = join(location, "run")
    assert read_text(join(run, "mlflow_run_id")) == "abc123"
    assert subfolders(run, "checkpoint_") == [join(run, "checkpoint_000001")]
    assert file_names(run) == ["mlflow_run_id"] and file_names(run, "*.json") == []
    assert sha256(join(run, "mlflow_run_id")) == hashlib.sha256(b"abc123").hexdigest()
    assert subfolders(join(location, "absent"), "checkpoint_") == []


def write_checkpoint(location: str, step: int, *, truncated: bool = False, missing: str = "") -> None:
    """A checkpoint folder as report_checkpoint writes it; `truncated` cuts model.safetensors short
    (a local copy killed mid-write), `missing` leaves a file out (an upload killed before it)."""
    with tempfile.TemporaryDirectory() as folder:
        save_file({"w": torch.full((64,), float(step))}, f"{folder}/model.safetensors")
        torch.save({"optimizer": {}, "scheduler": {}, "rng": []}, f"{folder}/trainer.pt")
        Path(folder, "state.json").write_text(json.dumps({"step": step}))
        Path(folder, "metrics.json").write_text("[]")
        if truncated:
            weights = Path(folder, "model.safetensors")
            weights.write_bytes(weights.read_bytes()[:-100])
        target = join(location, f"checkpoint_{step:06d}")
        fs, path = filesystem(target)
        fs.create_dir(path, recursive=True)
        for name in ("model.safetensors", "trainer.pt", "state.json", "metrics.json"):
            if name != missing:
                with fs.open_output_stream(f"{path}/{name}") as stream:
                    stream.write(Path(folder, name).read_bytes())


def test_the_newest_complete_checkpoint_is_found_on_disk_and_in_a_bucket(location):
    assert latest_complete_checkpoint(location) is None
    write_checkpoint(location, 10)
    write_checkpoint(location, 20)
    if is_uri(location):
        write_checkpoint(location, 30, missing="trainer.pt")  # its upload stopped before the last files
    else:
        write_checkpoint(location, 30, truncated=True)  # its copy stopped mid-file
    found = latest_complete_checkpoint(location)
    assert checkpoint_step(found) == 20
    with local_folder(found) as folder:  # restored from wherever it lives
        assert json.loads((folder / "state.json").read_text()) == {"step": 20}
    older = latest_complete_checkpoint(location)
    assert newest_checkpoint(older, found) is older  # ties keep Ray's own


def test_two_ranks_resuming_from_one_checkpoint_each_read_a_copy_nobody_writes_over(location):
    """Both ranks of a resumed run get the same Checkpoint (one pickled object). Ray's as_directory
    gave them one download folder per node, and the rank that came second downloaded again over
    the files the first was reading: the FSDP resume from S3 failed once on a torn trainer.pt."""
    write_checkpoint(location, 10)
    found = latest_complete_checkpoint(location)
    received = cloudpickle.loads(cloudpickle.dumps(found))  # what the second rank holds
    with local_folder(found) as first:
        with local_folder(received) as second:
            assert (second / "trainer.pt").is_file()
            assert (first == second) == (not is_uri(location))  # on a local disk: the folder itself, read in place
        torch.load(first / "trainer.pt", weights_only=True)  # whole after the other rank's download and clean-up
    assert first.exists() == second.exists() == (not is_uri(location))  # downloads removed, a local checkpoint kept


def test_an_unreachable_endpoint_or_a_missing_bucket_fails_in_seconds_naming_it(object_store, monkeypatch):
    with pytest.raises(StorageError, match=r"bucket 'no-such-bucket' does not exist at endpoint http://127\.0\.0\.1:\d+ \(AWS_ENDPOINT_URL\)"):
        require_reachable("s3://no-such-bucket/runs")
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    started = time.monotonic()
    with pytest.raises(StorageError, match=rf"s3://versvideo-tests/runs: endpoint {dead} \(AWS_ENDPOINT_URL\) cannot be reached .*set AWS_ENDPOINT_URL"):
        require_reachable("s3://versvideo-tests/runs")
    assert time.monotonic() - started < 15


def test_a_training_stage_with_its_run_storage_on_a_dead_endpoint_stops_before_training(object_store, ray_session, monkeypatch, tmp_path):
    """VERSVIDEO_RUN_STORAGE names the bucket; an endpoint that does not answer stops the stage
    with the endpoint's name before any worker starts or any output is written."""
    latents = synthetic_cache(tmp_path / "latents", frames=2, size=8, width=64)
    monkeypatch.setenv("VERSVIDEO_RUN_STORAGE", f"{object_store['bucket']}/runs")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = Params(train_unet=TrainUnetParams(steps=2, held_out_share=0.0), cache_latents=CacheLatentsParams(smoke_vae_fit_steps=0))
    with pytest.raises(StorageError, match="cannot be reached"):
        train_unet(params, latents=latents, output_dir=tmp_path / "unet")
    assert not (tmp_path / "unet").exists() and not (tmp_path / "runs").exists()
