"""The pipeline as a Prefect flow: one task per DVC stage, in dvc.yaml's order.

Each task runs `dvc repro --single-item STAGE`, so DVC alone decides whether the stage is stale
(a rerun with nothing changed does no stage work) and records it in dvc.lock. Prefect adds what
DVC lacks: retries of a failed stage, logs and timings per stage, and a Markdown summary of the
run. Heavy work stays inside the stages (Ray Data / Ray Train, on RAY_ADDRESS or a local Ray);
Prefect is only the control plane, so it runs in ephemeral mode by default or against
PREFECT_API_URL.

Lineage (tasks/operations/lineage.py): one parent MLflow run per pipeline run, one nested run per stage
(timing, whether DVC ran it, dvc.lock dependency hashes as tags and as dataset inputs, the
stage's metrics files), with the stages' own training and evaluation runs nested below those;
dvc.lock itself is logged on the parent run at the end.

Registration: when `evaluate` ran, the evaluated models are logged as one pyfunc video model on
the evaluation's run and registered; the registry's `champion` alias moves to the new version only
if `metric` (PROTOCOL/KEY of reports/eval.json) beats the champion's (tasks/operations/promotion.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from mlflow import MlflowClient
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from tasks.config.params import flatten, load_params, params_to_dict
from tasks.config.paths import CONTROLNET, DECODER, EVAL_REPORT, LATENTS, PIPELINE_SUMMARY, UNET
from tasks.operations.lineage import (
    EXPERIMENT, PARENT_RUN_ENV, git_commit, log_params, record_stage, start_run, tracking_uri, ui_route,
)
from tasks.storage.atomic import atomic_path

MODEL_FOLDERS = {"unet": UNET, "decoder": DECODER, "controlnet": CONTROLNET}
ABLATION_DVC = Path("ablation/dvc.yaml")  # the ablation study's pipeline file: never part of a `dvc repro` of dvc.yaml


class StageFailed(RuntimeError):
    def __init__(self, stage: str, returncode: int, lines: list[str]) -> None:
        tail = "\n".join(lines[-15:])
        super().__init__(f"stage {stage!r} failed (exit {returncode}); fix the cause and rerun `versvideo pipeline` to resume from it. Last output:\n{tail}")
        self.stage = stage
        # `versvideo: ...` is a stage's own clear error about its input (bad params, missing weights
        # or data): the same again on a retry. Anything else (a killed worker, a lost Ray node) may pass.
        self.transient = not any(line.startswith("versvideo: ") for line in lines)


def retry_if_transient(task, task_run, state) -> bool:
    error = state.result(raise_on_failure=False)
    return not isinstance(error, StageFailed) or error.transient


def dvc_stages(dvc_yaml: Path = Path("dvc.yaml")) -> list[str]:
    """Stage names in dvc.yaml's order (each stage comes after the stages it depends on)."""
    return list(yaml.safe_load(dvc_yaml.read_text())["stages"])


def dvc_environment() -> dict[str, str]:
    """This process's environment for a `dvc repro`: dvc.yaml's commands call `versvideo`, this
    environment's, also when it was started as .venv/bin/versvideo (or by a scheduler) without the
    environment's bin/ on PATH."""
    return {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}


def reproduce_ablation(force: bool = False) -> int:
    """`dvc repro ablation/dvc.yaml`: the upstream stages it needs when they are stale, then the
    ablation stage (force: that stage again, alone); DVC's output streams through. Returns its exit code."""
    target = [f"{ABLATION_DVC}:ablation", "--force", "--single-item"] if force else [str(ABLATION_DVC)]
    return subprocess.call([sys.executable, "-m", "dvc", "repro", *target], env=dvc_environment())


@task(task_run_name="{stage}", retries=1, retry_delay_seconds=10, retry_condition_fn=retry_if_transient)
def run_stage(stage: str, parent_run_id: str, force: bool = False) -> dict[str, Any]:
    """`dvc repro` one stage under its own nested MLflow run; returns its timing and whether it ran.
    force: run it even if DVC finds it up to date (its input lives outside DVC, e.g. a user CSV)."""
    logger = get_run_logger()
    client, uri = MlflowClient(tracking_uri()), tracking_uri()
    run_id = start_run(client, uri, f"stage:{stage}", {"git_commit": git_commit(), "prefect.flow_run_id": str(flow_run.id or "")}, parent=parent_run_id)
    env = {**dvc_environment(), PARENT_RUN_ENV: run_id, "PREFECT__FLOW_RUN_ID": str(flow_run.id or "")}
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "--single-item", *(["--force"] if force else []), stage], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines = []
    for line in process.stdout:
        lines.append(line.rstrip())
        logger.info(line.rstrip())
    returncode = process.wait()
    seconds = round(time.perf_counter() - started, 1)
    ran = any(line.startswith(f"Running stage '{stage}'") for line in lines)
    if returncode != 0:
        client.set_terminated(run_id, status="FAILED")
        raise StageFailed(stage, returncode, lines)
    record_stage(client, run_id, stage, seconds, ran)
    client.set_terminated(run_id)
    return {"stage": stage, "seconds": seconds, "ran": ran, "mlflow_run_id": run_id}


@task(task_run_name="register")
def register_model(metric: str, lower_is_better: bool, model_name: str) -> dict[str, Any]:
    """Register the models just evaluated; the decision (promoted or not, and why) is returned and
    tagged on the version and the evaluation run."""
    # imported here: they load torch and Ray, which the flow's own process needs for nothing else
    from tasks.inference.encoders import resolved_encoders
    from tasks.operations.promotion import eval_metric, log_video_model, promote_if_better

    report = json.loads(EVAL_REPORT.read_text())
    client = MlflowClient(tracking_uri())
    run_id = report["mlflow_run_id"]
    text_weights = resolved_encoders(LATENTS, load_params().cache_latents).text_weights  # the one the cache was made with
    source = log_video_model(client, run_id, MODEL_FOLDERS, LATENTS, text_weights)
    decision = promote_if_better(client, model_name, run_id, source, metric, eval_metric(report, metric), lower_is_better)
    get_run_logger().info(f"registered {model_name} version {decision.candidate_version}: {decision.reason}")
    return {"model": model_name, "version": decision.candidate_version, "promoted": decision.promoted, "reason": decision.reason}


def summary_markdown(results: list[dict[str, Any]], failed: str | None, parent_run_id: str, experiment: str) -> str:
    rows = [f"| {r['stage']} | {'ran' if r['ran'] else 'up to date'} | {r['seconds']:.1f} |" for r in results]
    if failed:
        rows.append(f"| {failed} | **failed** | |")
    return "\n".join([
        "# VersVideo pipeline", "",
        f"MLflow parent run: `{parent_run_id}` (experiment `{EXPERIMENT}`); in the MLflow UI: "
        f"`{ui_route(experiment)}` (runs table, stage runs nested), `{ui_route(experiment, parent_run_id)}` (this run)", "",
        "| stage | status | seconds |", "|---|---|---|", *rows, "",
        f"Total: {sum(r['seconds'] for r in results):.1f} s. Metrics: `dvc metrics show`; evaluation: `reports/eval.json`.",
    ])


@flow(name="versvideo-pipeline")
def pipeline(stages: list[str] | None = None, force: list[str] | None = None, metric: str = "heldout/fvd", lower_is_better: bool = True,
             model_name: str = "versvideo") -> list[dict[str, Any]]:
    """Run (or resume) the pipeline; `stages` limits it to those names (still in dvc.yaml's order),
    `force` names stages to run even when DVC finds them up to date. When evaluate ran, its result
    carries `promotion`: the registration's outcome (see register_model)."""
    order = dvc_stages()
    unknown = sorted(set(stages or []).union(force or []) - set(order))
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(unknown)}; dvc.yaml has {', '.join(order)}")
    selected = [stage for stage in order if not stages or stage in stages]
    client, uri = MlflowClient(tracking_uri()), tracking_uri()
    parent = start_run(client, uri, "pipeline", {"git_commit": git_commit(), "prefect.flow_run_id": str(flow_run.id or ""), "stages": ",".join(selected)})
    log_params(client, parent, flatten(params_to_dict(load_params())))  # the values this run's stages read, in the runs table
    results, failed = [], None
    try:
        for stage in selected:
            failed = stage  # until it returns
            results.append(run_stage(stage, parent, force=stage in (force or [])))
            failed = None
        evaluated = next((result for result in results if result["stage"] == "evaluate" and result["ran"]), None)
        if evaluated is not None:
            evaluated["promotion"] = register_model(metric, lower_is_better, model_name)
    finally:
        if Path("dvc.lock").is_file():
            client.log_artifact(parent, "dvc.lock")
        client.set_terminated(parent, status="FAILED" if failed else "FINISHED")
        summary = summary_markdown(results, failed, parent, client.get_run(parent).info.experiment_id)
        create_markdown_artifact(summary, key="versvideo-pipeline-summary", description="stages, timings, MLflow run")
        with atomic_path(PIPELINE_SUMMARY) as tmp:  # the same summary where an ephemeral Prefect server's artifacts vanish with it
            tmp.write_text(summary)
    return results
