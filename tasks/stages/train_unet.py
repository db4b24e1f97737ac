"""Stage `train_unet`: the paper's stage 1, text-to-video training of the denoising UNet on the
latent cache, on the training engine (tasks/training/engine.py).

Per step (section 2, Table 4): v-prediction loss (model/diffusion.py) at a uniform timestep; the
caption's context replaced by the empty prompt's with p = text_dropout (classifier-free
guidance); in every micro-step, beside the clips, image_batch_size image-text pairs as one-frame
latents (data/latents/images), their loss weighted image_share (joint image-video training,
section 3.1); after every optimizer step the experts of each MoE layer are pulled towards each
other's mean (eq. 7-8). The output, models/unet/, holds merged-expert inference weights
(section 2.2) + config.json + metrics.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.config.params import Params, flatten, params_to_dict
from tasks.config.paths import IMAGE_LATENTS, LATENTS, TRAIN_UNET_METRICS, TRAIN_UNET_REPORT, UNET, UNET_PLOTS
from tasks.operations.lineage import lineage_tags
from tasks.storage.atomic import write_json, write_metrics
from tasks.storage.clip_shards import held_out_videos
from tasks.storage.latent_shards import latent_dataset, load_null_context, read_index
from tasks.storage.object_store import run_storage
from tasks.training.curves import write_loss_curves
from tasks.training.launch import fit
from tasks.training.tracking import history_summary, resumable_run_name
from tasks.training.unet import UNetRecipe


def train_unet(params: Params, latents: Path = LATENTS, output_dir: Path = UNET, runs: str | Path | None = None, run_name: str | None = None) -> dict[str, Any]:
    """Train on the cache in `latents`; exports to output_dir; returns the run's summary figures."""
    from tasks.inference.encoders import resolved_encoders  # see UNetRecipe.samples

    cfg = params.train_unet
    index = read_index(latents)
    held_out = held_out_videos(index, cfg.held_out_share, cfg.seed)
    training = index[~index["video_id"].astype(str).isin(held_out)]
    recipe = UNetRecipe(
        preset=params.preset,
        cfg=cfg,
        null_context=load_null_context(latents),
        sample_captions=sorted(training["caption"].astype(str).unique())[: max(1, cfg.sample_count)],
        encoders=resolved_encoders(latents, params.cache_latents),
        clip_shape=(params.decode.frames, params.decode.height, params.decode.width),
    )
    datasets = {"train": latent_dataset(latents, seed=cfg.seed, exclude_videos=held_out)}
    images = latents / IMAGE_LATENTS.name
    image_count = 0
    if cfg.image_share:
        image_count = len(read_index(images)) if (images / "index.parquet").exists() else 0
        if image_count < cfg.image_batch_size * cfg.num_workers:
            raise ValueError(f"{images}: {image_count} cached image(s), fewer than image_batch_size x num_workers = {cfg.image_batch_size * cfg.num_workers}: "
                             "point data.images at image-text shards and rerun filter, decode and cache_latents, or set train_unet.image_share 0 and image_batch_size 0")
        datasets["images"] = latent_dataset(images, seed=cfg.seed)
    flat = flatten({"preset": params.preset, "train_unet": params_to_dict(params)["train_unet"]})
    result = fit(
        recipe, cfg, datasets,
        run_name=run_name or resumable_run_name("train_unet", params.preset, params_to_dict(params)["train_unet"], latents / "index.parquet", latents / "encoders.json",
                                                *([images / "index.parquet"] if cfg.image_share else [])),
        storage=runs or run_storage(), output_dir=output_dir, params=flat, tags=lineage_tags("train_unet"),
    )
    metrics = {**history_summary(result["mlflow_run_id"]), "steps": cfg.steps, "mlflow_run_id": result["mlflow_run_id"],
               "training_clips": len(training), "training_images": image_count, "held_out_videos": len(held_out)}
    write_json(metrics, output_dir / "metrics.json")
    return metrics


def main(params: Params) -> None:
    metrics = train_unet(params)
    write_json(metrics, TRAIN_UNET_REPORT)
    write_metrics({"loss": metrics.get("loss_last_10pct")}, TRAIN_UNET_METRICS)  # v-loss, last 10 % of steps
    write_loss_curves({"unet": metrics["mlflow_run_id"]}, UNET_PLOTS, "train_unet: v-prediction loss")
    print(f"train_unet: {metrics['steps']} steps; loss {metrics.get('loss_first_10pct', float('nan')):.4f} (first 10%) -> "
          f"{metrics.get('loss_last_10pct', float('nan')):.4f} (last 10%); data wait {metrics.get('mean_data_wait_share', 0):.1%} of step time; "
          f"MLflow run {metrics['mlflow_run_id']}; weights in {UNET}/")
