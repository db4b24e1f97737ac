"""The frozen encoders of the latent cache: the image VAE and the CLIP text tower, loaded from the
cache_latents params (the smoke preset's tiny stand-ins when no weights are given), and what
encoders.json records so that training, evaluation and generation rebuild the very same ones."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.image_vae import SCALE_FACTOR, build_tiny_image_vae, encode_posterior, frames_to_pixels, load_image_vae, scaling_factor, weights_digest
from model.text_encoder import TINY_TEXT_CONFIG, build_text_encoder, clip_config, load_text_encoder, tokenizer_for
from model.weights import file_digest
from tasks.config.params import CacheLatentsParams

TOKENIZER_MODEL = "ViT-L-14"  # its tokenizer: CLIP's BPE vocabulary, bundled with open_clip


def load_vae(cfg: CacheLatentsParams):
    if cfg.vae_weights:
        return load_image_vae(cfg.vae_weights, "cache_latents.vae_weights")
    return build_tiny_image_vae(seed=cfg.seed)


def load_text(cfg: CacheLatentsParams):
    """(text encoder, tokenizer); every open_clip native tower uses CLIP's BPE vocabulary."""
    if cfg.text_weights:
        text = load_text_encoder(cfg.text_model, cfg.text_weights, "cache_latents.text_model", "cache_latents.text_weights")
        return text, tokenizer_for(clip_config(cfg.text_model, "cache_latents.text_model")[0])
    return build_text_encoder(TINY_TEXT_CONFIG, seed=cfg.seed), tokenizer_for(TOKENIZER_MODEL)


@torch.no_grad()
def encode_captions(text, tokenizer, captions: list[str]) -> np.ndarray:
    """(n,) captions -> (n, 77, width) float16 context; each distinct caption encoded once."""
    distinct = sorted(set(captions))
    device = next(text.parameters()).device
    context = text(tokenizer(distinct).to(device)).float().cpu().numpy().astype(np.float16)
    position = {caption: k for k, caption in enumerate(distinct)}
    return context[[position[caption] for caption in captions]]


class Encoders:
    """The frozen VAE and text encoder a cache is made with (loaded once per actor)."""

    def __init__(self, cfg: CacheLatentsParams, device: str = "cpu") -> None:
        self.vae = load_vae(cfg).to(device)
        text, self.tokenizer = load_text(cfg)
        self.text = text.to(device)
        self.cfg = cfg

    def encode_text(self, captions: list[str]) -> np.ndarray:
        return encode_captions(self.text, self.tokenizer, captions)

    def encode_clip(self, clip: np.ndarray, clip_id: str) -> np.ndarray:
        """(t, h, w, 3) uint8 -> (t, 4, h/8, w/8) float16 scaled latents. With sample_posterior,
        z = mean + std * eps (LDM's reparameterised sample), eps seeded by (seed, clip_id)."""
        mean, std = encode_posterior(self.vae, frames_to_pixels(clip), self.cfg.micro_batch_frames)
        mean, std = mean.cpu(), std.cpu()
        if not self.cfg.sample_posterior:
            return mean.numpy().astype(np.float16)
        eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(clip_noise_seed(self.cfg.seed, clip_id)))
        return (mean + std * eps).numpy().astype(np.float16)


def clip_noise_seed(seed: int, clip_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{clip_id}".encode()).digest()[:8], "little") >> 1


def encoder_info(cfg: CacheLatentsParams, vae_stand_in: bool = False) -> dict[str, Any]:
    """What encoders.json records: enough for later stages to rebuild the same encoders and for
    a reader to know whether numbers from this cache are comparable to published ones.
    vae_stand_in: vae_weights is the smoke preset's fitted tiny VAE, not a pretrained one."""
    if cfg.vae_weights:
        vae = {"weights": project_path(cfg.vae_weights), "sha256": weights_digest(cfg.vae_weights)}
        if vae_stand_in:
            vae["stand_in"] = f"tiny VAE (seed {cfg.seed}) fitted {cfg.smoke_vae_fit_steps} steps on the clips"
    else:
        vae = {"weights": "", "stand_in": f"tiny random-init VAE, seed {cfg.seed}"}
    if cfg.text_weights:
        _, config = clip_config(cfg.text_model, "cache_latents.text_model")
        text = {"model": cfg.text_model, "weights": project_path(cfg.text_weights), "sha256": file_digest(cfg.text_weights), "width": config["text_cfg"]["width"]}
    else:
        text = {"model": "tiny", "weights": "", "stand_in": f"tiny random-init text tower, seed {cfg.seed}", "width": TINY_TEXT_CONFIG["text_cfg"]["width"]}
    random_init = "stand_in" in vae or "stand_in" in text
    return {
        "image_vae": {**vae, "scale_factor": scaling_factor(cfg.vae_weights) if cfg.vae_weights else SCALE_FACTOR, "latent_channels": 4, "downsample": 8},
        "text_encoder": {**text, "context_length": 77},
        "sample_posterior": cfg.sample_posterior,
        "seed": cfg.seed,
        "random_init": random_init,
        "comparable": not random_init,
    }


def project_path(path: str) -> str:
    """A path as recorded in encoders.json: relative when inside the project, so the file is the
    same in every checkout."""
    absolute = os.path.abspath(path)
    return os.path.relpath(absolute) if absolute.startswith(os.getcwd() + os.sep) else path


def resolved_encoders(latents: Path, cfg: CacheLatentsParams) -> CacheLatentsParams:
    """cache_latents params pointing at the weights the cache in `latents` was made with (the
    smoke preset's fitted VAE included), with absolute paths for Ray workers."""
    info = json.loads((latents / "encoders.json").read_text())
    vae = info["image_vae"].get("weights") or ""
    return dataclasses.replace(cfg, vae_weights=os.path.abspath(vae) if vae else "", text_weights=os.path.abspath(cfg.text_weights) if cfg.text_weights else "")
