"""Starting a training run on Ray Train: `fit` sizes the workers to the cluster, hands each the
recipe and where to report, and records the outcome in MLflow. A second call with the same run
name and storage resumes that run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ray
import ray.train
from mlflow.tracking import MlflowClient
from ray import cloudpickle
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from tasks.operations.lineage import tracking_uri
from tasks.operations.ray_runtime import ensure_ray
from tasks.storage import object_store
from tasks.training.engine import Recipe, Setup, train_loop
from tasks.training.tracking import echo_progress, mlflow_run, record_files


def fit(recipe: Recipe, cfg: Any, datasets: dict[str, ray.data.Dataset], *, run_name: str, storage: str | Path, output_dir: Path, params: dict[str, Any], tags: dict[str, str]) -> dict[str, Any]:
    """Train `recipe` on `datasets` (one per stream the recipe reads, by name; each worker reads
    its own shard of each) with Ray Train; returns the final reported metrics and the
    MLflow run id. `storage` holds the run folders: a local path, or an object-store URI that
    every node of a cluster reads (s3://bucket/prefix). A second call with the same run_name and
    storage resumes that run."""
    if set(datasets) != set(recipe.streams()):
        raise ValueError(f"the recipe reads the streams {sorted(recipe.streams())}, but datasets {sorted(datasets)} were given")
    ensure_ray()
    storage = object_store.absolute(storage)
    object_store.require_reachable(storage)  # before any worker starts: Ray would retry a dead endpoint for minutes
    run_folder = object_store.join(storage, run_name)
    uri = tracking_uri()
    params = {**params, f"{cfg.SECTION}.global_batch": cfg.global_batch}  # batch_size x grad_accum x num_workers
    run_id = mlflow_run(uri, run_name, object_store.join(run_folder, "mlflow_run_id"), params, tags)
    cluster_cpus = int(ray.cluster_resources().get("CPU", 1))
    cpu_nodes = max(1, sum(1 for node in ray.nodes() if node["Alive"] and node["Resources"].get("CPU")))
    # Ray's CPU request leaves a core free on each node so Ray Data's read tasks (one CPU each) can
    # be scheduled beside the workers there; torch's threads use every core, since reading cached
    # shards takes little (1-2% of step time measured): on 2 cores, 2 threads made a TCM-VAE step
    # 1.8x faster than 1
    cpus_per_worker = 1.0 if cfg.use_gpu else max(0.5, min(4.0, (cluster_cpus - cpu_nodes) / cfg.num_workers))
    threads_per_worker = max(1, min(4, cluster_cpus // cfg.num_workers))
    trainer = TorchTrainer(
        train_loop,
        # Pickled by us: Ray Train's controller unpickles the config it is given, and the recipe's
        # class would make it import the model code (14 s of the controller's start, measured for
        # the UNet's) before it starts any worker; only the workers need it
        train_loop_config={"pickled": cloudpickle.dumps({
            "recipe": recipe,
            "setup": Setup(train=cfg, output_dir=str(output_dir.resolve()), tracking_uri=uri, mlflow_run_id=run_id),
            "threads_per_worker": threads_per_worker,
            "run_folder": run_folder,
        })},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": cpus_per_worker} if not cfg.use_gpu else None,
                                     placement_strategy=cfg.placement.upper()),
        run_config=RunConfig(name=run_name, storage_path=storage, failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints)),  # Ray deletes older ones, never the newest
        datasets=datasets,
    )
    client = MlflowClient(uri)
    print(f"{run_name}: starting {cfg.num_workers} Ray Train worker(s) for {cfg.steps} steps (MLflow run {run_id})", flush=True)
    try:
        with echo_progress(client, run_id, label=run_name):
            result = trainer.fit()
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    # Ray's checkpoint path is inside its filesystem (no s3:// scheme): named from the run folder instead
    checkpoint = object_store.join(run_folder, Path(result.checkpoint.path).name) if result.checkpoint else None
    if checkpoint:
        record_files(client, run_id, "checkpoint", checkpoint)
    record_files(client, run_id, "weights", str(output_dir.resolve()), "*.safetensors")
    client.set_terminated(run_id, status="FINISHED")
    return {"mlflow_run_id": run_id, "checkpoint": checkpoint, "metrics": result.metrics or {}}
