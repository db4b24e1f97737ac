"""Lineage tags every MLflow run carries: the code version, the DVC hashes of the stage's data
inputs (from dvc.lock) and the Prefect flow run that ran it, when there is one."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def dvc_dep_hashes(stage: str, lock: Path = Path("dvc.lock")) -> dict[str, str]:
    """{dep path: md5} of `stage` as dvc.lock recorded it (empty before the first `dvc repro`)."""
    if not lock.exists():
        return {}
    stage_lock = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).get(stage, {})
    return {dep["path"]: str(dep.get("md5") or dep.get("hash") or "") for dep in stage_lock.get("deps", []) if not dep["path"].endswith(".py")}


def lineage_tags(stage: str) -> dict[str, str]:
    tags = {"versvideo.stage": stage, "git_commit": git_commit()}
    tags.update({f"dvc.dep.{path}": digest for path, digest in dvc_dep_hashes(stage).items()})
    flow_run = os.environ.get("PREFECT__FLOW_RUN_ID")  # set by Prefect for the flow run that launched the stage
    if flow_run:
        tags["prefect.flow_run_id"] = flow_run
    return tags
