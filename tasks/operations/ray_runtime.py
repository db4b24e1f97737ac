"""Connecting to Ray: an existing cluster when RAY_ADDRESS is set, else a local one."""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable

import pandas as pd
import ray

from tasks.config.params import PROGRESS_SECONDS


# the standard AWS variables: which account, region and (S3-compatible) endpoint object storage uses
FORWARDED_TO_WORKERS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_PROFILE")


def ensure_ray() -> None:
    """Start (or join) Ray once per process, before any Ray Data dataset exists: creating one
    auto-starts Ray with its defaults, which would skip these settings (the training stages'
    logs carried a placement-group cleaner's warning every second and every actor's progress
    bars, and their stage runs lacked the ray.* tags)."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        # The cluster's workers must have this project installed (same uv.lock), like the driver.
        # They start with their node's environment, not the driver's: the object-store account and
        # endpoint this run uses (checkpoints in a bucket) travel with the job
        forwarded = {name: os.environ[name] for name in FORWARDED_TO_WORKERS if os.environ.get(name)}
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False, runtime_env={"env_vars": forwarded} if forwarded else None)
    else:
        # A local Ray has no dashboard to export Ray Train's metrics to (ours go to MLflow) and one
        # machine gets no preemption notices: without the watcher each fit starts one actor fewer
        # (a Python process importing Ray Train, seconds of a 2-core machine). Read by fit().
        os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # "local": a new Ray of our own. ray.init() alone would join the cluster of the machine's
        # last `ray start` (/tmp/ray/ray_current_cluster), or hang on it if it has since stopped.
        ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = sys.stderr.isatty()
    from tasks.operations.lineage import tag_stage_run  # here: Ray Data read tasks import this module (via the dataset factories) and need no MLflow

    runtime = ray.get_runtime_context()  # in a pipeline stage, its MLflow run says which cluster did the work
    tag_stage_run({"ray.address": runtime.gcs_address, "ray.node_id": runtime.get_node_id(), "ray.job_id": runtime.get_job_id()})


NODE_COLUMN = "_ray_node_id"


def on_record(udf: Callable[..., pd.DataFrame]) -> Callable[..., pd.DataFrame]:
    """A Ray Data batch function whose output rows also say which node ran it (NODE_COLUMN), so
    that collect_with_progress can record where the work went; the column never reaches an output."""
    @functools.wraps(udf)
    def recorded(batch: pd.DataFrame, **kwargs) -> pd.DataFrame:
        return udf(batch, **kwargs).assign(**{NODE_COLUMN: ray.get_runtime_context().get_node_id()})
    return recorded


def collect_with_progress(dataset: ray.data.Dataset, label: str, total: int, unit: str,
                          count: Callable[[pd.DataFrame], int] = len) -> pd.DataFrame:
    """The dataset as one DataFrame (what to_pandas gives), printing `label: done/total unit` at
    least every PROGRESS_SECONDS while it streams, and at the end (Ray's own progress bars are off
    when the log is not a terminal). count(batch): how many units a batch completes. The nodes
    that ran an `on_record` function's tasks go to the stage's MLflow run as `ray.nodes.{label}`."""
    parts, done, last_line, nodes = [], 0, time.monotonic(), set()
    for batch in dataset.iter_batches(batch_format="pandas", batch_size=None):
        if NODE_COLUMN in batch:
            nodes.update(batch.pop(NODE_COLUMN))
        parts.append(batch)
        done += count(batch)
        if time.monotonic() - last_line >= PROGRESS_SECONDS:
            print(f"{label}: {done}/{total} {unit}", flush=True)
            last_line = time.monotonic()
    print(f"{label}: {done}/{total} {unit}, all done", flush=True)
    if nodes:
        from tasks.operations.lineage import tag_stage_run

        tag_stage_run({f"ray.nodes.{label}": ",".join(sorted(nodes))})
    return pd.concat(parts, ignore_index=True) if parts else dataset.to_pandas().drop(columns=[NODE_COLUMN], errors="ignore")
