"""The retrain flow: new rows join the prepare stage's CSV and force prepare, its promotion rule
goes to the pipeline (which registers the model) and its decision is reported; and `versvideo
serve` registers it as a scheduled deployment whose runs a Prefect server hands it."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

import flows.retrain as retrain_module
from tasks.operations.promotion import eval_metric
from tasks.preprocessing.incoming import append_new_rows

HEADER = "videoid,contentUrl,duration,page_dir,name\n"


def test_new_rows_join_the_csv_once(tmp_path):
    target, incoming = tmp_path / "webvid.csv", tmp_path / "new.csv"
    target.write_text(HEADER + "1,u,PT00H00M10S,a,a red ball\n")
    incoming.write_text(HEADER + "1,u,PT00H00M10S,a,a red ball\n2,u,PT00H00M12S,a,a blue cube\n")
    assert append_new_rows(incoming, target) == 1
    assert append_new_rows(incoming, target) == 0  # the same file again adds nothing
    assert pd.read_csv(target)["videoid"].tolist() == [1, 2]
    (tmp_path / "bad.csv").write_text("id,caption\n1,x\n")
    with pytest.raises(ValueError, match="missing column"):
        append_new_rows(tmp_path / "bad.csv", target)


def test_eval_metric_names_what_exists():
    report = {"protocols": {"heldout": {"fvd": 12.5, "comparable": False, "protocol": {}}}}
    assert eval_metric(report, "heldout/fvd") == 12.5
    with pytest.raises(ValueError, match=r"'heldout/fid' is not in reports/eval.json; it has heldout/fvd$"):
        eval_metric(report, "heldout/fid")


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(retrain_module, "create_markdown_artifact", lambda *args, **kwargs: None)  # no Prefect API in .fn calls
    return tmp_path


def test_retrain_hands_its_promotion_rule_to_the_pipeline_and_reports_its_decision(project, monkeypatch):
    """The pipeline registers and promotes (tests/tasks/test_generate.py runs that on a real
    MLflow server); retrain passes its rule, forces prepare when rows arrived, and reports."""
    (project / "params.yaml").write_text(f"preset: smoke\nprepare:\n  source: webvid\n  webvid_csv: {project / 'webvid.csv'}\n")
    (project / "webvid.csv").write_text(HEADER + "1,u,PT00H00M10S,a,a red ball\n")
    (project / "new.csv").write_text(HEADER + "2,u,PT00H00M12S,a,a blue cube\n")
    calls, outcomes = [], iter([{"version": "4", "promoted": False, "reason": "does not beat champion version 3's 0.3"}, None])

    def fake_pipeline(**kwargs):
        calls.append(kwargs)
        promotion = next(outcomes)
        return [{"stage": "evaluate", "ran": promotion is not None, "seconds": 1.0, **({"promotion": promotion} if promotion else {})}]

    monkeypatch.setattr(retrain_module, "pipeline", fake_pipeline)
    first = retrain_module.retrain.fn(new_csv=str(project / "new.csv"), metric="heldout/clipsim", lower_is_better=False, model_name="m")
    assert calls[0] == {"force": ["prepare"], "metric": "heldout/clipsim", "lower_is_better": False, "model_name": "m"}
    assert first == {"added_rows": 1, "promoted": False, "reason": "does not beat champion version 3's 0.3", "version": "4"}
    idle = retrain_module.retrain.fn()
    assert calls[1]["force"] is None and not idle["promoted"] and idle["reason"].startswith("nothing changed")


def test_retrain_with_new_data_needs_a_webvid_source(project):
    (project / "params.yaml").write_text("preset: smoke\n")  # the synthetic source
    (project / "new.csv").write_text(HEADER)
    with pytest.raises(ValueError, match="needs prepare.source: webvid"):
        retrain_module.retrain.fn(new_csv=str(project / "new.csv"))


def test_serve_registers_the_cron_deployment_and_runs_what_the_server_hands_it(tmp_path, prefect_api):
    """`versvideo serve` against a real Prefect server: the deployment carries the cron schedule
    and the command's parameters, and a run created on the server is executed by the served
    process (here one that stops at once with retrain's own clear error: no WebVid source)."""
    (tmp_path / "params.yaml").write_text("preset: smoke\n")
    (tmp_path / "new.csv").write_text(HEADER)
    env = {**os.environ, **prefect_api, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    command = ["versvideo", "serve", "--cron", "0 3 * * *", "--new-csv", str(tmp_path / "new.csv"), "--metric", "heldout/clipsim", "--higher-is-better"]
    log = tmp_path / "serve.log"
    served = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        with temporary_settings({PREFECT_API_URL: prefect_api["PREFECT_API_URL"]}), get_client(sync_client=True) as prefect:
            deployment = until(lambda: prefect.read_deployment_by_name("versvideo-retrain/versvideo-retrain"), served, log)
            assert [schedule.schedule.cron for schedule in deployment.schedules] == ["0 3 * * *"]
            assert deployment.parameters == {"new_csv": str(tmp_path / "new.csv"), "metric": "heldout/clipsim", "lower_is_better": False, "model_name": "versvideo"}
            created = prefect.create_flow_run_from_deployment(deployment.id)
            state = until(lambda: final_state(prefect.read_flow_run(created.id)), served, log)
            assert state.type.value == "FAILED" and "needs prepare.source: webvid" in state.message, state.message
    finally:
        served.terminate()
        served.wait(timeout=60)


def final_state(flow_run):
    if not flow_run.state or not flow_run.state.is_final():
        raise LookupError(f"flow run {flow_run.id} is {flow_run.state.type.value if flow_run.state else 'new'}")
    return flow_run.state


def until(read, process: subprocess.Popen, log: Path, timeout: float = 120):
    """`read()` once it stops raising (the served process has had time to act); fails early if
    the process exits, with its log."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return read()
        except Exception:
            assert process.poll() is None, log.read_text()[-3000:]
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
