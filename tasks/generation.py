"""Text-to-video generation with the pipeline's trained models, for the evaluate stage (and the
`generate` command): the cache's frozen text encoder -> DDIM with classifier-free guidance on the
merged-expert UNet (models/unet/) -> the TCM-VAE decoder (models/decoder/) -> uint8 frames.

Every video's starting noise comes from its own seed, so a video does not depend on which other
videos share its batch, on the batch size or on the worker that made it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from model.diffusion import Schedule, ddim_sample
from model.image_vae import pixels_to_frames
from model.mec import MECPaths
from model.moe_attention import merge_experts
from model.presets import UNetConfig, get_preset
from model.unet import VersVideoUNet
from model.weights import load_into, load_state_dict
from tasks.cache_latents import encode_captions, load_text
from tasks.latent_shards import load_null_context
from tasks.params import CacheLatentsParams
from tasks.train_decoder import load_decoder

LATENT_CHANNELS = 4
VAE_FACTOR = 8


def load_unet(folder: str | Path) -> tuple[VersVideoUNet, str]:
    """(frozen merged-expert UNet, preset name) from the train_unet stage's output folder."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: run the train_unet stage first (versvideo stage train_unet)")
    saved = json.loads(config_path.read_text())
    fields = dict(saved["unet"])
    fields["mec_paths"] = MECPaths(**fields["mec_paths"])
    fields.update({key: tuple(fields[key]) for key in ("channel_mult", "attention_levels")})
    unet = VersVideoUNet(UNetConfig(**fields))
    if saved.get("merged_experts"):
        merge_experts(unet)  # the saved layout: one FFN per MoE layer (section 2.2)
    weights = folder / "model.safetensors"
    load_into(unet, load_state_dict(weights, "train_unet output"), weights)
    return unet.requires_grad_(False).eval(), saved["preset"]


class VideoGenerator:
    def __init__(self, unet_dir: str | Path, decoder_dir: str | Path, latents_dir: str | Path, encoders: CacheLatentsParams, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.unet, preset = load_unet(unet_dir)
        self.unet.to(self.device)
        self.decoder = load_decoder(decoder_dir).to(self.device)
        self.text, self.tokenizer = load_text(encoders)
        self.text.to(self.device)
        self.null_context = torch.from_numpy(load_null_context(latents_dir).astype(np.float32)).to(self.device)
        self.schedule = Schedule(get_preset(preset).diffusion)

    @torch.no_grad()
    def __call__(self, prompts: list[str], seeds: list[int], *, frames: int, height: int, width: int, steps: int, guidance_scale: float) -> np.ndarray:
        """One video per (prompt, seed): (b, frames, height, width, 3) uint8."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        multiple = VAE_FACTOR * 2 ** (len(self.unet.config.channel_mult) - 1)  # the VAE's factor times the UNet's downsamplings
        if height % multiple or width % multiple:
            raise ValueError(f"{height}x{width}: height and width must be multiples of {multiple} for this UNet")
        context = torch.from_numpy(encode_captions(self.text, self.tokenizer, prompts).astype(np.float32)).to(self.device)
        shape = (LATENT_CHANNELS, frames, height // VAE_FACTOR, width // VAE_FACTOR)
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(seed))) for seed in seeds]).to(self.device)
        latents = ddim_sample(self.unet, self.schedule, noise, context, self.null_context, steps=steps, guidance_scale=guidance_scale)
        videos = [self.decoder(clip[None])[0] for clip in latents]  # (3, t, h, w) each, one at a time (memory)
        return np.stack([pixels_to_frames(video.permute(1, 0, 2, 3)) for video in videos])
