"""Text-to-video generation with the pipeline's trained models, for the evaluate stage, the
ControlNet's checks and the `generate` command: the cache's frozen text encoder -> DDIM with
classifier-free guidance on the merged-expert UNet (models/unet/), optionally steered by the
ControlNet and style adapter (models/controlnet/) -> the TCM-VAE decoder (models/decoder/) -> uint8.

Every video's starting noise comes from its own seed, so a video does not depend on which other
videos share its batch, on the batch size or on the worker that made it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from model.controlnet import CONDITIONS
from model.diffusion import Schedule, ddim_sample
from model.image_vae import pixels_to_frames
from model.presets import get_preset
from tasks.config.params import CacheLatentsParams
from tasks.inference.encoders import encode_captions, load_text
from tasks.inference.models import load_controlnet, load_decoder, load_unet
from tasks.storage.latent_shards import load_null_context
from tasks.storage.video_io import VideoError, center_crop, clip_stride, cover_size, decode_frames, probe_video

LATENT_CHANNELS = 4
VAE_FACTOR = 8


def read_video_clip(path: str | Path, frames: int, fps: float, height: int, width: int) -> np.ndarray:
    """A video file's first `frames` frames at `fps` (every k-th source frame), resized to cover
    height x width and centre-cropped: (frames, height, width, 3) uint8. VideoError when too short."""
    probe = probe_video(Path(path))
    stride = clip_stride(probe.fps, fps)
    if probe.num_frames < (frames - 1) * stride + 1:
        raise VideoError("too_short", f"{path}: {probe.num_frames} frames at {probe.fps:g} fps, fewer than {frames} frames at {fps:g} fps need")
    cover_height, cover_width = cover_size(probe.height, probe.width, height, width)
    return center_crop(decode_frames(Path(path), np.arange(frames) * stride, cover_height, cover_width), height, width)


class VideoGenerator:
    def __init__(self, unet_dir: str | Path, decoder_dir: str | Path, latents_dir: str | Path, encoders: CacheLatentsParams,
                 device: str = "cpu", controlnet_dir: str | Path | None = None) -> None:
        self.device = torch.device(device)
        self.unet, preset = load_unet(unet_dir)
        self.controlled, self.controlnet_config = load_controlnet(controlnet_dir, self.unet, unet_dir) if controlnet_dir else (None, None)
        self.unet.to(self.device)
        if self.controlled is not None:
            self.controlled.to(self.device)
        self.decoder = load_decoder(decoder_dir).to(self.device)
        self.text, self.tokenizer = load_text(encoders)
        self.text.to(self.device)
        self.null_context = torch.from_numpy(load_null_context(latents_dir).astype(np.float32)).to(self.device)
        self.preset = get_preset(preset)
        self.schedule = Schedule(self.preset.diffusion)

    def check_size(self, height: int, width: int) -> None:
        multiple = VAE_FACTOR * 2 ** (len(self.unet.config.channel_mult) - 1)  # the VAE's factor times the UNet's downsamplings
        if height % multiple or width % multiple:
            raise ValueError(f"{height}x{width}: height and width must be multiples of {multiple} for this UNet")

    def __call__(self, prompts: list[str], seeds: list[int], **sampling) -> np.ndarray:
        """One video per (prompt, seed): (b, frames, height, width, 3) uint8, decoded by the loaded
        decoder; `sampling` as `sample_latents` takes it."""
        return self.decode(self.sample_latents(prompts, seeds, **sampling))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, decoder: torch.nn.Module | None = None) -> np.ndarray:
        """Latents (b, c, t, h, w) -> (b, t, H, W, 3) uint8 through `decoder` (default: the one
        loaded), one clip at a time (memory)."""
        decoder = self.decoder if decoder is None else decoder
        videos = [decoder(clip[None])[0] for clip in latents]  # (3, t, h, w) each
        return np.stack([pixels_to_frames(video.permute(1, 0, 2, 3)) for video in videos])

    @torch.no_grad()
    def sample_latents(self, prompts: list[str], seeds: list[int], *, frames: int, height: int, width: int, steps: int, guidance_scale: float,
                       control: np.ndarray | None = None, control_type: str | None = None, style_embedding: torch.Tensor | None = None,
                       control_scale: float = 1.0, callback=None) -> torch.Tensor:
        """DDIM latents (b, c, frames, height/8, width/8), one per (prompt, seed), each from its own seeded noise.

        control: condition maps (b, frames, height, width, 3) uint8 of type `control_type`;
        style_embedding: (b, e) CLIP image embeddings. Both need the ControlNet (controlnet_dir)."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        self.check_size(height, width)
        context = torch.from_numpy(encode_captions(self.text, self.tokenizer, prompts).astype(np.float32)).to(self.device)
        shape = (LATENT_CHANNELS, frames, height // VAE_FACTOR, width // VAE_FACTOR)
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(seed))) for seed in seeds]).to(self.device)
        model = self.unet
        if control is not None or style_embedding is not None:
            if self.controlled is None:
                raise ValueError("a control or style was given, but no ControlNet was loaded (controlnet_dir)")
            condition = kind = None
            if control is not None:
                if control.shape != (len(prompts), frames, height, width, 3):
                    raise ValueError(f"control maps have shape {control.shape}; expected {(len(prompts), frames, height, width, 3)}")
                condition = torch.from_numpy(np.ascontiguousarray(control)).to(self.device).permute(0, 4, 1, 2, 3).float() / 255.0
                kind = torch.full((len(prompts),), CONDITIONS.index(control_type), device=self.device)
            style = None if style_embedding is None else style_embedding.to(self.device)
            model = self.controlled.denoiser(condition, kind, style, control_scale)
        return ddim_sample(model, self.schedule, noise, context, self.null_context, steps=steps, guidance_scale=guidance_scale, callback=callback)
