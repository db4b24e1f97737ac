"""Condition extractors for the ControlNet (paper section 2.4): per-frame maps computed from a clip,
batched over frames, and the style image's CLIP embedding.

    canny  cv2.Canny(frame, low, high) on the RGB frame, as ControlNet's and Control-A-Video's
           annotators call it (OpenCV takes the strongest channel's gradient)
    hed    the HED network's soft edges (model/hed.py: network-bsds500.pth or ControlNetHED.pth)
    depth  MiDaS DPT-Hybrid's relative inverse depth (model/midas.py: dpt_hybrid-midas-501f0c75.pt),
           ControlNet's depth annotator recipe: the frame resized to `depth_resolution` on its
           short side (both sides multiples of 64), each frame's map min-max scaled to 0..255
    image  a reference frame: repeated over every frame, or on the first frame only (zeros after)

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
import torch.nn.functional as F
from torch import nn

from eval.clip_metrics import build_tiny_clip, clip_input
from model.controlnet import CONDITIONS
from model.hed import load_hed, random_hed
from model.midas import load_midas, random_midas
from model.text_encoder import clip_config
from model.weights import load_into, load_state_dict


@dataclass(frozen=True)
class ConditionSettings:
    """How canny, image and depth maps are made (validated as train_controlnet params)."""

    canny_low: int = 100  # Control-A-Video's thresholds
    canny_high: int = 200
    image_mode: str = "repeat"  # one of tasks.config.params.IMAGE_MODES
    depth_resolution: int = 384  # ControlNet's depth annotator input (short side)


def condition_index(name: str) -> int:
    """The adapter index k of eq. 10 for a condition name."""
    if name not in CONDITIONS:
        raise ValueError(f"unknown condition {name!r}; choose one of {', '.join(CONDITIONS)}")
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


def annotator_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """ControlNet's resize_image: the short side to `resolution`, both sides rounded to multiples of 64."""
    scale = resolution / min(height, width)
    return max(64, int(np.round(height * scale / 64.0)) * 64), max(64, int(np.round(width * scale / 64.0)) * 64)


@torch.no_grad()
def depth(network: nn.Module, frames: np.ndarray, resolution: int, micro_batch: int = 8) -> np.ndarray:
    """(t, h, w, 3) uint8 RGB -> (t, h, w) uint8 depth maps (near is bright), ControlNet's recipe:
    resize to the annotator size (area when shrinking, cubic when growing), RGB / 127.5 - 1, DPT's
    inverse depth, each frame min-max scaled to 0..255, resized back to (h, w) bilinearly."""
    device = next(network.parameters()).device
    t, h, w, _ = frames.shape
    size_h, size_w = annotator_size(h, w, resolution)
    interpolation = cv2.INTER_AREA if size_h < h else cv2.INTER_CUBIC
    resized = np.stack([cv2.resize(np.ascontiguousarray(frame), (size_w, size_h), interpolation=interpolation) for frame in frames])
    maps = []
    for start in range(0, t, micro_batch):
        images = torch.from_numpy(resized[start : start + micro_batch]).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        inverse_depth = network(images).float()
        low = inverse_depth.amin(dim=(1, 2), keepdim=True)
        span = (inverse_depth.amax(dim=(1, 2), keepdim=True) - low).clamp_min(1e-8)  # a flat map stays 0, not NaN
        maps.append(((inverse_depth - low) / span * 255.0).clamp(0, 255).to(torch.uint8).cpu().numpy())
    return np.stack([cv2.resize(frame_map, (w, h), interpolation=cv2.INTER_LINEAR) for frame_map in np.concatenate(maps)])


def image_condition(reference: np.ndarray, frames: int, mode: str) -> np.ndarray:
    """A reference frame (h, w, 3) -> (frames, h, w, 3): repeated, or on frame 0 with zeros after."""
    video = np.repeat(reference[None], frames, axis=0)
    if mode == "first_frame":
        video[1:] = 0
    return video


# condition -> (its weights setting, the public files it loads, loader, seeded random stand-in)
ANNOTATORS = {
    "hed": ("train_controlnet.hed_weights", "network-bsds500.pth or ControlNetHED.pth", load_hed, random_hed),
    "depth": ("train_controlnet.midas_weights", "dpt_hybrid-midas-501f0c75.pt", load_midas, random_midas),
}


class ConditionExtractor:
    """Makes any visual condition's maps from a clip; loads the HED and MiDaS networks once, if asked for."""

    def __init__(self, settings: ConditionSettings, hed_weights: str = "", seed: int = 0, allow_random: bool = False, device: str = "cpu",
                 midas_weights: str = "") -> None:
        self.settings, self.seed, self.allow_random, self.device = settings, seed, allow_random, device
        self.weights = {"hed": hed_weights, "depth": midas_weights}
        self._networks: dict[str, nn.Module] = {}

    @classmethod
    def from_config(cls, extractors: dict, seed: int = 0, allow_random: bool = False, device: str = "cpu") -> ConditionExtractor:
        """From the ControlNet export's "extractors" record (tasks/train_controlnet.extractor_config)."""
        settings = ConditionSettings(extractors["canny_low"], extractors["canny_high"], extractors["image_mode"], extractors.get("depth_resolution", 384))
        return cls(settings, extractors.get("hed_weights", ""), seed, allow_random, device, midas_weights=extractors.get("midas_weights", ""))

    def network(self, name: str) -> nn.Module:
        """The frozen annotator network of `name` (hed, depth): from its weights file, or in the smoke
        preset (allow_random) the seeded random stand-in."""
        if name not in self._networks:
            setting, files, load, stand_in = ANNOTATORS[name]
            if self.weights[name]:
                network = load(self.weights[name], setting)
            elif self.allow_random:
                network = stand_in(self.seed)
            else:
                raise FileNotFoundError(f"the {name} condition needs its annotator's weights: set {setting} to {files}")
            self._networks[name] = network.to(self.device)
        return self._networks[name]

    def __call__(self, name: str, frames: np.ndarray) -> np.ndarray:
        """Condition `name` of a clip (t, h, w, 3) uint8 -> its maps (t, h, w, 3) uint8."""
        condition_index(name)
        if name == "canny":
            return three_channels(canny(frames, self.settings.canny_low, self.settings.canny_high))
        if name == "hed":
            return three_channels(hed(self.network("hed"), frames))
        if name == "depth":
            return three_channels(depth(self.network("depth"), frames, self.settings.depth_resolution))
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


@torch.no_grad()
def style_embeddings(encoder: nn.Module, images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(b, h, w, 3) uint8 style images -> (b, e) unit-norm CLIP image embeddings, on the encoder's
    device (training hands frames already there: no trip through the host per step)."""
    device = next(encoder.parameters()).device
    images = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images))
    return F.normalize(encoder.encode_image(clip_input(images.to(device), encoder)).float(), dim=-1)
