"""Promotion: register an evaluated model in the MLflow registry and move the `champion` alias to it
only when its evaluation is better on the configured metric.

The registered version is the pyfunc video model (tasks/inference/video_model.py) with its
weights inside, so `mlflow.pyfunc.load_model("models:/versvideo@champion")` generates on any
machine that reaches the tracking server. Every version records the decision and the reason as
tags, whether or not the alias moved.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tasks.inference.video_model import save_video_model

ALIAS = "champion"
MODEL_ARTIFACT = "video_model"


@dataclass(frozen=True)
class Decision:
    promoted: bool
    reason: str
    metric: str
    candidate_version: str
    candidate_value: float
    champion_version: str | None
    champion_value: float | None


def log_video_model(client: MlflowClient, run_id: str, folders: dict[str, Path], cache: Path, text_weights: str = "") -> str:
    """Log the pyfunc video model of `folders` (unet, decoder, controlnet) under the run's
    `video_model/`; returns its URI, the source a registered version points at."""
    with tempfile.TemporaryDirectory() as staging:
        save_video_model(Path(staging) / MODEL_ARTIFACT, folders, cache, text_weights)
        client.log_artifacts(run_id, str(Path(staging) / MODEL_ARTIFACT), MODEL_ARTIFACT)
    return f"{client.get_run(run_id).info.artifact_uri}/{MODEL_ARTIFACT}"


def champion(client: MlflowClient, name: str, metric: str) -> tuple[str | None, float | None]:
    try:
        version = client.get_model_version_by_alias(name, ALIAS)
    except MlflowException:  # no registered model or no alias yet
        return None, None
    value = version.tags.get(f"eval.{metric}")
    return str(version.version), float(value) if value is not None else None


def promote_if_better(client: MlflowClient, name: str, run_id: str, source: str, metric: str, value: float, lower_is_better: bool) -> Decision:
    """Register `source` (from `run_id`) as a new version of `name`; move `champion` to it when
    `value` beats the champion's (or there is no champion). The decision is tagged on the version."""
    if not math.isfinite(value):
        raise ValueError(f"promotion: {metric} = {value} is not a finite number; the evaluation is broken")
    champion_version, champion_value = champion(client, name, metric)
    try:
        client.create_registered_model(name)
    except MlflowException:
        pass  # it exists
    version = client.create_model_version(name, source, run_id=run_id, tags={f"eval.{metric}": repr(value)}).version
    direction = "lower" if lower_is_better else "higher"
    if champion_version is None or champion_value is None:
        promoted, reason = True, f"no {ALIAS} yet (or it has no {metric}): version {version} becomes {ALIAS}"
    elif (value < champion_value) if lower_is_better else (value > champion_value):
        promoted, reason = True, f"{metric} {value:.6g} beats {ALIAS} version {champion_version}'s {champion_value:.6g} ({direction} is better)"
    else:
        promoted, reason = False, f"{metric} {value:.6g} does not beat {ALIAS} version {champion_version}'s {champion_value:.6g} ({direction} is better); {ALIAS} stays"
    if promoted:
        client.set_registered_model_alias(name, ALIAS, version)
    decision = Decision(promoted, reason, metric, str(version), value, champion_version, champion_value)
    for key, tag in (("promotion.promoted", str(promoted).lower()), ("promotion.reason", reason)):
        client.set_model_version_tag(name, version, key, tag)
    client.set_tag(run_id, "promotion.decision", json.dumps(asdict(decision)))
    return decision


def eval_metric(report: dict[str, Any], metric: str) -> float:
    """`heldout/fvd` -> report['protocols']['heldout']['fvd']."""
    protocol, _, key = metric.partition("/")
    try:
        return float(report["protocols"][protocol][key])
    except (KeyError, TypeError, ValueError):
        known = [f"{name}/{k}" for name, figures in report.get("protocols", {}).items() for k, v in figures.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        raise ValueError(f"metric {metric!r} is not in reports/eval.json; it has {', '.join(known)}") from None
