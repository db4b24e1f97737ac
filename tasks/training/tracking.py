"""MLflow for training runs: the driver creates (or, after a crash, reuses) the run and records
where the checkpoint and weights files are; rank 0 buffers per-step metrics and flushes them with
each progress line and right after each checkpoint is reported. A resumed run skips the steps
MLflow already has, so no step is logged twice."""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow.exceptions
import numpy as np
from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient

from model.weights import file_digest
from tasks.config.params import PROGRESS_SECONDS
from tasks.operations.lineage import log_params, start_run, tracking_uri
from tasks.storage import object_store

if TYPE_CHECKING:  # type hints only: the engine imports this module
    from tasks.training.engine import Setup


def group_metrics(prefix: str, values: dict[str, float]) -> dict[str, float]:
    """{'decoder': 1.0, 'discriminator': 2.0} -> grad_norm (the first group's), grad_norm/discriminator."""
    names = list(values)
    return {prefix if name == names[0] else f"{prefix}/{name}": value for name, value in values.items()}


WORKER_NODE_TAG = "ray.node_id.rank{rank}"


def record_worker_node(setup: Setup, rank: int, node_id: str) -> None:
    """Tag the run with the Ray node that worker `rank` runs on."""
    MlflowClient(setup.tracking_uri).set_tag(setup.mlflow_run_id, WORKER_NODE_TAG.format(rank=rank), node_id)


class MetricBuffer:
    """Rank 0's per-step metrics, held until the next flush (a progress line or a checkpoint)."""

    def __init__(self, setup: Setup) -> None:
        self.client = MlflowClient(setup.tracking_uri)
        self.run_id = setup.mlflow_run_id
        self.pending: list[Metric] = []
        self.logged_through = 0  # the last step MLflow had when this attempt started

    def add(self, step: int, values: dict[str, float]) -> None:
        if step <= self.logged_through:  # a resumed run redoing steps flushed before the crash
            return
        now = int(time.time() * 1000)
        for key, value in values.items():
            self.pending.append(Metric(key, float(value), now, step))

    def recover(self, saved: list[list]) -> None:
        """At the start of every attempt: log a resumed checkpoint's metrics that MLflow lacks (the
        crash may have come after the checkpoint was persisted but before its flush), and note the
        last step MLflow has, so the steps redone up to it are not logged again."""
        logged = {m.step for m in self.client.get_metric_history(self.run_id, "loss")}
        self.pending = [Metric(key, value, timestamp, step) for key, value, timestamp, step in saved if step not in logged]
        self.logged_through = max([*logged, *(metric.step for metric in self.pending)], default=0)
        self.flush()

    def flush(self) -> None:
        for start in range(0, len(self.pending), 1000):  # MLflow's batch limit
            self.client.log_batch(self.run_id, metrics=self.pending[start:start + 1000])
        self.pending = []


PROGRESS_TAG = "progress"  # rank 0's latest progress line, on the run: Ray does not forward workers' output (log_to_driver=False)


class Progress:
    """Rank 0's progress line: at the first step, then whenever `every_s` seconds have passed, and
    at the last step, so a long stage is never silent for a minute. The ETA comes from the pace
    since the first line (the first step also waits for the data pipeline to warm up)."""

    def __init__(self, label: str, total_steps: int, every_s: float = PROGRESS_SECONDS) -> None:
        self.label, self.total, self.every_s = label, total_steps, every_s
        self.first: tuple[float, int] | None = None  # (time, step) of the first line
        self.last = time.monotonic()

    def due(self, step: int) -> bool:
        return self.first is None or step == self.total or time.monotonic() - self.last >= self.every_s

    def line(self, step: int, loss: float, samples_per_s: float) -> str:
        now = time.monotonic()
        self.last = now
        text = f"{self.label}: step {step}/{self.total}  loss {loss:.4f}  {samples_per_s:.1f} samples/s"
        if self.first is None:
            self.first = (now, step)
        elif step > self.first[1]:
            left = round((now - self.first[0]) / (step - self.first[1]) * (self.total - step))
            text += f"  ETA {left // 60}m{left % 60:02d}s"
        return text


@contextlib.contextmanager
def echo_progress(client: MlflowClient, run_id: str, poll_s: float = 10.0, label: str = "training") -> Iterator[None]:
    """On the driver, while a fit runs: print rank 0's progress line whenever it changes, and a
    line saying what it waits for when none came for PROGRESS_SECONDS (the workers starting and
    the first step take a minute on 2 cores). The workers' own output stays in Ray's logs (on a
    cluster they run on other machines)."""
    stop = threading.Event()

    def echo() -> None:
        shown, started, last_line = None, time.monotonic(), time.monotonic()
        while not stop.wait(poll_s):
            with contextlib.suppress(mlflow.exceptions.MlflowException, OSError):  # a slow tracking server: try again next poll
                line = client.get_run(run_id).data.tags.get(PROGRESS_TAG)
                if line and line != shown:
                    print(line, flush=True)
                    shown, last_line = line, time.monotonic()
            if time.monotonic() - last_line >= PROGRESS_SECONDS:
                waiting = "the workers to start and take their first step" if shown is None else "the next progress line from rank 0"
                print(f"{label}: waiting for {waiting} ({time.monotonic() - started:.0f} s since the run started)", flush=True)
                last_line = time.monotonic()

    thread = threading.Thread(target=echo, name="echo-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def history_summary(run_id: str) -> dict[str, float]:
    """From the run's whole MLflow history (all attempts): first and last 10% loss averages and
    the mean throughput figures (step 1, which pays the warm-up, left out)."""
    client = MlflowClient(tracking_uri())

    def values(key: str) -> list[float]:
        return [metric.value for metric in sorted(client.get_metric_history(run_id, key), key=lambda metric: metric.step)]

    losses = values("loss")
    out: dict[str, float] = {}
    if losses:
        tenth = max(1, len(losses) // 10)
        out.update(loss_first_10pct=float(np.mean(losses[:tenth])), loss_last_10pct=float(np.mean(losses[-tenth:])), logged_steps=len(losses))
    for key in ("samples_per_s", "data_wait_share"):
        series = values(key)
        if series:
            out[f"mean_{key}"] = float(np.mean(series[1:] or series))
    skipped = values("skipped_steps")
    out["skipped_steps"] = int(skipped[-1]) if skipped else 0
    return out


def log_figures(run_id: str, figures: dict[str, float], step: int) -> None:
    """Figures measured after training (a check on held-out data) onto the training run, at its last step."""
    client = MlflowClient(tracking_uri())
    client.log_batch(run_id, metrics=[Metric(key, float(value), int(time.time() * 1000), step) for key, value in figures.items()])


def mlflow_run(uri: str, run_name: str, marker: str, params: dict[str, Any], tags: dict[str, str]) -> str:
    """The MLflow run of this training run: reused when the file at `marker` (in the run folder,
    local or in object storage) holds its id, as after a crash; else a new one, whose id goes there."""
    client = MlflowClient(uri)
    previous = object_store.read_text(marker)
    if previous:
        try:
            client.update_run(previous.strip(), status="RUNNING")
            return previous.strip()
        except mlflow.exceptions.MlflowException:  # the run lived in another tracking store: start a new one
            pass
    run_id = start_run(client, uri, run_name, tags)
    log_params(client, run_id, params)
    object_store.write_text(marker, run_id)
    return run_id


def record_files(client: MlflowClient, run_id: str, name: str, folder: str, pattern: str = "*") -> None:
    """Tags `{name}.path` and `{name}.sha256.{file}` for the files in `folder` (a local path or an
    object-store URI) matching `pattern`: MLflow records where the large files are and what they
    hold; the files stay where they are (on disk and in DVC, or in the bucket)."""
    names = object_store.file_names(folder, pattern)
    tags = {f"{name}.path": folder, **{f"{name}.sha256.{file}": object_store.sha256(object_store.join(folder, file)) for file in names}}
    client.log_batch(run_id, tags=[RunTag(key, value) for key, value in tags.items()])


def resumable_run_name(stage: str, preset: str, section: dict[str, Any], *inputs: Path, variant: str = "") -> str:
    """{stage}[-{variant}]-{preset}-{digest of the stage's params section and its input files}:
    rerunning after a crash resumes the same run; changed params or data start a new one (a run
    never resumes someone else's weights)."""
    digest = hashlib.sha256(json.dumps(section, sort_keys=True).encode())
    digest.update(file_digest(*inputs).encode())
    return "-".join(part for part in (stage, variant, preset, digest.hexdigest()[:10]) if part)
