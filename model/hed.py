"""HED soft edges (Xie & Tu 2015) for the HED condition (paper section 2.4), in the two public weight
layouts peers use, loaded from a local file:

- `network-bsds500.pth` (sniklaus/pytorch-hed, the BSDS500 HED): VGG-16 stages, one 1x1 score conv
  per stage, scores upsampled to the input size and fused by a 1x1 conv + sigmoid. Input: BGR,
  0..255 minus the Caffe means. Keys `moduleVggOne.0.weight` ... (or `netVggOne...`).
- `ControlNetHED.pth` (lllyasviel's ControlNetHED_Apache2, ControlNet 1.1's annotator): five
  conv blocks with a 1x1 projection each; the edge map is sigmoid(mean of the five projections
  upsampled to the input size). Input: RGB 0..255 minus a learned `norm`. Keys `norm`,
  `block1.convs.0.weight` ...

Both map frames (n, 3, H, W) RGB in [0, 1] to edge maps (n, 1, H, W) in [0, 1].
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from model.weights import WeightsError, load_into, load_state_dict

# (input channels, output channels, convs) of the five VGG-16 stages both layouts follow
STAGES = ((3, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3), (512, 512, 3))
CAFFE_BGR_MEAN = (104.00698793, 116.66876762, 122.67891434)


def upsampled(maps: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Side outputs (n, 1, h_i, w_i) -> (n, k, H, W), bilinear with half-pixel centres (cv2.resize's INTER_LINEAR)."""
    return torch.cat([F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps], dim=1)


class HEDBsds500(nn.Module):
    """sniklaus/pytorch-hed's network; its module names, so the file loads as it is."""

    def __init__(self) -> None:
        super().__init__()
        names = ("One", "Two", "Thr", "Fou", "Fiv")
        for index, (name, (cin, cout, convs)) in enumerate(zip(names, STAGES)):
            layers: list[nn.Module] = [nn.MaxPool2d(2, 2)] if index else []
            for k in range(convs):
                layers += [nn.Conv2d(cin if k == 0 else cout, cout, 3, padding=1), nn.ReLU()]
            setattr(self, f"netVgg{name}", nn.Sequential(*layers))
            setattr(self, f"netScore{name}", nn.Conv2d(cout, 1, 1))
        self.names = names
        self.netCombine = nn.Sequential(nn.Conv2d(5, 1, 1), nn.Sigmoid())

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = frames.flip(1) * 255.0 - torch.tensor(CAFFE_BGR_MEAN, device=frames.device, dtype=frames.dtype).view(1, 3, 1, 1)
        scores = []
        for name in self.names:
            x = getattr(self, f"netVgg{name}")(x)
            scores.append(getattr(self, f"netScore{name}")(x))
        return self.netCombine(upsampled(scores, frames.shape[-2:]))


class DoubleConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int, convs: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(cin if k == 0 else cout, cout, 3, padding=1) for k in range(convs))
        self.projection = nn.Conv2d(cout, 1, 1)

    def forward(self, x: torch.Tensor, down_sampling: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if down_sampling:
            x = F.max_pool2d(x, 2, 2)
        for conv in self.convs:
            x = F.relu(conv(x))
        return x, self.projection(x)


class ControlNetHED(nn.Module):
    """ControlNet 1.1's HED annotator network; its module names, so the file loads as it is."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
        for index, (cin, cout, convs) in enumerate(STAGES, start=1):
            setattr(self, f"block{index}", DoubleConvBlock(cin, cout, convs))

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = frames * 255.0 - self.norm
        projections = []
        for index in range(1, len(STAGES) + 1):
            x, projection = getattr(self, f"block{index}")(x, down_sampling=index > 1)
            projections.append(projection)
        return torch.sigmoid(upsampled(projections, frames.shape[-2:]).mean(dim=1, keepdim=True))


def load_hed(path: str | Path, setting: str) -> nn.Module:
    """A frozen HED network from either public file; the layout is recognised by its keys."""
    state = load_state_dict(path, setting)
    if "block1.convs.0.weight" in state:
        network: nn.Module = ControlNetHED()
    elif any(name.startswith(("moduleVgg", "netVgg")) for name in state):
        network = HEDBsds500()
        state = {"net" + name.removeprefix("module") if name.startswith("module") else name: tensor for name, tensor in state.items()}
    else:
        raise WeightsError(f"{path}: neither HED layout (no 'block1.convs.0.weight' of ControlNetHED.pth, no 'moduleVggOne.0.weight' of "
                           f"network-bsds500.pth); set {setting} to one of those files")
    load_into(network, state, path)
    return network.requires_grad_(False).eval()


def random_hed(seed: int) -> nn.Module:
    """The smoke preset's stand-in (ControlNetHED layout, seeded): its edges mean nothing."""
    with torch.random.fork_rng(devices=[]):  # the caller's random stream stays where it was
        torch.manual_seed(seed)
        return ControlNetHED().requires_grad_(False).eval()
