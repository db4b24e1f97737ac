"""How a stage run meets another run and a crash: one run per stage and workspace (the second
fails at once, naming the first; a killed holder's lock is free), and a run killed at any moment
leaves the previous complete output in place, and a rerun the same bytes as an uninterrupted run."""

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from tasks.config.params import DecodeParams, FilterParams
from tasks.operations.stage_lock import StageBusy, stage_lock
from tasks.stages.filter import filter_videos
from tests.tasks.test_cache_latents import kill_tree, stage_env
from tests.tasks.test_filter_decode import fixture_csv

REPO = Path(__file__).resolve().parents[2]


def tree_digest(folder: Path) -> dict[str, str]:
    return {path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def decode_workspace(fixture_videos, ray_session, tmp_path_factory):
    """A workspace whose filter stage has run on the real fixture videos."""
    root = tmp_path_factory.mktemp("workspace")
    kept, _ = filter_videos(fixture_csv(fixture_videos), str(fixture_videos), FilterParams(), DecodeParams())
    (root / "data/filtered").mkdir(parents=True)
    kept.to_parquet(root / "data/filtered/kept.parquet", index=False)
    (root / "params.yaml").write_text("preset: smoke\n")
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
