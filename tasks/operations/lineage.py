"""Lineage: the tags every MLflow run carries (the code version, the DVC hashes of the stage's data
inputs from dvc.lock, the Prefect flow run that ran it, the machine), and the pipeline's run tree.

A pipeline run (flows/pipeline.py) is one parent MLflow run with a nested run per stage. The
stage's nested run id travels to the stage process in VERSVIDEO_MLFLOW_PARENT_RUN_ID, so the
stage's own runs (training, evaluation) nest under it: pipeline -> stage -> training run.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import yaml
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, Metric, Param, RunTag
from mlflow.tracking.context.registry import resolve_tags

EXPERIMENT = "versvideo"  # every run of the pipeline, its stages and training runs
PARENT_RUN_ENV = "VERSVIDEO_MLFLOW_PARENT_RUN_ID"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def dvc_lock_stage(stage: str, lock: Path = Path("dvc.lock")) -> dict[str, Any]:
    """`stage`'s entry in dvc.lock (empty before the first `dvc repro`)."""
    if not lock.exists():
        return {}
    return (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).get(stage, {})


def locked_data_deps(stage: str, lock: Path = Path("dvc.lock")) -> list[dict[str, Any]]:
    """The stage's data dependencies as dvc.lock recorded them (path, md5, size); code left out."""
    return [dep for dep in dvc_lock_stage(stage, lock).get("deps", []) if not dep["path"].endswith(".py")]


def dvc_dep_hashes(stage: str, lock: Path = Path("dvc.lock")) -> dict[str, str]:
    """{dep path: md5} of `stage`'s data inputs in dvc.lock."""
    return {dep["path"]: str(dep.get("md5", "")) for dep in locked_data_deps(stage, lock)}


def machine_tags() -> dict[str, str]:
    """The machine the stage process runs on, as far as it moves the floats: the CPU, the SIMD
    kernels torch picked on it (AVX2 and AVX-512 sum in another order), torch's version and
    threads, the GPU. The same commit and inputs give other bytes on another kind of machine
    (the smoke VAE fit, and so the latent cache, differs between CPU kinds), so two runs'
    figures are compared only where these match. A Ray worker on another node is named by the
    ray.node* tags, not these."""
    import torch  # here, not at module level: the flows import lineage without torch

    tags = {"machine.cpu": cpu_model(), "machine.torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "machine.torch": torch.__version__, "machine.torch_threads": str(torch.get_num_threads())}
    if torch.cuda.is_available():
        tags["machine.gpu"] = torch.cuda.get_device_name(0)
    return tags


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name (Linux's /proc/cpuinfo; elsewhere what platform knows)."""
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def dep_tag(path: str) -> str:
    """The MLflow tag of a dvc.lock dependency's hash: `dvc.dep.data/latents`; an external one in
    object storage, `s3://bucket/videos`, as `dvc.dep.s3/bucket/videos` (MLflow refuses keys with
    `//`, which a path normalization would change)."""
    return "dvc.dep." + path.replace("://", "/", 1)


def lineage_tags(stage: str) -> dict[str, str]:
    """Tags for a run a stage opens. The dvc.dep hashes are dvc.lock's at the start (the last locked
    inputs); under a pipeline, record_stage replaces them with this run's once DVC locks them."""
    tags = {"versvideo.stage": stage, "git_commit": git_commit(), **machine_tags()}
    tags.update({dep_tag(path): digest for path, digest in dvc_dep_hashes(stage).items()})
    flow_run = os.environ.get("PREFECT__FLOW_RUN_ID")  # set by Prefect for the flow run that launched the stage
    if flow_run:
        tags["prefect.flow_run_id"] = flow_run
    parent = os.environ.get(PARENT_RUN_ENV)
    if parent:
        tags["mlflow.parentRunId"] = parent  # MLflow's own tag: the UI nests the run under its stage
    return tags


def tag_stage_run(tags: dict[str, str]) -> None:
    """Tags on the stage's own nested run, from inside the stage process (no-op outside a pipeline)."""
    run_id = os.environ.get(PARENT_RUN_ENV)
    if run_id:
        MlflowClient(tracking_uri()).log_batch(run_id, tags=[RunTag(key, value) for key, value in tags.items()])


def stage_metric_files(stage: str, dvc_yaml: Path = Path("dvc.yaml")) -> list[Path]:
    """The `metrics` files dvc.yaml declares for `stage`."""
    entries = (yaml.safe_load(dvc_yaml.read_text())["stages"][stage]).get("metrics", [])
    return [Path(next(iter(entry)) if isinstance(entry, dict) else entry) for entry in entries]


def numeric_leaves(tree: Any, prefix: str = "") -> dict[str, float]:
    """{'a': {'b': 1.5, 'c': 'x'}} -> {'a/b': 1.5}: what MLflow can plot of a metrics file."""
    if isinstance(tree, dict):
        return {key: value for name, child in tree.items() for key, value in numeric_leaves(child, f"{prefix}{name}/").items()}
    if isinstance(tree, (int, float)) and not isinstance(tree, bool):
        return {prefix.rstrip("/"): float(tree)}
    return {}


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


def artifact_root(uri: str) -> str | None:
    """Artifacts beside a local sqlite store (mlruns/ next to the .db), not under whatever the
    current directory happens to be; a tracking server decides for itself (None)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlruns").as_uri()
    return None


# What the experiment is, for MLflow's search and for UIs that read it. The MLflow 3.17 UI itself
# opens every experiment in the mode its GenAI / Model training switch was left in (GenAI in a new
# browser); a link carrying MODEL_TRAINING_VIEW opens the runs table instead (see ui_route).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
MODEL_TRAINING_VIEW = "workflowType=machine_learning"


def ui_route(experiment: str, run_id: str | None = None) -> str:
    """The MLflow UI's route (after the server's address) to the experiment's runs table, or to one
    run, in the model-training view."""
    run = f"/runs/{run_id}" if run_id else ""
    return f"#/experiments/{experiment}{run}?{MODEL_TRAINING_VIEW}"


def experiment_id(client: MlflowClient, uri: str) -> str:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return client.create_experiment(EXPERIMENT, artifact_location=artifact_root(uri), tags=dict([EXPERIMENT_KIND]))
    if experiment.tags.get(EXPERIMENT_KIND[0]) is None:  # an experiment an older version created
        client.set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
    return experiment.experiment_id


def start_run(client: MlflowClient, uri: str, name: str, tags: dict[str, str], parent: str | None = None) -> str:
    """A run with the standard tags mlflow.start_run would give it (mlflow.user, mlflow.source.name
    and type, the git commit when the entry point lives in a checkout) beside ours."""
    if parent:
        tags = {**tags, "mlflow.parentRunId": parent}
    return client.create_run(experiment_id(client, uri), run_name=name, tags=resolve_tags(tags)).info.run_id


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    """Flat params on a run, in MLflow's batches of 100 (values cut to its 6000-character limit)."""
    items = sorted(params.items())
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=[Param(key, str(value)[:6000]) for key, value in items[start:start + 100]])


def record_stage(client: MlflowClient, run_id: str, stage: str, seconds: float, ran: bool) -> None:
    """After a stage: its dvc.lock dependency hashes as tags and as MLflow dataset inputs (the DVC
    hash is the digest), its metrics files, and how long it took."""
    deps = locked_data_deps(stage)
    hashes = {dep_tag(dep["path"]): str(dep.get("md5", "")) for dep in deps}
    client.log_batch(run_id, tags=[RunTag("dvc.stage", stage), RunTag("dvc.ran", str(ran).lower())])  # false: DVC found the stage up to date
    # The runs the stage opened under this one (training, evaluation) took their dvc.dep tags from
    # dvc.lock as it was when they started: the previous run's hashes, wrong for any input that
    # changed. Now that DVC has locked this run's inputs, every run of the stage gets those.
    nested = client.search_runs([client.get_run(run_id).info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'")
    for tagged in [run_id, *(run.info.run_id for run in nested)]:
        client.log_batch(tagged, tags=[RunTag(key, value) for key, value in hashes.items()])
    datasets = [DatasetInput(Dataset(name=dep["path"], digest=str(dep.get("md5", ""))[:36], source_type="dvc",
                                     source=json.dumps({"path": dep["path"], "md5": dep.get("md5"), "size": dep.get("size")})))
                for dep in deps]
    if datasets:
        client.log_inputs(run_id, datasets=datasets)
    metrics = {"stage_seconds": seconds}
    for path in stage_metric_files(stage):
        if path.is_file():
            metrics.update({f"{path.stem}/{key}": value for key, value in numeric_leaves(json.loads(path.read_text())).items()})
    client.log_batch(run_id, metrics=[Metric(key[:250], value, 0, 0) for key, value in metrics.items()])
