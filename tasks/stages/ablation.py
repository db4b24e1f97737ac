"""Stage `ablation` (ablation/dvc.yaml; `versvideo ablation` runs it): the UNet ablations of the
paper's Tables 2 and 5, trained and scored by the pipeline's own stages.

Each row of ablation.rows is train_unet's recipe with the row's changes (tasks/config/params.py
ABLATION_ROWS: which MEC paths are on, how many experts each MoE-STA layer has), trained for
ablation.steps optimizer steps from each seed of ablation.seeds on the same latent cache. Every
row gets the same steps, data and seeds, so the rows differ only in their architecture. Its
merged export goes to models/ablation/ROW-seedN/unet/ (config.json records the architecture,
so `generate --unet` loads it as trained), and evaluate's protocols score it, decoded by the
trained TCM-VAE (models/decoder). The table, one row per ablation with the mean over seeds (and
the spread, max - min, with two or more seeds), goes to metrics/ablation.json (DVC metrics;
`comparable: false` on smoke, whose feature networks are random stand-ins) and with every run
id and protocol to reports/ablation.json.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric
from safetensors import safe_open

from eval.caption_probe import SWAPS
from tasks.config.params import ABLATION_ROWS, Params, flatten, params_to_dict
from tasks.config.paths import ABLATION, ABLATION_METRICS, ABLATION_REPORT, CLIPS, DECODER, LATENTS
from tasks.operations.lineage import lineage_tags, log_params, start_run, tracking_uri
from tasks.evaluation.scoring import evaluate
from tasks.training.unet import swap_gap_figures, swap_gap_name, train_unet
from tasks.storage.atomic import write_json

# The table's figures: name -> (evaluate protocol, key in its figures). Table 2 reports IS, FVD and
# frame consistency (FC), Table 5 IS and FVD; IS needs the ucf101 protocol (the UCF-101 C3D), and
# the demo world adds the prompt-following accuracies of the captions protocol.
FIGURES: dict[str, tuple[str, str]] = {
    "fvd": ("heldout", "fvd"),
    "frame_consistency": ("heldout", "frame_consistency"),
    "clipsim": ("heldout", "clipsim"),
    "is": ("ucf101", "is_mean"),
    "ucf101_fvd": ("ucf101", "fvd"),
    **{f"{attribute}_{group}": ("captions", f"{attribute}_accuracy_{group}") for group in ("unseen", "training") for attribute in ("color", "shape", "direction")},
}

READING_GAPS = tuple(swap_gap_name(word) for word in SWAPS)  # train_unet's caption-reading figures


def row_params(params: Params, row: str, seed: int) -> Params:
    """train_unet's section with the row's changes, ablation.steps and `seed` (the seed also draws
    the held-out videos, which evaluate's heldout protocol then scores)."""
    changes = {**ABLATION_ROWS[row], "steps": params.ablation.steps, "seed": seed}
    # The rows differ in the UNet only: one decoder (the TCM-VAE) scores them, no decoder table
    return dataclasses.replace(params, train_unet=dataclasses.replace(params.train_unet, **changes),
                               evaluate=dataclasses.replace(params.evaluate, decoder_table=""))


def parameter_count(weights: Path) -> int:
    """Parameters in a safetensors file (the merged export: what inference runs)."""
    with safe_open(str(weights), framework="pt") as tensors:
        return sum(math.prod(tensors.get_slice(name).get_shape()) for name in tensors.keys())


def run_row(params: Params, row: str, seed: int, folder: Path, clips: Path, latents: Path, decoder: Path) -> dict[str, Any]:
    """Train one row from one seed, score it; its record is also written to folder/result.json."""
    started = time.perf_counter()
    changed = row_params(params, row, seed)
    training = train_unet(changed, latents=latents, output_dir=folder / "unet", variant=f"ablation-{row}")
    report = evaluate(changed, clips=clips, latents=latents, unet=folder / "unet", decoder=decoder, plots=folder / "plots",
                      stats=folder.parent / "eval_stats", run_name=f"evaluate-ablation-{row}-seed{seed}-{params.preset}")
    protocols = report["protocols"]
    figures = {name: protocols[protocol][key] for name, (protocol, key) in FIGURES.items() if isinstance(protocols.get(protocol, {}).get(key), (int, float))}
    # which caption words the row's UNet reads (train_unet's swap check on the held-out clips; demo world only)
    figures.update(swap_gap_figures(training.get("caption_reading", {})))
    record = {
        "row": row, "seed": seed, "changes": ABLATION_ROWS[row],
        "architecture": {key: getattr(changed.train_unet, key) for key in ("mec_paths", "spatial_experts", "temporal_experts")},
        "parameters": parameter_count(folder / "unet" / "model.safetensors"),
        "loss": training.get("loss_last_10pct"), "steps": training["steps"],
        "figures": figures, "comparable": all(protocols[name]["comparable"] for name in protocols),
        "protocols": {name: figures_["protocol"] for name, figures_ in protocols.items()},
        "mlflow_run_ids": {"train_unet": training["mlflow_run_id"], "evaluate": report["mlflow_run_id"]},
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json(record, folder / "result.json")
    return record


def table(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per row: each figure's mean over the seeds, and with two or more seeds its spread (max - min)."""
    rows: dict[str, dict[str, float]] = {}
    for row in dict.fromkeys(record["row"] for record in records):
        mine = [record for record in records if record["row"] == row]
        values: dict[str, list[float]] = {"loss": [r["loss"] for r in mine if r["loss"] is not None]}
        for record in mine:
            for name, value in record["figures"].items():
                values.setdefault(name, []).append(float(value))
        rows[row] = {"parameters": mine[0]["parameters"]}
        for name, numbers in values.items():
            if numbers:
                rows[row][name] = round(sum(numbers) / len(numbers), 5)
                if len(mine) > 1:
                    rows[row][f"{name}_spread"] = round(max(numbers) - min(numbers), 5)
    return rows


def log_to_mlflow(report: dict[str, Any], params: Params) -> str:
    """One run holding the table: params, `{row}/{figure}` metrics, the report; each row's
    training and evaluate runs are named for the row."""
    uri = tracking_uri()
    client = MlflowClient(uri)
    run_id = start_run(client, uri, f"ablation-{params.preset}", lineage_tags("ablation"))
    log_params(client, run_id, flatten({"preset": params.preset, "ablation": params_to_dict(params)["ablation"]}))
    client.log_batch(run_id, metrics=[Metric(f"{row}/{name}", float(value), 0, 0) for row, figures in report["table"].items() for name, value in figures.items()])
    client.log_dict(run_id, report, "ablation.json")
    client.set_terminated(run_id)
    return run_id


def ablation(params: Params, clips: Path = CLIPS, latents: Path = LATENTS, decoder: Path = DECODER, output_dir: Path = ABLATION) -> dict[str, Any]:
    """Train and score every row for every seed; returns the report (table + per-run records)."""
    cfg = params.ablation
    clips, latents, decoder, output_dir = (path.resolve() for path in (clips, latents, decoder, output_dir))  # Ray workers may start elsewhere
    records = []
    for row in cfg.row_list:
        for seed in cfg.seed_list:
            print(f"ablation: row {row} ({ABLATION_ROWS[row] or 'the full model'}), seed {seed}: {cfg.steps} steps", flush=True)
            record = run_row(params, row, seed, output_dir / f"{row}-seed{seed}", clips, latents, decoder)
            records.append(record)
            shown = {"loss": record["loss"], **record["figures"]}
            print(f"ablation: {row}, seed {seed}: {record['parameters']:,} parameters; "
                  + ", ".join(f"{name} {value:.4g}" for name, value in shown.items() if value is not None) + f" ({record['seconds']:.0f} s)", flush=True)
    report = {
        "table": table(records), "runs": records, "steps": cfg.steps, "seeds": cfg.seed_list,
        "comparable": params.preset != "smoke" and all(record["comparable"] for record in records),
        "seconds": round(sum(record["seconds"] for record in records), 1),
    }
    report["mlflow_run_id"] = log_to_mlflow(report, params)
    return report


def main(params: Params) -> None:
    report = ablation(params)
    write_json(report, ABLATION_REPORT)
    write_json({"comparable": report["comparable"], "steps": report["steps"], "seeds": len(report["seeds"]), **report["table"]}, ABLATION_METRICS)
    shown = [name for name in ("parameters", "loss", *FIGURES, *READING_GAPS) if any(name in figures for figures in report["table"].values())]
    print(f"ablation: {len(report['runs'])} runs of {report['steps']} steps, {report['seconds']} s; comparable: {report['comparable']}")
    print(f"  {'row':<10}" + "".join(f"{name:>19}" for name in shown))
    for row, figures in report["table"].items():
        print(f"  {row:<10}" + "".join(f"{figures[name]:>19.4g}" if name in figures else f"{'-':>19}" for name in shown))
    print(f"ablation: {ABLATION_METRICS}, {ABLATION_REPORT}, {ABLATION}/ROW-seedN/unet, MLflow run {report['mlflow_run_id']}")
