"""Training curves as files DVC plots: per training run, RUN.csv (step, the total loss and every
`loss/...` part from the run's whole MLflow history, resumed attempts included) for
`dvc plots show/diff`, and one loss.png per stage drawn with matplotlib. DVC draws CSV plots with
Vega loaded from a CDN, so its HTML page shows nothing offline; an image shows everywhere."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient

from tasks.operations.lineage import tracking_uri
from tasks.storage.atomic import atomic_path

# logged under loss/ but not loss terms: the discriminator's logits and the adaptive GAN weight
NOT_LOSS_TERMS = ("logits", "weight")


def loss_history(client: MlflowClient, run_id: str) -> pd.DataFrame:
    """One row per step: `loss` and the run's `loss/...` terms (a term logged from a later step,
    such as the adversarial loss after disc_start, is empty before it)."""
    keys = [key for key in client.get_run(run_id).data.metrics if key == "loss" or (key.startswith("loss/") and not any(word in key for word in NOT_LOSS_TERMS))]
    columns = {key: pd.Series({metric.step: metric.value for metric in client.get_metric_history(run_id, key)}) for key in sorted(keys)}
    frame = pd.DataFrame(columns).sort_index()
    frame.index.name = "step"
    return frame.reset_index()


def write_loss_curves(runs: dict[str, str], folder: Path, title: str) -> None:
    """runs: label -> MLflow run id. Writes folder/LABEL.csv per run and folder/loss.png (a row
    per run: the total loss beside its terms)."""
    client = MlflowClient(tracking_uri())
    histories = {label: loss_history(client, run_id) for label, run_id in runs.items()}
    folder.mkdir(parents=True, exist_ok=True)
    for label, history in histories.items():
        with atomic_path(folder / f"{label}.csv") as tmp:
            history.to_csv(tmp, index=False)
    with_terms = any(key.startswith("loss/") for history in histories.values() for key in history.columns)
    columns = 2 if with_terms else 1
    figure = Figure(figsize=(5 * columns, 3.2 * len(histories)), layout="constrained")
    figure.suptitle(title)
    for row, (label, history) in enumerate(histories.items()):
        window = max(1, len(history) // 50)  # the trend through per-batch noise
        total = figure.add_subplot(len(histories), columns, columns * row + 1)
        total.plot(history["step"], history["loss"], linewidth=0.6, alpha=0.5, label="per step")
        total.plot(history["step"], history["loss"].rolling(window, min_periods=1).mean(), linewidth=1.5, label=f"mean of {window}")
        total.set(title=f"{label}: loss", xlabel="step")
        total.legend()
        if with_terms:
            terms = figure.add_subplot(len(histories), columns, columns * row + 2)
            for key in (key for key in history.columns if key.startswith("loss/")):
                terms.plot(history["step"], history[key].rolling(window, min_periods=1).mean(), label=key.removeprefix("loss/"))
            # symlog: the terms differ by orders of magnitude (eq. 9's consistency term ~150 beside
            # an L1 of ~0.1, before weighting) and the hinge generator loss goes negative
            terms.set_yscale("symlog", linthresh=0.1)
            terms.set(title=f"{label}: terms, unweighted (mean of {window})", xlabel="step")
            terms.legend()
    with atomic_path(folder / "loss.png") as tmp:
        figure.savefig(tmp, format="png", dpi=90)
