"""Connecting to Ray: an existing cluster when RAY_ADDRESS is set, else a local one."""

from __future__ import annotations

import os
import sys

import ray

from tasks.lineage import tag_stage_run


def ensure_ray() -> None:
    """Start (or join) Ray once per process; stages call this before any Ray Data work."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        # The cluster's workers must have this project installed (same uv.lock), like the driver.
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    else:
        # "local": a new Ray of our own. ray.init() alone would join the cluster of the machine's
        # last `ray start` (/tmp/ray/ray_current_cluster), or hang on it if it has since stopped.
        ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = sys.stderr.isatty()
    runtime = ray.get_runtime_context()  # in a pipeline stage, its MLflow run says which cluster did the work
    tag_stage_run({"ray.address": runtime.gcs_address, "ray.node_id": runtime.get_node_id(), "ray.job_id": runtime.get_job_id()})
