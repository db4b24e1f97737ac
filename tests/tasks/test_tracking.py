"""Rank 0's MLflow buffer and progress line: flushed as often as a progress line is printed, and
still no step logged twice when a resumed attempt redoes steps an earlier attempt flushed."""

import itertools
import time

from mlflow.tracking import MlflowClient

from tasks.training.engine import Setup, run_label
from tasks.training.tracking import PROGRESS_TAG, MetricBuffer, Progress, echo_progress


def test_a_resumed_attempt_logs_no_step_mlflow_already_has(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("buffer")).info.run_id
    setup = Setup(train=None, output_dir=str(tmp_path), tracking_uri=uri, mlflow_run_id=run_id)

    first = MetricBuffer(setup)
    first.recover([])
    for step in range(1, 8):  # flushed by progress lines up to step 7, then the attempt dies
        first.add(step, {"loss": 1.0 / step})
    first.flush()

    resumed = MetricBuffer(setup)  # restarted from a checkpoint at step 5 whose steps 4-5 were never flushed
    resumed.recover([["loss", 0.25, 0, 4], ["loss", 0.2, 0, 5]])
    for step in range(6, 11):
        resumed.add(step, {"loss": 1.0 / step})
    resumed.flush()
    steps = sorted(metric.step for metric in client.get_metric_history(run_id, "loss"))
    assert steps == list(range(1, 11))


def test_progress_lines_come_first_then_on_their_cadence_and_at_the_end(monkeypatch):
    clock = itertools.chain([0.0, 10.0, 10.0, 50.0], itertools.repeat(60.0))  # construction, line 1 (step 1), due(2), line 2 (step 5)
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))
    progress = Progress("train_unet", total_steps=101, every_s=30)
    assert progress.due(1)
    assert progress.line(1, 0.5, 12.0) == "train_unet: step 1/101  loss 0.5000  12.0 samples/s"  # no pace yet: no ETA
    assert not progress.due(2) and progress.due(101)
    # 4 steps in 40 s since the first line: 10 s a step, 96 steps left
    assert progress.line(5, 0.25, 12.0) == "train_unet: step 5/101  loss 0.2500  12.0 samples/s  ETA 16m00s"
    assert Progress("x", 10, every_s=0).due(5)
    assert run_label("/runs/train_decoder-image_decoder_finetuned-smoke-0123abcdef") == "train_decoder-image_decoder_finetuned"


def test_the_driver_echoes_each_new_progress_line_once(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("echo")).info.run_id
    with echo_progress(client, run_id, poll_s=0.05):
        for step in (1, 2):
            client.set_tag(run_id, PROGRESS_TAG, f"train_unet: step {step}/2")
            time.sleep(0.5)
    assert capsys.readouterr().out.splitlines() == ["train_unet: step 1/2", "train_unet: step 2/2"]
