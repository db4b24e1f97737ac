"""Scheduled retraining: take new data, run the pipeline, promote the model only if it is better.

    versvideo serve --cron "0 3 * * *" [--new-csv PATH] [--metric heldout/fvd]

serves this flow as a Prefect deployment on that schedule. Each run:
1. appends the rows of `new_csv` (a WebVid CSV, new or a grown copy) to the CSV that
   `prepare.webvid_csv` names, keeping the last row of a repeated videoid as prepare does;
2. runs the pipeline flow; `prepare` is forced when rows arrived (the CSV lives outside DVC), and
   DVC reruns whatever depends on what changed;
3. when evaluate ran, the pipeline registers the evaluated model and moves the registry's
   `champion` alias only if `metric` (PROTOCOL/KEY of reports/eval.json) beats the champion's; the
   decision and the reason go to the model version, the evaluation run and a Markdown artifact.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.pipeline import pipeline
from tasks.config.params import load_params
from tasks.preprocessing.incoming import append_new_rows


@flow(name="versvideo-retrain")
def retrain(new_csv: str = "", metric: str = "heldout/fvd", lower_is_better: bool = True, model_name: str = "versvideo") -> dict[str, Any]:
    added = 0
    if new_csv:
        params = load_params()
        if params.prepare.source != "webvid" or not params.prepare.webvid_csv:
            raise ValueError("retrain with new data needs prepare.source: webvid and prepare.webvid_csv in params.yaml (the CSV the new rows join)")
        added = append_new_rows(new_csv, params.prepare.webvid_csv)
    results = pipeline(force=["prepare"] if added else None, metric=metric, lower_is_better=lower_is_better, model_name=model_name)
    promotion = next((result["promotion"] for result in results if "promotion" in result), None)
    if promotion is None:
        outcome = {"added_rows": added, "promoted": False, "reason": "nothing changed: evaluate was up to date, no new model to compare"}
    else:
        outcome = {"added_rows": added, "promoted": promotion["promoted"], "reason": promotion["reason"], "version": promotion["version"]}
    create_markdown_artifact(
        f"# VersVideo retrain\n\n- new rows: {added}\n- promoted: **{outcome['promoted']}**\n- why: {outcome['reason']}\n",
        key="versvideo-retrain-decision", description="promotion decision",
    )
    return outcome
