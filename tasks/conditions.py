"""Condition extractors for the ControlNet (paper section 2.4): per-frame maps computed from a clip,
batched over frames, and the style image's CLIP embedding.

    canny  cv2.Canny(frame, low, high) on the RGB frame, as ControlNet's and Control-A-Video's
           annotators call it (OpenCV takes the strongest channel's gradient)
    hed    the HED network's soft edges (model/hed.py: network-bsds500.pth or ControlNetHED.pth)
    image  a reference frame: repeated over every frame, or on the first frame only (zeros after)
    depth  MiDaS DPT is not included yet: asking for it is an error that says so

Every map is returned as (t, h, w, 3) uint8 (single-channel maps repeated on the three channels,
ControlNet's HWC3), so the adapters see one input format; the ControlNet reads them in [0, 1].
The style embedding is the frozen open_clip image tower's unit-norm embedding of one image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import open_clip
import torch
from torch import nn

from eval.clip_metrics import build_tiny_clip, frame_embeddings
from model.controlnet import CONDITIONS
from model.hed import load_hed, random_hed
from model.text_encoder import clip_config
from model.weights import load_into, load_state_dict

IMAGE_MODES = ("repeat", "first_frame")


@dataclass(frozen=True)
class ConditionSettings:
    canny_low: int = 100  # Control-A-Video's thresholds
    canny_high: int = 200
    image_mode: str = "repeat"

    def __post_init__(self) -> None:
        if self.image_mode not in IMAGE_MODES:
            raise ValueError(f"image condition mode {self.image_mode!r}: choose one of {', '.join(IMAGE_MODES)}")
        if not 0 <= self.canny_low <= self.canny_high:
            raise ValueError(f"canny thresholds low={self.canny_low}, high={self.canny_high}: need 0 <= low <= high")


def condition_index(name: str) -> int:
    """The adapter index k of eq. 10 for a condition name."""
    if name not in CONDITIONS:
        raise ValueError(f"unknown condition {name!r}; choose one of {', '.join(CONDITIONS)}")
    if name == "depth":
        raise ValueError("the depth condition needs the MiDaS DPT network, which this version does not include yet; use canny, hed or image")
    return CONDITIONS.index(name)


def three_channels(maps: np.ndarray) -> np.ndarray:
    """(t, h, w) -> (t, h, w, 3) uint8."""
    return np.repeat(maps[..., None], 3, axis=-1)


def canny(frames: np.ndarray, low: int, high: int) -> np.ndarray:
    """(t, h, w, 3) uint8 RGB -> (t, h, w) uint8 edges (0 or 255), one cv2.Canny per frame."""
    return np.stack([cv2.Canny(np.ascontiguousarray(frame), low, high) for frame in frames])


@torch.no_grad()
def hed(network: nn.Module, frames: np.ndarray | torch.Tensor, micro_batch: int = 32) -> np.ndarray:
    """(t, h, w, 3) uint8 RGB -> (t, h, w) uint8 soft edges, `micro_batch` frames per forward."""
    device = next(network.parameters()).device
    frames = torch.as_tensor(np.asarray(frames))
    out = []
    for start in range(0, len(frames), micro_batch):
        pixels = frames[start : start + micro_batch].to(device).permute(0, 3, 1, 2).float() / 255.0
        out.append((network(pixels)[:, 0] * 255.0).round().clamp(0, 255).to(torch.uint8).cpu())
    return torch.cat(out).numpy()


def image_condition(reference: np.ndarray, frames: int, mode: str) -> np.ndarray:
    """A reference frame (h, w, 3) -> (frames, h, w, 3): repeated, or on frame 0 with zeros after."""
    video = np.repeat(reference[None], frames, axis=0)
    if mode == "first_frame":
        video[1:] = 0
    return video


class ConditionExtractor:
    """Makes any visual condition's maps from a clip; loads the HED network once, if asked for."""

    def __init__(self, settings: ConditionSettings, hed_weights: str = "", seed: int = 0, allow_random: bool = False, device: str = "cpu") -> None:
        self.settings, self.hed_weights, self.seed, self.allow_random, self.device = settings, hed_weights, seed, allow_random, device
        self._hed: nn.Module | None = None

    def hed_network(self) -> nn.Module:
        if self._hed is None:
            if self.hed_weights:
                self._hed = load_hed(self.hed_weights, "train_controlnet.hed_weights")
            elif self.allow_random:
                self._hed = random_hed(self.seed)
            else:
                raise FileNotFoundError("the hed condition needs HED weights: set train_controlnet.hed_weights to network-bsds500.pth or ControlNetHED.pth")
            self._hed.to(self.device)
        return self._hed

    def __call__(self, name: str, frames: np.ndarray) -> np.ndarray:
        """Condition `name` of a clip (t, h, w, 3) uint8 -> its maps (t, h, w, 3) uint8."""
        condition_index(name)
        if name == "canny":
            return three_channels(canny(frames, self.settings.canny_low, self.settings.canny_high))
        if name == "hed":
            return three_channels(hed(self.hed_network(), frames))
        return image_condition(frames[0], len(frames), self.settings.image_mode)


def load_style_encoder(model_name: str, weights: str, seed: int, allow_random: bool) -> nn.Module:
    """The frozen open_clip model whose image tower embeds style images (a full open_clip CLIP
    checkpoint, strict); the smoke preset's stand-in is the seeded tiny CLIP."""
    if not weights:
        if not allow_random:
            raise FileNotFoundError("style needs CLIP weights: set train_controlnet.style_weights to a local open_clip checkpoint (e.g. ViT-L-14)")
        return build_tiny_clip(seed)[0]
    name, _ = clip_config(model_name, "train_controlnet.style_model")
    model = open_clip.create_model(name, pretrained=None)
    load_into(model, load_state_dict(weights, "train_controlnet.style_weights"), Path(weights))
    return model.requires_grad_(False).eval()


def style_embedding_dim(encoder: nn.Module) -> int:
    return int(encoder.visual.output_dim)


def style_embeddings(encoder: nn.Module, images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(b, h, w, 3) uint8 style images -> (b, e) unit-norm CLIP image embeddings."""
    return frame_embeddings(encoder, torch.as_tensor(np.asarray(images))[:, None])[:, 0]
