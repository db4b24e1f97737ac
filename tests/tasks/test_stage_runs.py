"""How a stage run meets another run and a crash: one run per stage and workspace (the second
fails at once, naming the first; a killed holder's lock is free), and a run killed at any moment
leaves the previous complete output in place, and a rerun the same bytes as an uninterrupted run."""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from tasks.config.params import DecodeParams, FilterParams, load_params
from tasks.operations.stage_lock import StageBusy, stage_lock
from tasks.preprocessing import synthetic
from tasks.stages import filter as filter_stage
from tasks.stages.filter import filter_images, filter_videos
from tasks.training.engine import export_atomically
from tests.tasks.test_cache_latents import kill_tree, stage_env
from tests.tasks.test_filter_decode import fixture_csv

REPO = Path(__file__).resolve().parents[2]


def tree_digest(folder: Path) -> dict[str, str]:
    return {path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def decode_workspace(fixture_videos, ray_session, tmp_path_factory):
    """A workspace whose filter stage has run on the real fixture videos and a synthetic image set."""
    root = tmp_path_factory.mktemp("workspace")
    kept, _ = filter_videos(fixture_csv(fixture_videos), str(fixture_videos), FilterParams(), DecodeParams())
    synthetic.generate_images(root / "images", num_images=16, height=64, width=64, seed=0)
    images_kept, _ = filter_images(str(root / "images"), FilterParams())
    (root / "data/filtered").mkdir(parents=True)
    kept.to_parquet(root / "data/filtered/kept.parquet", index=False)
    images_kept.to_parquet(root / "data/filtered/images_kept.parquet", index=False)
    # kept.parquet's paths are relative to videos_root, images_kept.parquet's to images
    (root / "params.yaml").write_text(f"preset: smoke\ndata:\n  videos_root: {fixture_videos}\n  images: images\n")
    return root


def decode_command(root: Path) -> tuple[list[str], dict]:
    env = {**stage_env(), "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    return [sys.executable, "-m", "flows.cli", "stage", "decode"], env


def test_a_second_run_of_a_stage_fails_at_once_naming_the_first(decode_workspace):
    """Two decodes a few seconds apart used to share data/clips: the first reported success while
    the second had deleted its shard."""
    command, env = decode_command(decode_workspace)
    with stage_lock("decode", decode_workspace / ".versvideo/locks"):
        started = time.monotonic()
        second = subprocess.run(command, cwd=decode_workspace, env=env, capture_output=True, text=True)
        assert second.returncode == 1 and time.monotonic() - started < 60
        assert f"stage decode is already running in this folder (pid {os.getpid()} on " in second.stderr
        assert not (decode_workspace / "data/clips").exists()
        with pytest.raises(StageBusy):  # the same in one process: each run opens the lock anew
            with stage_lock("decode", decode_workspace / ".versvideo/locks"):
                pass
    with stage_lock("filter", decode_workspace / ".versvideo/locks"):  # other stages run alongside
        with stage_lock("decode", decode_workspace / ".versvideo/locks"):
            pass


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from tasks.operations.stage_lock import stage_lock\n"
        f"with stage_lock('decode', Path({str(tmp_path)!r})):\n    print('held', flush=True); time.sleep(600)")],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(StageBusy, match=f"pid {holder.pid} on "):
        with stage_lock("decode", tmp_path):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with stage_lock("decode", tmp_path):  # no stale lock to delete by hand
        pass


def test_decode_killed_at_random_moments_keeps_the_previous_clips_and_reruns_to_the_same_bytes(decode_workspace):
    """Decode used to delete data/clips when it started, so a killed run lost the previous
    complete output. Now it builds beside it and swaps the new folder in when complete."""
    command, env = decode_command(decode_workspace)
    clips = decode_workspace / "data/clips"
    started = time.monotonic()
    first = subprocess.run(command, cwd=decode_workspace, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    duration = time.monotonic() - started
    complete = tree_digest(clips)
    assert {"index.parquet", "rejected.parquet", "report.json", "clips-00000.npy"} <= set(complete)
    moments = random.Random(0).sample(range(1, 100), 2)  # percent of an uninterrupted run
    for percent in moments:
        log = decode_workspace / "killed.log"
        process = subprocess.Popen(command, cwd=decode_workspace, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
        time.sleep(duration * percent / 100)
        kill_tree(process)
        assert tree_digest(clips) == complete, f"killed at {percent} % of a run: the previous clips changed"
    rerun = subprocess.run(command, cwd=decode_workspace, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert tree_digest(clips) == complete
    assert not list((decode_workspace / "data").glob(".tmp-*"))  # the killed runs' half-built folders are gone


def test_filter_crashing_between_its_outputs_keeps_the_previous_three(tmp_path, fixture_videos, ray_session, monkeypatch):
    """kept.parquet, rejected.parquet and report.json were renamed into place one by one, so a crash
    between them paired a new kept with an old rejected. Now they swap in as one folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("preset: smoke\n")
    fixture_csv(fixture_videos).to_csv("rows.csv", index=False)
    synthetic.generate_images(tmp_path / "images", num_images=16, height=64, width=64, seed=0)
    sources = ["data.csv=rows.csv", f"data.videos_root={fixture_videos}", "data.images=images"]
    filter_stage.main(load_params("params.yaml", sources))
    previous = tree_digest(tmp_path / "data/filtered")
    assert set(previous) == {"kept.parquet", "rejected.parquet", "images_kept.parquet", "images_rejected.parquet", "report.json"}
    report = json.loads((tmp_path / "data/filtered/report.json").read_text())  # DVC's metrics file: its headline numbers
    assert json.loads((tmp_path / "metrics/filter.json").read_text()) == {
        "kept": report["kept"], "rejected": report["rejected"], "images_kept": report["images"]["kept"], "images_rejected": report["images"]["rejected"],
    } == {"kept": 3, "rejected": 5, "images_kept": 13, "images_rejected": 3}

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(filter_stage, "write_json", crash)  # after both parquet files are written
    with pytest.raises(OSError, match="disk full"):
        filter_stage.main(load_params("params.yaml", [*sources, "filter.min_motion=0.5"]))
    assert tree_digest(tmp_path / "data/filtered") == previous
    assert not list((tmp_path / "data").glob(".tmp-*"))


def test_a_training_export_that_fails_midway_keeps_the_previous_model(tmp_path):
    class HalfExport:
        def export(self, model, folder):
            (folder / "model.safetensors").write_bytes(b"new weights")
            raise RuntimeError("killed while writing config.json")

    class WholeExport:
        def export(self, model, folder):
            (folder / "model.safetensors").write_bytes(b"newer weights")
            (folder / "config.json").write_text("{}")

    models = tmp_path / "models/unet"
    models.mkdir(parents=True)
    (models / "model.safetensors").write_bytes(b"old weights")
    (models / "config.json").write_text('{"old": true}')
    previous = tree_digest(models)
    with pytest.raises(RuntimeError):
        export_atomically(HalfExport(), None, models)
    assert tree_digest(models) == previous and os.listdir(tmp_path / "models") == ["unet"]
    export_atomically(WholeExport(), None, models)
    assert (models / "model.safetensors").read_bytes() == b"newer weights" and (models / "config.json").read_text() == "{}"
