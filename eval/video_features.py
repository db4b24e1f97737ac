"""The video networks behind FVD and the video Inception Score, called as StyleGAN-V calls them.

- FVD: `i3d_torchscript.pt` (the TF-Hub Kinetics-400 I3D of the original FVD, as torchscript),
  input uint8 (b, 3, t, h, w), called with `rescale=True, resize=True, return_features=True`: the
  network itself rescales to [-1, 1] and resizes to 224x224, and returns the 400-d logits before
  the softmax. StyleGAN-V's protocol uses 16 frames.
- IS: `c3d_ucf101.pt` (TGANv2's UCF-101 C3D as torchscript), input uint8 (b, 3, 16, h, w), called
  with no keyword arguments; it returns class probabilities (101).

Both load with `torch.jit.load` from a local path (torchscript, never a pickle). The smoke preset,
which has neither file, uses `RandomVideoNet`: a seeded random 3-D conv net with the same call
convention and output sizes. Its numbers only check the plumbing (`comparable: false`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from model.weights import file_digest

I3D_FEATURES = 400
UCF101_CLASSES = 101


class FeatureNetError(ValueError):
    pass


def load_torchscript(path: str | Path, setting: str) -> torch.jit.ScriptModule:
    path = Path(path)
    if not path.is_file():
        raise FeatureNetError(f"{path}: weight file not found; set {setting} to a local file (nothing is downloaded)")
    try:
        return torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as error:  # not a torchscript archive (e.g. a state dict or a pickle)
        raise FeatureNetError(f"{path}: not a torchscript file torch.jit.load can read ({str(error).splitlines()[0]}); {setting} must name StyleGAN-V's torchscript") from None


class RandomVideoNet(nn.Module):
    """Seeded stand-in for I3D / C3D (smoke only): uint8 (b, 3, t, h, w) -> features or probabilities.

    A fixed random projection of what the clip looks like (pixels pooled to 4 x 8 x 8) and how it
    moves (frame differences, pooled alike). Unlike a random-init deep net, whose outputs hardly
    depend on the input, its outputs separate different videos, so the smoke metrics respond to
    what the model generates even though they compare with nothing published."""

    POOL = (4, 8, 8)

    def __init__(self, outputs: int, seed: int, temperature: float = 4.0) -> None:
        super().__init__()
        inputs = 2 * 3 * self.POOL[0] * self.POOL[1] * self.POOL[2]
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("projection", torch.randn(inputs, outputs, generator=generator) / inputs**0.5)
        self.temperature = temperature

    def forward(self, videos: torch.Tensor, rescale: bool = True, resize: bool = True, return_features: bool = False) -> torch.Tensor:
        x = videos.float() / 127.5 - 1
        motion = x[:, :, 1:] - x[:, :, :-1] if x.shape[2] > 1 else torch.zeros_like(x)
        pooled = [F.adaptive_avg_pool3d(part, self.POOL).flatten(1) for part in (x, motion)]
        features = torch.cat(pooled, dim=1) @ self.projection
        return features if return_features else (self.temperature * features).softmax(dim=-1)


def module_device(module: nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def call(network: nn.Module, name: str, expected: str, videos: torch.Tensor, **kwargs) -> torch.Tensor:
    """network(videos) on the network's device, returned on the CPU."""
    try:
        return network(videos.to(module_device(network)), **kwargs).cpu()
    except (RuntimeError, torch.jit.Error) as error:  # how torchscript reports a wrong network, deep inside
        raise FeatureNetError(f"{name}: failed on a uint8 {tuple(videos.shape)} video batch ({str(error).strip().splitlines()[-1]}); is it StyleGAN-V's {expected}?") from None


class FVDFeatures:
    """uint8 (b, 3, t, h, w) -> (b, 400) I3D features."""

    def __init__(self, network: nn.Module, name: str) -> None:
        self.network, self.name = network, name

    @torch.no_grad()
    def __call__(self, videos: torch.Tensor) -> torch.Tensor:
        features = call(self.network, self.name, "i3d_torchscript.pt", videos, rescale=True, resize=True, return_features=True).float()
        if features.ndim != 2 or features.shape[1] != I3D_FEATURES:
            raise FeatureNetError(f"{self.name}: returned features of shape {tuple(features.shape)}, expected (b, {I3D_FEATURES}); is it StyleGAN-V's i3d_torchscript.pt?")
        return features


class ISProbabilities:
    """uint8 (b, 3, 16, h, w) -> (b, 101) class probabilities of the UCF-101 C3D."""

    def __init__(self, network: nn.Module, name: str) -> None:
        self.network, self.name = network, name

    @torch.no_grad()
    def __call__(self, videos: torch.Tensor) -> torch.Tensor:
        probabilities = call(self.network, self.name, "c3d_ucf101.pt", videos).double()
        if probabilities.ndim != 2:
            raise FeatureNetError(f"{self.name}: returned shape {tuple(probabilities.shape)}, expected (b, classes)")
        if not torch.allclose(probabilities.sum(dim=1), torch.ones(len(probabilities), dtype=torch.float64), atol=1e-3):
            raise FeatureNetError(f"{self.name}: outputs are not probabilities (rows do not sum to 1); is it StyleGAN-V's c3d_ucf101.pt?")
        return probabilities


def fvd_weights_id(weights: str, seed: int) -> str:
    """What identifies the FVD network in a protocol record: the file's sha256, or the stand-in's seed."""
    return file_digest(weights) if weights else f"random-i3d-seed{seed}"


def is_weights_id(weights: str, seed: int) -> str:
    return file_digest(weights) if weights else f"random-c3d-seed{seed + 1}"


def fvd_network(weights: str, setting: str, seed: int) -> tuple[FVDFeatures, str]:
    """(feature extractor, weights id): the I3D torchscript, or the seeded stand-in when weights is ''."""
    if not weights:
        return FVDFeatures(RandomVideoNet(I3D_FEATURES, seed), "random I3D stand-in"), fvd_weights_id(weights, seed)
    return FVDFeatures(load_torchscript(weights, setting), str(weights)), fvd_weights_id(weights, seed)


def is_network(weights: str, setting: str, seed: int) -> tuple[ISProbabilities, str]:
    if not weights:
        return ISProbabilities(RandomVideoNet(UCF101_CLASSES, seed + 1), "random C3D stand-in"), is_weights_id(weights, seed)
    return ISProbabilities(load_torchscript(weights, setting), str(weights)), is_weights_id(weights, seed)
