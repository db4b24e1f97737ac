"""Rank 0's MLflow buffer and progress line: flushed as often as a progress line is printed, and
still no step logged twice when a resumed attempt redoes steps an earlier attempt flushed."""

import itertools
import time

import pandas as pd
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from tasks.training import tracking
from tasks.training.curves import write_loss_curves
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


def test_loss_curves_hold_every_logged_loss_term_per_step_and_draw_an_image(tmp_path, monkeypatch):
    """plots/<stage>/: RUN.csv is the run's MLflow history of the loss and its terms (not the
    discriminator's logits), a term logged from a later step empty before it; loss.png is a PNG."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("curves")).info.run_id
    for step in range(1, 6):
        client.log_batch(run_id, metrics=[Metric("loss", 1.0 / step, 0, step), Metric("loss/l1", 0.5 / step, 0, step), Metric("lr", 1e-3, 0, step)]
                         + ([Metric("loss/generator", -0.1 * step, 0, step), Metric("loss/logits_fake", 2.0, 0, step)] if step >= 3 else []))
    write_loss_curves({"tcm_vae": run_id}, tmp_path / "plots", "a title")
    table = pd.read_csv(tmp_path / "plots" / "tcm_vae.csv")
    assert list(table.columns) == ["step", "loss", "loss/generator", "loss/l1"]
    assert table["step"].tolist() == [1, 2, 3, 4, 5] and table["loss"].tolist() == [1.0, 0.5, 1 / 3, 0.25, 0.2]
    assert table["loss/generator"].isna().tolist() == [True, True, False, False, False]
    assert (tmp_path / "plots" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_driver_says_what_it_waits_for_when_no_progress_line_came(tmp_path, capsys, monkeypatch):
    """No minute of a stage's log passes silent: while the workers start (before rank 0's first
    line) and between lines, the driver prints what it waits for every PROGRESS_SECONDS."""
    monkeypatch.setattr(tracking, "PROGRESS_SECONDS", 0.3)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("wait")).info.run_id
    with echo_progress(client, run_id, poll_s=0.05, label="train_unet-smoke-0123"):
        time.sleep(0.5)
        client.set_tag(run_id, PROGRESS_TAG, "train_unet: step 1/2")
        time.sleep(0.5)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("train_unet-smoke-0123: waiting for the workers to start and take their first step (")
    assert "train_unet: step 1/2" in lines and lines.index("train_unet: step 1/2") >= 1
    assert lines[-1].startswith("train_unet-smoke-0123: waiting for the next progress line from rank 0")
