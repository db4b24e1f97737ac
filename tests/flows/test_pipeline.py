"""The pipeline against real services: a Prefect server, an MLflow tracking server and a Ray head
node on 127.0.0.1 (tests/services.py), driven by `versvideo pipeline` as a user's shell runs it,
on a tiny synthetic set whose raw videos and image shards are in the S3 bucket: the data stages
and a few steps of train_unet on two workers (training and evaluation have their own tests of
what they compute).

A failing stage is reported by name and a rerun resumes at it without redoing the finished ones;
with nothing changed no stage does work; changing a param reruns the stage that reads it. Then each
service is asked through its own API what happened: MLflow's runs, tags, dataset inputs and
artifacts (in the S3 bucket behind its server); Prefect's flow runs, task runs and summary
artifacts; Ray's nodes the stages' tasks and the training workers ran on; the bucket, for the
checkpoints and the clip and latent shards (VERSVIDEO_DATA_STORAGE: no shard is on the disk), and
DVC's lock, which tracks the raw data in the bucket as external dependencies.
Last, the outputs go to the team's DVC remote, a bucket, and come back into a clone elsewhere with
nothing to rerun."""

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from uuid import UUID

import boto3
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId
from prefect.settings import PREFECT_API_URL, temporary_settings

from tasks.preprocessing import synthetic
from tasks.storage.webvid import COLUMNS as WEBVID_COLUMNS
from tests.services import ray_head, ray_worker_node, running
from tests.tasks.test_raw_data_in_bucket import upload_folder

REPO = Path(__file__).resolve().parents[2]
STAGES = ["prepare", "filter", "decode", "cache_latents", "train_unet"]


@pytest.fixture(scope="module")
def services(request, tmp_path_factory):
    """The three servers, started side by side: {env variable: value} for their clients. Ray is a
    cluster of two nodes, two cores each, as two machines would be: a head and a worker node. Ray
    Train's run folders (checkpoints) and the clip and latent shards go to the S3 bucket, which
    both nodes reach."""
    folder = tmp_path_factory.mktemp("services")
    ray, ray_env = ray_head(folder, num_cpus=2)
    servers = {**request.getfixturevalue("prefect_api"), **request.getfixturevalue("mlflow_api")}  # the session's; they start while Ray does
    bucket = request.getfixturevalue("object_store")["bucket"]
    storage = {"VERSVIDEO_RUN_STORAGE": f"{bucket}/pipeline-runs", "VERSVIDEO_DATA_STORAGE": f"{bucket}/pipeline-data"}
    with running(ray), running(ray_worker_node(folder, ray_env, num_cpus=2)):
        yield {**servers, **ray_env, **storage}


@pytest.fixture
def project(tmp_path, services, object_store):
    """A checkout whose raw data is in the bucket, as a team's WebVid copy and LAION shards are:
    the embedded set's videos and image shards, rendered once and uploaded; the checkout holds
    their CSV only (prepare.source=webvid), so on the cluster only the driver reads the checkout."""
    for name in ("dvc.yaml", "tasks", "model", "eval", "flows"):
        source = REPO / name
        (shutil.copytree(source, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__")) if source.is_dir() else shutil.copy(source, tmp_path / name))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    rendered = tmp_path.parent / f"{tmp_path.name}-rendered"
    rows = synthetic.generate(rendered / "videos", num_videos=6, seconds=1.5, fps=params["prepare"]["fps"], height=params["prepare"]["height"],
                              width=params["prepare"]["width"], seed=0)
    synthetic.generate_images(rendered / "images", num_images=8, height=params["prepare"]["height"], width=params["prepare"]["width"], seed=0)
    raw = f"{object_store['bucket']}/raw-{tmp_path.name}"
    upload_folder(rendered / "videos", f"{raw}/videos")
    upload_folder(rendered / "images", f"{raw}/images")
    (tmp_path / "incoming").mkdir()
    pd.DataFrame(rows, columns=list(WEBVID_COLUMNS)).to_csv(tmp_path / "incoming" / "webvid.csv", index=False)
    params["data"].update(videos_root=f"{raw}/videos", images=f"{raw}/images")
    params["prepare"].update(source="webvid", webvid_csv="incoming/webvid.csv")
    params["decode"]["clips_per_shard"] = 4  # 2 videos a shard: 3 decode tasks, for the cluster's two nodes
    params["cache_latents"]["smoke_vae_fit_steps"] = 0  # a random stand-in VAE: its fit has its own test
    # two workers, one on each node (strict_spread: Ray fails rather than put both on one), a few
    # steps with a checkpoint in the bucket and one sample at the end
    params["train_unet"].update(steps=4, batch_size=2, image_batch_size=1, warmup_steps=1, checkpoint_every=2, sample_every=0, sample_count=1,
                                sample_steps=2, shuffle_buffer=8, num_workers=2, placement="strict_spread")
    for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(command, cwd=tmp_path, check=True)
    return tmp_path, params


def write_params(folder: Path, params: dict) -> None:
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


BIN_FIRST = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # the environment's versvideo, dvc


def versvideo_pipeline(folder: Path, services: dict[str, str]) -> subprocess.CompletedProcess:
    """`versvideo pipeline --stages ...` in `folder` with the services' variables exported."""
    env = {**os.environ, **services, **BIN_FIRST}
    return subprocess.run(["versvideo", "pipeline", "--stages", ",".join(STAGES)], cwd=folder, env=env, capture_output=True, text=True, timeout=900)


def ran(finished: subprocess.CompletedProcess) -> dict[str, bool]:
    """The command's closing table: stage -> whether DVC ran it (False: up to date)."""
    assert finished.returncode == 0, (finished.stdout + finished.stderr)[-3000:]
    rows = re.findall(r"^  (\w+)\s+(ran|up to date)\s+[\d.]+ s$", finished.stdout, flags=re.MULTILINE)
    return {stage: status == "ran" for stage, status in rows}


def test_failed_stage_resumes_a_rerun_does_nothing_and_a_clone_elsewhere_pulls_it(project, services, object_store):
    folder, params = project
    write_params(folder, {**params, "cache_latents": {**params["cache_latents"], "vae_weights": "weights/missing-vae"}})
    failed = versvideo_pipeline(folder, services)
    assert failed.returncode == 1
    assert re.search(r"(?s)stage .cache_latents. failed .*missing-vae: weight file not found; set cache_latents.vae_weights", failed.stderr), failed.stderr[-3000:]

    write_params(folder, params)  # fixed: the rerun starts at the failed stage
    assert ran(versvideo_pipeline(folder, services)) == {"prepare": False, "filter": False, "decode": False, "cache_latents": True, "train_unet": True}
    assert ran(versvideo_pipeline(folder, services)) == dict.fromkeys(STAGES, False)  # nothing changed: no stage work

    write_params(folder, {**params, "filter": {**params["filter"], "min_motion": 0.003}})
    # filter reruns; its kept.parquet is byte-identical (no synthetic video near the threshold), so DVC stops there
    assert ran(versvideo_pipeline(folder, services)) == {"prepare": False, "filter": True, "decode": False, "cache_latents": False, "train_unet": False}

    # MLflow, through the tracking server: one parent run per flow run, a nested run per stage
    client = MlflowClient(services["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("versvideo").experiment_id], order_by=["attributes.start_time ASC"])
    parents = [run for run in runs if run.info.run_name == "pipeline"]
    assert [run.info.status for run in parents] == ["FAILED", "FINISHED", "FINISHED", "FINISHED"]
    assert parents[-1].data.params["filter.min_motion"] == "0.003" != parents[1].data.params["filter.min_motion"]  # each run's params
    children = {parent.info.run_id: [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id] for parent in parents}
    failed_stage = [run for run in children[parents[0].info.run_id] if run.info.run_name == "stage:cache_latents"]
    assert [run.info.status for run in failed_stage] == ["FAILED"]  # a stage's own clear error is not retried
    stage_runs = children[parents[1].info.run_id]
    assert sorted(run.info.run_name for run in stage_runs) == sorted(f"stage:{stage}" for stage in STAGES)
    cache = next(run for run in stage_runs if run.info.run_name == "stage:cache_latents")
    lock = yaml.safe_load((folder / "dvc.lock").read_text())["stages"]["cache_latents"]
    clips_md5 = next(dep["md5"] for dep in lock["deps"] if dep["path"] == "data/clips")
    assert cache.data.tags["dvc.dep.data/clips"] == clips_md5 and cache.data.tags["git_commit"] and cache.data.tags["dvc.ran"] == "true"
    assert {(d.dataset.name, d.dataset.digest) for d in cache.inputs.dataset_inputs} >= {("data/clips", clips_md5[:36])}
    assert cache.data.metrics["stage_seconds"] > 0
    filtered = next(run for run in stage_runs if run.info.run_name == "stage:filter")  # its metrics file: headline numbers only
    assert filtered.data.metrics["filter/kept"] > 0 and set(filtered.data.metrics) == {"filter/kept", "filter/rejected", "filter/images_kept", "filter/images_rejected", "stage_seconds"}
    downloaded = Path(client.download_artifacts(parents[-1].info.run_id, "dvc.lock", str(folder / "downloaded")))
    assert downloaded.read_bytes() == (folder / "dvc.lock").read_bytes()  # uploaded through the server's artifact proxy...
    stored = boto3.client("s3").list_objects_v2(Bucket="versvideo-tests", Prefix="mlflow-artifacts/")["Contents"]
    assert any(item["Key"].endswith(f"{parents[-1].info.run_id}/artifacts/dvc.lock") for item in stored)  # ...into its S3 bucket

    # Prefect, through the server's API: the flow runs MLflow names, their tasks and summaries
    with temporary_settings({PREFECT_API_URL: services["PREFECT_API_URL"]}), get_client(sync_client=True) as prefect:
        flow_run_ids = [UUID(parent.data.tags["prefect.flow_run_id"]) for parent in parents]
        assert [prefect.read_flow_run(id).state.type.value for id in flow_run_ids] == ["FAILED", "COMPLETED", "COMPLETED", "COMPLETED"]
        assert {run.data.tags["prefect.flow_run_id"] for run in stage_runs} == {str(flow_run_ids[1])}
        tasks = prefect.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_ids[1]])))
        assert sorted(task.name for task in tasks) == sorted(STAGES) and {task.state.type.value for task in tasks} == {"COMPLETED"}
        summaries = prefect.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_ids[0], flow_run_ids[1]])))
        markdown = {summary.flow_run_id: summary.data for summary in summaries if summary.key == "versvideo-pipeline-summary"}
        assert "| cache_latents | **failed** | |" in markdown[flow_run_ids[0]]
        assert "| cache_latents | ran |" in markdown[flow_run_ids[1]] and "| decode | up to date |" in markdown[flow_run_ids[1]]

    # Ray, through a driver joining the head at 127.0.0.1: two alive nodes (both on this machine:
    # Ray registers a node under the host's address even when told 127.0.0.1), the per-video work
    # of filter and decode ran on both, and so did train_unet's two workers
    probe = subprocess.run([sys.executable, "-c", "import json, ray; ray.init(log_to_driver=False); print(json.dumps(ray.nodes()))"],
                           env={**os.environ, **services}, capture_output=True, text=True, check=True)
    nodes = json.loads(probe.stdout.strip().splitlines()[-1])
    assert sorted((node["NodeManagerHostname"], node["Alive"]) for node in nodes) == [(socket.gethostname(), True)] * 2
    node_ids = {node["NodeID"] for node in nodes}
    worked = [run for run in runs if run.data.tags.get("dvc.ran") == "true" and run.info.run_name != "stage:prepare"]  # prepare: no Ray
    assert sorted(run.info.run_name for run in worked) == ["stage:cache_latents", "stage:decode", "stage:filter", "stage:filter", "stage:train_unet"]
    assert {run.data.tags.get("ray.node_id") for run in worked} <= node_ids  # the node each stage's driver attached to
    first_filter, first_decode = (next(run for run in worked if run.info.run_name == f"stage:{stage}") for stage in ("filter", "decode"))
    assert set(first_filter.data.tags["ray.nodes.filter"].split(",")) == node_ids
    assert set(first_decode.data.tags["ray.nodes.decode"].split(",")) == node_ids
    a_two_worker_training_ran_on_both_nodes_with_its_checkpoints_in_the_bucket(client, runs, node_ids, services["VERSVIDEO_RUN_STORAGE"])
    the_shards_are_in_the_bucket_only(folder, services["VERSVIDEO_DATA_STORAGE"])
    assert not (folder / "data" / "raw" / "videos").exists() and not (folder / "data" / "raw" / "images").exists()  # read from the bucket
    filter_lock = yaml.safe_load((folder / "dvc.lock").read_text())["stages"]["filter"]["deps"]
    external = {dep["path"]: dep["md5"] for dep in filter_lock if dep["path"].startswith("s3://")}
    assert set(external) == {params["data"]["videos_root"], params["data"]["images"]}
    videos = params["data"]["videos_root"]
    assert first_filter.data.tags[f"dvc.dep.{videos.replace('://', '/')}"] == external[videos]  # MLflow keys may not hold '//'

    a_teammate_pulls_from_the_bucket_and_has_nothing_to_rerun(folder, f"{object_store['bucket']}/dvc-remote", services)


def a_two_worker_training_ran_on_both_nodes_with_its_checkpoints_in_the_bucket(client: MlflowClient, runs: list, node_ids: set[str], run_storage: str) -> None:
    """train_unet's Ray Train run (nested under its stage's run): one worker on each node, each
    tagging the node it ran on; its 4 steps logged; its last checkpoint in the bucket, where the
    run records it, every file's sha256 matching the object's."""
    stage = next(run for run in runs if run.info.run_name == "stage:train_unet")
    training = client.search_runs([stage.info.experiment_id], f"tags.mlflow.parentRunId = '{stage.info.run_id}'")
    assert len(training) == 1 and training[0].info.run_name.startswith("train_unet-smoke-") and training[0].info.status == "FINISHED"
    tags = training[0].data.tags
    assert {tags["ray.node_id.rank0"], tags["ray.node_id.rank1"]} == node_ids
    assert [m.step for m in client.get_metric_history(training[0].info.run_id, "loss")] == [1, 2, 3, 4]
    checkpoint = tags["checkpoint.path"]
    assert checkpoint.startswith(f"{run_storage}/{training[0].info.run_name}/checkpoint_")
    bucket, key = checkpoint.removeprefix("s3://").split("/", 1)
    s3 = boto3.client("s3")
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=f"{key}/")["Contents"]
    stored = {item["Key"].rsplit("/", 1)[1]: hashlib.sha256(s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()).hexdigest()
              for item in listed if not item["Key"].endswith("/")}  # less the folder marker pyarrow writes
    recorded = {name.removeprefix("checkpoint.sha256."): digest for name, digest in tags.items() if name.startswith("checkpoint.sha256.")}
    assert recorded == stored and "model.safetensors" in recorded


def the_shards_are_in_the_bucket_only(folder: Path, storage: str) -> None:
    """decode's and cache_latents' shards went to the data storage: the output folders hold their
    small files and shards.json, whose every object is in the bucket with the bytes it names, so
    the Ray tasks and the training workers on both nodes read them from there."""
    bucket, prefix = storage.removeprefix("s3://").split("/", 1)
    s3 = boto3.client("s3")
    for output in ("data/clips", "data/clips/images", "data/latents", "data/latents/images"):
        assert not list((folder / output).glob("clips-*.npy")) + list((folder / output).glob("latents-*.parquet"))
        manifest = json.loads((folder / output / "shards.json").read_text())
        assert manifest["storage"] == storage and manifest["shards"]
        for entry in manifest["shards"].values():
            data = s3.get_object(Bucket=bucket, Key=f"{prefix}/shards/{entry['object']}")["Body"].read()
            assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["bytes"]


def a_teammate_pulls_from_the_bucket_and_has_nothing_to_rerun(folder: Path, remote: str, services: dict[str, str]) -> None:
    """The team's DVC remote is a bucket (the session's S3 server, reached through the standard
    AWS variables only: nothing about the endpoint or keys is in the repository). `dvc push` from
    this clone; a clone in another directory `dvc pull`s, DVC finds nothing stale, and `versvideo
    pipeline` does no stage work there; filter and decode rerun there on one node write the same
    bytes: the outputs' hashes depend neither on where a clone sits nor on how many nodes ran it
    (the shards go to the same data storage, where they are named by what they hold)."""
    def git_or_dvc(*command: str, where: Path = folder) -> str:
        env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}  # a stage DVC runs starts a local Ray
        env["VERSVIDEO_DATA_STORAGE"] = services["VERSVIDEO_DATA_STORAGE"]
        finished = subprocess.run(command, cwd=where, capture_output=True, text=True, env={**env, **BIN_FIRST})
        assert finished.returncode == 0, f"{' '.join(command)}:\n{(finished.stdout + finished.stderr)[-3000:]}"
        return finished.stdout

    git_or_dvc("dvc", "remote", "add", "-d", "team", remote)
    git_or_dvc("git", "add", "-A")
    git_or_dvc("git", "-c", "user.name=Alice", "-c", "user.email=alice@example.com", "commit", "-q", "-m", "data stages")
    git_or_dvc("dvc", "push")
    bucket, prefix = remote.removeprefix("s3://").split("/", 1)
    assert boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix)["KeyCount"] > 0

    clone = folder.parent / f"{folder.name}-teammate" / "checkouts" / "versvideo"  # another directory, another depth
    git_or_dvc("git", "clone", "-q", str(folder), str(clone), where=folder.parent)
    git_or_dvc("dvc", "pull", "--with-deps", "train_unet", where=clone)  # the outputs this run made
    assert "up to date" in git_or_dvc("dvc", "status", "--with-deps", "train_unet", where=clone)
    assert ran(versvideo_pipeline(clone, services)) == dict.fromkeys(STAGES, False)
    for path in ("data/filtered/kept.parquet", "data/clips/index.parquet", "data/latents/index.parquet", "models/unet/model.safetensors"):
        assert (clone / path).read_bytes() == (folder / path).read_bytes()

    # the same stages computed again there, on one node (a local Ray: no RAY_ADDRESS): the bytes
    # the two-node cluster wrote in the other directory, so dvc.lock does not change
    for stage in ("filter", "decode"):
        git_or_dvc("dvc", "repro", "--force", "--single-item", stage, where=clone)
    assert git_or_dvc("git", "status", "--porcelain", "dvc.lock", where=clone) == ""
