"""Connecting to Ray: an existing cluster when RAY_ADDRESS is set, else a local one."""

from __future__ import annotations

import os
import sys

import ray


def ensure_ray() -> None:
    """Start (or join) Ray once per process; stages call this before any Ray Data work."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        # The cluster's workers must have this project installed (same uv.lock), like the driver.
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    else:
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = sys.stderr.isatty()
