"""Where each stage writes: the one home of every stage output path (dvc.yaml's `outs`, relative
to the repository root, where `versvideo stage` runs). Stages import these names; dvc.yaml spells
the same paths, and tests/tasks/test_layout.py checks that the two agree."""

from __future__ import annotations

from pathlib import Path

# prepare: the embedded synthetic set (or nothing, for a user's WebVid CSV)
RAW = Path("data/raw")
PREPARE_REPORT = RAW / "prepare_report.json"
# filter
FILTERED = Path("data/filtered")
KEPT = FILTERED / "kept.parquet"
REJECTED = FILTERED / "rejected.parquet"
FILTER_REPORT = FILTERED / "report.json"
IMAGES_KEPT, IMAGES_REJECTED = FILTERED / "images_kept.parquet", FILTERED / "images_rejected.parquet"  # the image-text pairs'
# decode: clips-NNNNN.npy shards + index.parquet; the images as one-frame clips under images/
CLIPS = Path("data/clips")
IMAGE_CLIPS = CLIPS / "images"
# cache_latents: latent shards, text contexts, index.parquet, encoders.json, null_context.npy
LATENTS = Path("data/latents")
IMAGE_LATENTS = LATENTS / "images"
# the training stages' exports (weights + config.json + metrics.json) and their Ray Train runs
UNET = Path("models/unet")
DECODER = Path("models/decoder")
CONTROLNET = Path("models/controlnet")
RUNS = Path("models/runs")
# ablation (ablation/dvc.yaml): per row and seed, ROW-seedN/ with the UNet export (unet/), its
# evaluation plots (plots/) and result.json; eval_stats/ caches the real-data statistics
ABLATION = Path("models/ablation")
# evaluate: cached real-data feature statistics and the per-frame plots
EVAL_STATS = Path("data/eval_stats")
PLOTS = Path("plots/eval")
# the training stages' loss curves (CSV per run + loss.png), DVC plots
UNET_PLOTS, DECODER_PLOTS, CONTROLNET_PLOTS = Path("plots/train_unet"), Path("plots/train_decoder"), Path("plots/train_controlnet")
# Each stage's results twice, both small and tracked by git (DVC outs with cache: false): the
# report holds everything (figures, baselines, run ids, protocols, hashes), for people and for
# the stages and flows that read results; the metrics file holds a few headline numbers only,
# for `dvc metrics show` / `dvc exp show`, which put every number of every metrics file in one row.
REPORTS = Path("reports")
METRICS = Path("metrics")
FILTER_METRICS = METRICS / "filter.json"
CACHE_LATENTS_REPORT = REPORTS / "cache_latents.json"
TRAIN_UNET_REPORT, TRAIN_UNET_METRICS = REPORTS / "train_unet.json", METRICS / "train_unet.json"
RECONSTRUCTION_REPORT, RECONSTRUCTION_METRICS = REPORTS / "reconstruction.json", METRICS / "reconstruction.json"
CONTROLNET_REPORT, CONTROLNET_METRICS = REPORTS / "controlnet.json", METRICS / "controlnet.json"
EVAL_REPORT, EVAL_METRICS = REPORTS / "eval.json", METRICS / "eval.json"
ABLATION_REPORT, ABLATION_METRICS = REPORTS / "ablation.json", METRICS / "ablation.json"
PIPELINE_SUMMARY = REPORTS / "pipeline.md"  # the last pipeline run's (not a DVC output; git ignores it)
