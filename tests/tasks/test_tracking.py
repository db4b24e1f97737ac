"""Rank 0's MLflow buffer and progress line: flushed as often as a progress line is printed, and
still no step logged twice when a resumed attempt redoes steps an earlier attempt flushed."""

import re
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


def test_progress_lines_come_first_then_on_their_cadence_and_at_the_end():
    progress = Progress("train_unet", total_steps=100, first_step=0, every_s=3600)
    assert progress.due(1)
    line = progress.line(1, 0.5, 12.0)
    assert re.fullmatch(r"train_unet: step 1/100  loss 0\.5000  12\.0 samples/s  ETA \d+m\d\ds", line)
    assert not progress.due(2) and progress.due(100)
    assert Progress("x", 10, 0, every_s=0).due(5)
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
