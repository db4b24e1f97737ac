"""The retrain flow's decisions: new rows join the prepare stage's CSV, nothing changed means no
promotion attempt, and a better or worse evaluation moves (or keeps) the champion alias; and
`versvideo serve` registers it as a scheduled deployment whose runs a Prefect server hands it."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

import flows.retrain as retrain_module
from tasks.operations.lineage import start_run, tracking_uri
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
    with pytest.raises(ValueError, match=r"'heldout/fid' is not in metrics/eval.json; it has heldout/fvd$"):
        eval_metric(report, "heldout/fid")


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setattr(retrain_module, "create_markdown_artifact", lambda *args, **kwargs: None)  # no Prefect API in .fn calls
    for name in ("unet", "decoder"):
        (tmp_path / "models" / name).mkdir(parents=True)
        (tmp_path / "models" / name / "config.json").write_text("{}")
        (tmp_path / "models" / name / "model.safetensors").write_bytes(name.encode())
    (tmp_path / "metrics").mkdir()
    return tmp_path


def finish_evaluation(folder, fvd: float) -> None:
    """What a pipeline run leaves behind: an evaluation run and metrics/eval.json."""
    client = MlflowClient(tracking_uri())
    run_id = start_run(client, tracking_uri(), "evaluate-smoke", {})
    (folder / "metrics" / "eval.json").write_text(json.dumps({"mlflow_run_id": run_id, "protocols": {"heldout": {"fvd": fvd}}}))


def test_retrain_promotes_only_a_better_model(project, monkeypatch):
    outcomes = iter([("ran", 50.0), ("ran", 60.0), ("idle", None), ("ran", 40.0)])

    def fake_pipeline(force=None):
        kind, fvd = next(outcomes)
        if fvd is not None:
            finish_evaluation(project, fvd)
        return [{"stage": "evaluate", "ran": kind == "ran", "seconds": 1.0}]

    monkeypatch.setattr(retrain_module, "pipeline", fake_pipeline)
    first = retrain_module.retrain.fn()
    assert first["promoted"] and "no champion yet" in first["reason"]
    worse = retrain_module.retrain.fn()
    assert not worse["promoted"] and "does not beat champion version 1's 50" in worse["reason"]
    idle = retrain_module.retrain.fn()
    assert not idle["promoted"] and idle["reason"].startswith("nothing changed")
    better = retrain_module.retrain.fn()
    assert better["promoted"] and better["version"] == "3"
    assert str(MlflowClient(tracking_uri()).get_model_version_by_alias("versvideo", "champion").version) == "3"


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
