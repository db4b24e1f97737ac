"""Stage `train_decoder`: fine-tune the TCM-VAE decoder (paper section 2.3, eq. 9) on the clip
shards with the image VAE's encoder frozen, on the training engine (tasks/engine.py), then put it
beside the image decoder on held-out clips (the paper's Table 3 layout).

For a fair comparison the plain image decoder is fine-tuned too, with the same loss (less the TCM
consistency term, which has nothing to act on), data, steps and seed (`compare_image_decoder`).
Videos are split seeded by video id (tasks/clip_shards.py); the held-out ones never reach training.

Outputs: models/decoder/ (TCM-VAE weights + config.json + metrics.json), models/decoder/image_decoder/
(the fine-tuned image decoder) and metrics/reconstruction.json: PSNR/SSIM in YUV (Y and all three
channels) and flicker for the pretrained image decoder, the fine-tuned image decoder and the TCM-VAE.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from diffusers import AutoencoderKL
from einops import rearrange
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from torch import nn

from eval.reconstruction import reconstruction_metrics
from model.decoder_loss import DecoderLossConfig, DecoderTraining, PatchDiscriminator3D, load_lpips, random_lpips
from model.image_vae import frames_to_pixels, pixels_to_frames
from model.mec import MECPaths
from model.tcm_vae import FrozenEncoder, TCMDecoder, TCMVAEConfig
from model.weights import file_digest, load_into, load_state_dict
from tasks.atomic import save_safetensors, write_json
from tasks.cache_latents import load_vae, resolved_encoders
from tasks.clip_shards import clip_dataset, read_clips, split_clips
from tasks.engine import fit, history_summary
from tasks.lineage import lineage_tags, tracking_uri
from tasks.params import CacheLatentsParams, Params, TrainDecoderParams, flatten, params_to_dict
from tasks.previews import write_preview

CLIPS = Path("data/clips")
LATENTS = Path("data/latents")  # for encoders.json: the image VAE the latent cache was made with
OUT_DIR = Path("models/decoder")
IMAGE_DECODER = "image_decoder"  # models/decoder/image_decoder/: the fine-tuned image decoder
RUNS = Path("models/runs")
METRICS = Path("metrics/reconstruction.json")
SAMPLE_FPS = 8


def to_video(frames: torch.Tensor) -> torch.Tensor:
    """(b, t, h, w, 3) uint8 -> (b, 3, t, h, w) float in [-1, 1]."""
    return rearrange(frames_to_pixels(frames.flatten(0, 1)), "(b t) c h w -> b c t h w", b=frames.shape[0])


def to_frames(video: torch.Tensor) -> torch.Tensor:
    """(b, 3, t, h, w) in [-1, 1] -> (b, t, h, w, 3) uint8 (as a decoder's output is saved)."""
    frames = pixels_to_frames(rearrange(video, "b c t h w -> (b t) c h w"))
    return torch.from_numpy(frames).unflatten(0, (video.shape[0], video.shape[2]))


@dataclass
class DecoderRecipe:
    preset: str
    cfg: TrainDecoderParams
    encoders: CacheLatentsParams  # the cache's image VAE (absolute paths)
    variant: TCMVAEConfig
    sample_clip: np.ndarray  # (t, h, w, 3) uint8, a held-out clip reconstructed for the MLflow samples
    skips_parameters: bool = True  # the discriminator has no gradient before disc_start
    fsdp_blocks: tuple[str, ...] = ()  # never sharded: TrainDecoderParams refuses fsdp

    def build(self) -> nn.Module:
        cfg = self.cfg
        vae = load_vae(self.encoders)
        lpips = random_lpips(cfg.seed) if cfg.random_lpips else load_lpips(cfg.lpips_vgg_weights, cfg.lpips_linear_weights, "train_decoder.lpips_vgg_weights", "train_decoder.lpips_linear_weights")
        return DecoderTraining(
            FrozenEncoder(vae), TCMDecoder(vae, self.variant), lpips, PatchDiscriminator3D(cfg.disc_channels, cfg.disc_layers),
            DecoderLossConfig(cfg.perceptual_weight, cfg.disc_weight, cfg.consistency_weight, cfg.perceptual_frames),
        )

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], step: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return model(to_video(batch["frames"]), adversarial=step >= self.cfg.disc_start, generator=generator)

    def parameter_groups(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        """Generator and discriminator, clipped apart: VQ-GAN's two optimizers."""
        return {"decoder": list(model.decoder.parameters()), "discriminator": list(model.discriminator.parameters())}

    def after_optimizer_step(self, model: nn.Module) -> None:
        pass

    def export(self, model: nn.Module, folder: Path) -> None:
        save_decoder(model.decoder, folder)

    @torch.no_grad()
    def samples(self, model: nn.Module, step: int, folder: Path) -> list[Path]:
        """A held-out clip beside its reconstruction (posterior mean): MP4 + GIF."""
        was_training = model.training
        model.eval()
        source = torch.from_numpy(self.sample_clip)[None]
        device = next(model.decoder.parameters()).device
        reconstruction = to_frames(model.decoder(model.encoder(to_video(source).to(device))[0]))
        model.train(was_training)
        video = torch.cat([source, reconstruction], dim=3)[0].numpy()  # side by side: (t, h, 2w, 3)
        return write_preview(video, folder, "heldout_source_vs_reconstruction", SAMPLE_FPS)


def save_decoder(decoder: TCMDecoder, folder: Path) -> None:
    """models/decoder/: the decoder's weights + what rebuilds it (the image VAE's architecture)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors({name: tensor.detach().cpu().contiguous() for name, tensor in decoder.state_dict().items()}, folder / "model.safetensors")
    write_json({"tcm_vae": dataclasses.asdict(decoder.config), "image_vae": decoder.image_vae_config}, folder / "config.json")


def load_decoder(folder: str | Path) -> TCMDecoder:
    """A decoder saved by `save_decoder` (the TCM-VAE or a fine-tuned image decoder), frozen."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    vae = AutoencoderKL.from_config(config["image_vae"])
    variant = config["tcm_vae"]
    decoder = TCMDecoder(vae, TCMVAEConfig(**{**variant, "mec_paths": MECPaths(**variant["mec_paths"])}))
    load_into(decoder, load_state_dict(folder / "model.safetensors", "train_decoder output"), folder / "model.safetensors")
    return decoder.requires_grad_(False).eval()


@torch.no_grad()
def reconstruct(encoder: FrozenEncoder, decoder: nn.Module, clips: np.ndarray, batch_size: int = 4) -> torch.Tensor:
    """(n, t, h, w, 3) uint8 clips -> their reconstructions through the posterior mean, uint8."""
    outputs = []
    for start in range(0, len(clips), batch_size):
        video = to_video(torch.from_numpy(np.ascontiguousarray(clips[start:start + batch_size])))
        outputs.append(to_frames(decoder(encoder(video)[0])))
    return torch.cat(outputs)


def compare_decoders(vae: AutoencoderKL, decoders: dict[str, nn.Module], clips: np.ndarray) -> dict[str, dict[str, float]]:
    """Table 3: every decoder on the same held-out clips and the same latents."""
    encoder = FrozenEncoder(vae)
    source = torch.from_numpy(clips)
    return {name: reconstruction_metrics(source, reconstruct(encoder, decoder, clips)) for name, decoder in decoders.items()}


def default_run_name(params: Params, variant: str, clips: Path, latents: Path) -> str:
    """train_decoder-{variant}-{preset}-{digest of the params, the clips and the image VAE}: a rerun
    resumes it; anything else starts a new run."""
    digest = hashlib.sha256(json.dumps(params_to_dict(params)["train_decoder"], sort_keys=True).encode())
    digest.update(file_digest(clips / "index.parquet", latents / "encoders.json").encode())
    return f"train_decoder-{variant}-{params.preset}-{digest.hexdigest()[:10]}"


def check_weights_given(params: Params) -> None:
    cfg = params.train_decoder
    if params.preset != "smoke" and cfg.random_lpips:
        missing = "train_decoder.lpips_vgg_weights" if not cfg.lpips_vgg_weights else "train_decoder.lpips_linear_weights"
        raise FileNotFoundError(f"{missing}: required for preset {params.preset} (a local weight file; only the smoke preset may use a random VGG)")


def train_decoder(params: Params, clips: Path = CLIPS, latents: Path = LATENTS, output_dir: Path = OUT_DIR, runs: Path = RUNS) -> dict[str, Any]:
    """Fine-tune the TCM-VAE (and the image decoder beside it), compare them on held-out clips;
    returns the comparison (also written to output_dir/metrics.json)."""
    check_weights_given(params)
    cfg = params.train_decoder
    index = pd.read_parquet(clips / "index.parquet")
    train_rows, held_rows = split_clips(index, cfg.held_out_share, cfg.seed)
    held_rows = held_rows.iloc[: cfg.eval_clips]
    held_clips = read_clips(clips, held_rows)
    encoders = resolved_encoders(latents, params.cache_latents)
    variants = {"tcm_vae": TCMVAEConfig(cfg.temporal_compensation, cfg.refinement, cfg.refine_channels)}
    if cfg.compare_image_decoder:
        variants["image_decoder_finetuned"] = TCMVAEConfig(temporal_compensation=False, refinement=False)
    flat = flatten({"preset": params.preset, "train_decoder": params_to_dict(params)["train_decoder"]})
    runs_by_variant, folders = {}, {}
    for name, variant in variants.items():
        folders[name] = output_dir if name == "tcm_vae" else output_dir / IMAGE_DECODER
        recipe = DecoderRecipe(params.preset, cfg, encoders, variant, held_clips[0])
        result = fit(
            recipe, cfg, clip_dataset(clips, train_rows, seed=cfg.seed),
            run_name=default_run_name(params, name, clips, latents), storage=runs, output_dir=folders[name],
            params={**flat, "variant": name, "train_clips": len(train_rows), "held_out_clips": len(held_rows)}, tags=lineage_tags("train_decoder"),
        )
        runs_by_variant[name] = result["mlflow_run_id"]

    vae = load_vae(encoders)
    decoders = {"image_vae": TCMDecoder(vae, TCMVAEConfig(temporal_compensation=False, refinement=False)).eval()}
    decoders.update({name: load_decoder(folders[name]) for name in variants})
    table = compare_decoders(vae, decoders, held_clips)
    report = {
        "table": table,
        "held_out": {"clips": len(held_rows), "videos": int(held_rows["video_id"].nunique()), "share": cfg.held_out_share, "seed": cfg.seed},
        "steps": cfg.steps,
        "comparable": params.preset != "smoke" and not cfg.random_lpips and not encoders_random(latents),
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
    client.log_dict(report["mlflow_run_ids"]["tcm_vae"], report, "reconstruction.json")


def main(params: Params) -> None:
    report = train_decoder(params)
    write_json(report, METRICS)
    print("train_decoder: held-out reconstruction (Table 3 layout), "
          f"{report['held_out']['clips']} clips of {report['held_out']['videos']} videos, {report['steps']} steps each:")
    print(f"  {'decoder':<26}{'PSNR-Y':>9}{'PSNR-YUV':>10}{'SSIM-Y':>8}{'SSIM-YUV':>10}{'flicker':>9}")
    for row, figures in report["table"].items():
        print(f"  {row:<26}{figures['psnr_y']:>9.3f}{figures['psnr_yuv']:>10.3f}{figures['ssim_y']:>8.4f}{figures['ssim_yuv']:>10.4f}{figures['flicker']:>9.3f}")
