"""What one step of TCM-VAE decoder fine-tuning is (section 2.3, eq. 9), for the training engine:
VQ-GAN's loss (L1 + LPIPS + a 3-D patch discriminator from `disc_start`) plus the TCMs'
consistency term, on pixel clips with the image VAE's encoder frozen; generator and discriminator
clipped apart; a held-out clip and its reconstruction as the samples."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from torch import nn

from model.decoder_loss import DecoderLossConfig, DecoderTraining, PatchDiscriminator3D, load_lpips, random_lpips
from model.image_vae import frames_to_pixels, pixels_to_frames
from model.tcm_vae import FrozenEncoder, TCMDecoder, TCMVAEConfig
from tasks.config.params import PREVIEW_FPS, CacheLatentsParams, TrainDecoderParams
from tasks.inference.encoders import load_vae
from tasks.inference.models import save_decoder
from tasks.storage.previews import write_preview


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

    def streams(self) -> dict[str, tuple[int, float]]:
        return {"train": (self.cfg.batch_size, 1.0)}

    def build(self) -> nn.Module:
        cfg = self.cfg
        vae = load_vae(self.encoders)
        lpips = random_lpips(cfg.seed) if cfg.missing_weights else load_lpips(cfg.lpips_vgg_weights, cfg.lpips_linear_weights, "train_decoder.lpips_vgg_weights", "train_decoder.lpips_linear_weights")
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
        return write_preview(video, folder, "heldout_source_vs_reconstruction", PREVIEW_FPS)
