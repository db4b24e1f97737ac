"""The Prefect pipeline over dvc.yaml on a tiny synthetic set (the data stages; training and
evaluation have their own tests): a failing stage is reported by name and a rerun resumes at it
without redoing the finished ones; with nothing changed no stage does work; changing a param
reruns the stage that reads it; every stage gets a nested MLflow run with its lineage."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import yaml
from mlflow import MlflowClient
from prefect.testing.utilities import prefect_test_harness

from flows.pipeline import StageFailed, pipeline

REPO = Path(__file__).resolve().parents[2]
STAGES = ["prepare", "filter", "decode", "cache_latents"]


@pytest.fixture(scope="module")
def prefect_server():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def project(tmp_path, monkeypatch, ray_session):
    for name in ("dvc.yaml", "tasks", "model", "eval", "flows"):
        source = REPO / name
        (shutil.copytree(source, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__")) if source.is_dir() else shutil.copy(source, tmp_path / name))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["prepare"].update(num_videos=6, seconds=1.5)
    params["cache_latents"]["smoke_vae_fit_steps"] = 20
    for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(command, cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")  # `versvideo` for dvc's cmd
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    # The stages join this session's Ray (as on a cluster, through RAY_ADDRESS) instead of each
    # starting its own: the same code path as production, and ~15 s less per Ray stage here.
    monkeypatch.setenv("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    return tmp_path, params


def write_params(folder: Path, params: dict) -> None:
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def ran(results) -> dict[str, bool]:
    return {result["stage"]: result["ran"] for result in results}


def test_failed_stage_resumes_and_a_rerun_does_nothing(project, prefect_server):
    folder, params = project
    write_params(folder, {**params, "cache_latents": {**params["cache_latents"], "vae_weights": "weights/missing-vae"}})
    with pytest.raises(StageFailed, match=r"(?s)stage .cache_latents. failed .*missing-vae: weight file not found; set cache_latents.vae_weights"):
        pipeline(stages=STAGES)

    write_params(folder, params)  # fixed: the rerun starts at the failed stage
    assert ran(pipeline(stages=STAGES)) == {"prepare": False, "filter": False, "decode": False, "cache_latents": True}
    assert ran(pipeline(stages=STAGES)) == dict.fromkeys(STAGES, False)  # nothing changed: no stage work

    write_params(folder, {**params, "filter": {**params["filter"], "min_motion": 0.003}})
    # filter reruns; its kept.parquet is byte-identical (no synthetic video near the threshold), so DVC stops there
    assert ran(pipeline(stages=STAGES)) == {"prepare": False, "filter": True, "decode": False, "cache_latents": False}

    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("versvideo").experiment_id], order_by=["attributes.start_time ASC"])
    parents = [run for run in runs if run.info.run_name == "pipeline"]
    assert [run.info.status for run in parents] == ["FAILED", "FINISHED", "FINISHED", "FINISHED"]
    failed = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id and run.info.run_name == "stage:cache_latents"]
    assert [run.info.status for run in failed] == ["FAILED"]  # a stage's own clear error is not retried
    assert "dvc.lock" in {item.path for item in client.list_artifacts(parents[1].info.run_id)}
    stage_runs = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parents[1].info.run_id]
    assert sorted(run.info.run_name for run in stage_runs) == sorted(f"stage:{stage}" for stage in STAGES)
    cache = next(run for run in stage_runs if run.info.run_name == "stage:cache_latents")
    lock = yaml.safe_load((folder / "dvc.lock").read_text())["stages"]["cache_latents"]
    clips_md5 = next(dep["md5"] for dep in lock["deps"] if dep["path"] == "data/clips")
    assert cache.data.tags["dvc.dep.data/clips"] == clips_md5 and cache.data.tags["prefect.flow_run_id"]
    assert cache.data.tags["git_commit"] and cache.data.tags["dvc.ran"] == "true"
    assert {(d.dataset.name, d.dataset.digest) for d in cache.inputs.dataset_inputs} >= {("data/clips", clips_md5[:36])}
    assert cache.data.metrics["cache_latents/clips"] > 0 and cache.data.metrics["stage_seconds"] > 0
