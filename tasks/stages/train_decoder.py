"""Stage `train_decoder`: fine-tune the TCM-VAE decoder (paper section 2.3, eq. 9) on the clip
shards with the image VAE's encoder frozen, on the training engine (tasks/training/engine.py), then put it
beside the image decoder on held-out clips (the paper's Table 3 layout).

For a fair comparison the plain image decoder is fine-tuned too, with the same loss (less the TCM
consistency term, which has nothing to act on), data, steps and seed (`compare_image_decoder`), and
so are Table 3's other video decoders (`video_baselines`: the 3-D convolution decoder and
VideoLDM's temporally fine-tuned one, model/tcm_vae.py) and the TCM-VAE without its refinement
UNet (`compare_without_refinement`), which tells the TCMs' share from R's.
Videos are split seeded by video id (tasks/storage/clip_shards.py); the held-out ones never reach training.

Outputs: models/decoder/ (TCM-VAE weights + config.json + metrics.json), models/decoder/image_decoder/
(the fine-tuned image decoder), models/decoder/conv3d_decoder/ and videoldm_decoder/ (the video
baselines), models/decoder/tcm_vae_no_refinement/ and reports/reconstruction.json: PSNR/SSIM in YUV (Y and all three channels) and flicker
for the pretrained image decoder and every fine-tuned decoder, each against the TCM-VAE.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from diffusers import AutoencoderKL
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from torch import nn

from eval.reconstruction import paired_difference, per_clip_metrics, spread
from model.tcm_vae import FrozenEncoder, TCMVAEConfig
from tasks.config.params import Params, TrainDecoderParams, flatten, params_to_dict
from tasks.config.paths import CLIPS, DECODER, DECODER_PLOTS, LATENTS, RECONSTRUCTION_METRICS, RECONSTRUCTION_REPORT
from tasks.inference.encoders import load_vae, resolved_encoders
from tasks.inference.models import FINETUNED_IMAGE_DECODER, IMAGE_VAE, TCM_VAE, TCM_VAE_WITHOUT_REFINEMENT, decoder_folder, image_vae_decoder, load_decoder
from tasks.operations.lineage import lineage_tags, tracking_uri
from tasks.storage.atomic import write_json, write_metrics
from tasks.storage.clip_shards import clip_dataset, read_clips, split_clips
from tasks.storage.object_store import run_storage
from tasks.storage.weight_files import require_weight_files
from tasks.training.curves import write_loss_curves
from tasks.training.decoder import DecoderRecipe, to_frames, to_video
from tasks.training.launch import fit
from tasks.training.tracking import history_summary, resumable_run_name


@torch.no_grad()
def reconstruct(encoder: FrozenEncoder, decoder: nn.Module, clips: np.ndarray, batch_size: int = 4) -> torch.Tensor:
    """(n, t, h, w, 3) uint8 clips -> their reconstructions through the posterior mean, uint8."""
    outputs = []
    for start in range(0, len(clips), batch_size):
        video = to_video(torch.from_numpy(np.ascontiguousarray(clips[start:start + batch_size])))
        outputs.append(to_frames(decoder(encoder(video)[0])))
    return torch.cat(outputs)


def compare_decoders(vae: AutoencoderKL, decoders: dict[str, nn.Module], clips: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """Table 3: every decoder on the same held-out clips and the same latents, per clip."""
    encoder = FrozenEncoder(vae)
    source = torch.from_numpy(clips)
    return {name: {key: values.numpy() for key, values in per_clip_metrics(source, reconstruct(encoder, decoder, clips)).items()} for name, decoder in decoders.items()}


LOWER_IS_BETTER = ("flicker",)


def spread_table(per_clip: dict[str, dict[str, np.ndarray]], videos: np.ndarray, seed: int) -> dict[str, Any]:
    """Each decoder's figures with their spread, and the TCM-VAE against each other decoder: the
    mean paired difference per clip with its 95 % interval, resampling held-out videos. `better`
    is claimed only where the whole interval lies on the better side of zero."""
    spreads = {name: {key: spread(values, videos, seed=seed) for key, values in figures.items()} for name, figures in per_clip.items()}
    differences = {}
    for other in (name for name in per_clip if name != TCM_VAE):
        differences[f"{TCM_VAE} - {other}"] = {key: paired_difference(values, per_clip[other][key], videos, key in LOWER_IS_BETTER, seed)
                                               for key, values in per_clip[TCM_VAE].items()}
    return {"spread": spreads, "differences": differences}


def decoder_variants(cfg: TrainDecoderParams) -> dict[str, TCMVAEConfig]:
    """The decoders fine-tuned side by side, by their names in the table: the TCM-VAE first, then
    Table 3's baselines and the TCM-VAE less its refinement UNet (the latter only where the
    TCM-VAE has both parts, so that the two rows differ by R alone)."""
    variants = {TCM_VAE: TCMVAEConfig(cfg.temporal_compensation, cfg.refinement, cfg.refine_channels)}
    if cfg.compare_without_refinement and cfg.temporal_compensation and cfg.refinement:
        variants[TCM_VAE_WITHOUT_REFINEMENT] = TCMVAEConfig(temporal_compensation=True, refinement=False)
    if cfg.compare_image_decoder:
        variants[FINETUNED_IMAGE_DECODER] = TCMVAEConfig(temporal_compensation=False, refinement=False)
    for layers in cfg.video_baseline_list:
        variants[f"{layers}_decoder"] = TCMVAEConfig(temporal_compensation=False, refinement=False, video_layers=layers)
    return variants


def train_decoder(params: Params, clips: Path = CLIPS, latents: Path = LATENTS, output_dir: Path = DECODER, runs: str | Path | None = None) -> dict[str, Any]:
    """Fine-tune the TCM-VAE (and the image decoder beside it), compare them on held-out clips;
    returns the comparison (also written to output_dir/metrics.json)."""
    require_weight_files(params, "train_decoder")
    cfg = params.train_decoder
    index = pd.read_parquet(clips / "index.parquet")
    train_rows, held_rows = split_clips(index, cfg.held_out_share, cfg.seed)
    held_rows = held_rows.iloc[: cfg.eval_clips]
    held_clips = read_clips(clips, held_rows)
    encoders = resolved_encoders(latents, params.cache_latents)
    variants = decoder_variants(cfg)
    flat = flatten({"preset": params.preset, "train_decoder": params_to_dict(params)["train_decoder"]})
    runs_by_variant, folders = {}, {}
    for name, variant in variants.items():
        folders[name] = decoder_folder(output_dir, name)
        recipe = DecoderRecipe(params.preset, cfg, encoders, variant, held_clips[0])
        result = fit(
            recipe, cfg, {"train": clip_dataset(clips, train_rows, seed=cfg.seed)},
            run_name=resumable_run_name("train_decoder", params.preset, params_to_dict(params)["train_decoder"], clips / "index.parquet", latents / "encoders.json", variant=name), storage=runs or run_storage(), output_dir=folders[name],
            params={**flat, "variant": name, "train_clips": len(train_rows), "held_out_clips": len(held_rows)}, tags=lineage_tags("train_decoder"),
        )
        runs_by_variant[name] = result["mlflow_run_id"]

    vae = load_vae(encoders)
    decoders = {IMAGE_VAE: image_vae_decoder(vae)}
    decoders.update({name: load_decoder(folders[name]) for name in variants})
    per_clip = compare_decoders(vae, decoders, held_clips)
    counts = {"clips": len(held_clips), "frames": len(held_clips) * held_clips.shape[1]}
    table = {name: {**{key: float(values.mean()) for key, values in figures.items()}, **counts} for name, figures in per_clip.items()}
    report = {
        "table": table,
        **spread_table(per_clip, held_rows["video_id"].astype(str).to_numpy(), cfg.seed),
        "held_out": {"clips": len(held_rows), "videos": int(held_rows["video_id"].nunique()), "share": cfg.held_out_share, "seed": cfg.seed},
        "steps": cfg.steps,
        "comparable": params.preset != "smoke" and not cfg.missing_weights and not encoders_random(latents),
        "mlflow_run_ids": runs_by_variant,
        "training": {name: history_summary(run_id) for name, run_id in runs_by_variant.items()},
    }
    log_comparison(report)
    write_json(report, output_dir / "metrics.json")
    return report


def encoders_random(latents: Path) -> bool:
    return bool(json.loads((latents / "encoders.json").read_text()).get("random_init", True))


def log_comparison(report: dict[str, Any]) -> None:
    """Each run gets the held-out figures of every row under heldout/{row}/{metric}; the TCM-VAE's
    run also keeps the whole table as reconstruction.json."""
    client = MlflowClient(tracking_uri())
    metrics = [Metric(f"heldout/{row}/{key}", float(value), 0, report["steps"]) for row, figures in report["table"].items() for key, value in figures.items()]
    for run_id in report["mlflow_run_ids"].values():
        client.log_batch(run_id, metrics=metrics)
    client.log_dict(report["mlflow_run_ids"][TCM_VAE], report, "reconstruction.json")


def main(params: Params) -> None:
    report = train_decoder(params)
    write_json(report, RECONSTRUCTION_REPORT)
    table = report["table"]  # held-out PSNR-Y of the TCM-VAE and of each decoder fine-tuned beside it
    write_metrics({"tcm_vae_psnr_y": table[TCM_VAE]["psnr_y"], "image_decoder_psnr_y": table.get(FINETUNED_IMAGE_DECODER, {}).get("psnr_y"),
                   **{f"{name}_psnr_y": table[name]["psnr_y"] for name in table if name.endswith("_decoder") or name == TCM_VAE_WITHOUT_REFINEMENT}}, RECONSTRUCTION_METRICS)
    write_loss_curves(report["mlflow_run_ids"], DECODER_PLOTS, "train_decoder: the TCM-VAE and the decoders fine-tuned as long beside it")
    print("train_decoder: held-out reconstruction (Table 3 layout), "
          f"{report['held_out']['clips']} clips of {report['held_out']['videos']} videos, {report['steps']} steps each:")
    print(f"  {'decoder':<26}{'PSNR-Y':>9}{'PSNR-YUV':>10}{'SSIM-Y':>8}{'SSIM-YUV':>10}{'flicker':>9}")
    for row, figures in report["table"].items():
        print(f"  {row:<26}{figures['psnr_y']:>9.3f}{figures['psnr_yuv']:>10.3f}{figures['ssim_y']:>8.4f}{figures['ssim_yuv']:>10.4f}{figures['flicker']:>9.3f}")
    print("  TCM-VAE minus each other decoder, 95 % interval over held-out videos (resampled):")
    for pair, rows in report["differences"].items():
        print(f"  {pair:<40}" + "  ".join(f"{key} {row['mean']:+.3f} [{row['low']:+.3f}, {row['high']:+.3f}] {row['verdict']}" for key, row in rows.items()))
