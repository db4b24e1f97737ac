"""CLIP-based video metrics: CLIPSIM and frame consistency (the paper's Tables 1 and 5).

CLIPSIM: the cosine similarity between the caption's CLIP text embedding and each frame's CLIP
image embedding, averaged over frames (then over videos). Unscaled: good text-to-video models
score about 0.29-0.31 with ViT-B/32; some papers multiply by 100 or clamp at 0, we do neither.

Frame consistency: the mean cosine similarity of the CLIP image embeddings of successive frames
(frames t and t+1), averaged over the pairs of a video, then over videos.

Frames are prepared as open_clip's image transform does: resize the shorter side to the model's
input size (bicubic, antialiased), centre crop, scale to [0, 1], normalise with the model's mean
and std.
"""

from __future__ import annotations

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch import nn

# The smoke preset's stand-in CLIP: ViT-B/32's layout, tiny (32 px, 2 layers, 64 wide), seeded.
TINY_CLIP = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}


def build_tiny_clip(seed: int):
    """(random-init tiny CLIP, CLIP's bundled tokenizer): smoke only, its scores compare with nothing."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = open_clip.CLIP(**TINY_CLIP)
    finally:
        torch.random.set_rng_state(generator_state)
    return model.requires_grad_(False).eval(), open_clip.get_tokenizer("ViT-B-32")


def model_image_size(model: nn.Module) -> int:
    size = model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def clip_input(frames: torch.Tensor | np.ndarray, model: nn.Module) -> torch.Tensor:
    """(n, h, w, 3) uint8 RGB -> (n, 3, s, s) normalised CLIP input, on the frames' device."""
    size = model_image_size(model)
    frames = frames if isinstance(frames, torch.Tensor) else torch.as_tensor(np.asarray(frames))
    pixels = frames.permute(0, 3, 1, 2).float() / 255.0
    height, width = pixels.shape[-2:]
    scale = size / min(height, width)
    resized = (max(size, round(height * scale)), max(size, round(width * scale)))
    if resized != (height, width):
        pixels = F.interpolate(pixels, size=resized, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    top, left = (resized[0] - size) // 2, (resized[1] - size) // 2
    pixels = pixels[:, :, top : top + size, left : left + size]
    mean = torch.tensor(getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD, device=pixels.device).view(1, 3, 1, 1)
    return (pixels - mean) / std


@torch.no_grad()
def frame_embeddings(model: nn.Module, videos: torch.Tensor | np.ndarray, micro_batch: int = 64) -> torch.Tensor:
    """(b, t, h, w, 3) uint8 -> unit-norm image embeddings (b, t, d)."""
    videos = torch.as_tensor(np.asarray(videos))
    frames = videos.flatten(0, 1)
    device = next(model.parameters()).device
    embedded = torch.cat([model.encode_image(clip_input(frames[k : k + micro_batch], model).to(device)).cpu() for k in range(0, len(frames), micro_batch)])
    return F.normalize(embedded.float(), dim=-1).unflatten(0, videos.shape[:2])


@torch.no_grad()
def text_embeddings(model: nn.Module, tokenizer, texts: list[str]) -> torch.Tensor:
    """captions -> unit-norm text embeddings (b, d)."""
    return F.normalize(model.encode_text(tokenizer(texts).to(next(model.parameters()).device)).cpu().float(), dim=-1)


def text_frame_similarity(text: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """cos(text, frame) per frame: text (b, d), frames (b, t, d), unit norm -> (b, t)."""
    return torch.einsum("bd,btd->bt", text, frames)


def successive_similarity(frames: torch.Tensor) -> torch.Tensor:
    """cos(frame t, frame t+1): frames (b, t, d), unit norm, t >= 2 -> (b, t - 1)."""
    if frames.shape[1] < 2:
        raise ValueError(f"frame consistency needs at least 2 frames, got {frames.shape[1]}")
    return (frames[:, 1:] * frames[:, :-1]).sum(dim=-1)


def clipsim(text: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """Per video: mean over frames of cos(text, frame) -> (b,)."""
    return text_frame_similarity(text, frames).mean(dim=1)


def frame_consistency(frames: torch.Tensor) -> torch.Tensor:
    """Per video: mean over t of cos(frame t, frame t+1) -> (b,)."""
    return successive_similarity(frames).mean(dim=1)
