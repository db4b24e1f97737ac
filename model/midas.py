"""MiDaS v3 DPT-Hybrid (Ranftl et al. 2021, "Vision Transformers for Dense Prediction") for the depth
condition (paper section 2.4): the depth annotator of ControlNet and its video peers, loaded from
the public `dpt_hybrid-midas-501f0c75.pt` on a local path.

Encoder: timm's hybrid ViT-B/16 (`vit_base_r50_s16_384`): a BiT ResNet-50 stem and stages 1-3 make
the 1/16 feature map, a 1x1 conv turns it into tokens, twelve transformer blocks follow. DPT taps
four maps: ResNet stages 1 and 2 (1/4, 1/8 of the input) and the tokens after blocks 9 and 12,
"reassembled" into maps: the class token mixed into every patch token (the `project` readout),
tokens back onto their grid, a 1x1 conv, and for the last a stride-2 3x3 conv down to 1/32.
Decoder: a 3x3 conv takes each map to 256 channels; RefineNet-style fusion blocks merge them coarse
to fine (residual conv units, x2 bilinear upsampling, a 1x1 conv); a conv head predicts one channel
of non-negative relative inverse depth at the input size.

Input: RGB scaled to [-1, 1] (MiDaS's mean 0.5, std 0.5), height and width multiples of 32; the
position embeddings, learned on a 24x24 grid (384 px), are resized bilinearly to other grids.

The file's keys are MiDaS's module names (`pretrained.model.*` is the timm ViT,
`pretrained.act_postprocess{3,4}.*` the reassembly, `scratch.*` the decoder); `ours_from_midas`
translates them to the names below. Its 1000-class `head` is not part of DPT and is dropped.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from model.weights import WeightsError, load_into, load_state_dict

FEATURES = 256  # decoder width
TAPPED_BLOCKS = (8, 11)  # transformer blocks whose outputs DPT-Hybrid reassembles (0-based)
RESNET_CHANNELS = (256, 512)  # ResNet stages 1 and 2


class ProjectReadout(nn.Module):
    """DPT's `project` readout: each patch token concatenated with the class token, then Linear+GELU."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.project = nn.Sequential(nn.Linear(2 * width, width), nn.GELU())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, 1:]
        return self.project(torch.cat([patches, tokens[:, :1].expand_as(patches)], dim=-1))


class ResidualConvUnit(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FusionBlock(nn.Module):
    """Adds the refined skip map to the coarser path, refines, upsamples (bilinear, corners aligned) to
    the next finer map's size (x2 for the last), then mixes channels with a 1x1 conv."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.skip_unit = ResidualConvUnit(features)
        self.refine_unit = ResidualConvUnit(features)
        self.out_conv = nn.Conv2d(features, features, 1)

    def forward(self, path: torch.Tensor, skip: torch.Tensor | None = None, size: tuple[int, int] | None = None) -> torch.Tensor:
        if skip is not None:
            path = path + self.skip_unit(skip)
        path = self.refine_unit(path)
        size = size or (2 * path.shape[-2], 2 * path.shape[-1])
        return self.out_conv(F.interpolate(path, size=size, mode="bilinear", align_corners=True))


class DPTHybridDepth(nn.Module):
    """(n, 3, H, W) RGB in [-1, 1] -> (n, H, W) relative inverse depth (larger is nearer)."""

    def __init__(self) -> None:
        super().__init__()
        import timm  # the backbone MiDaS itself builds on: its module names are the file's

        self.encoder = timm.create_model("vit_base_r50_s16_384", pretrained=False, num_classes=0)
        width = self.encoder.embed_dim
        self.readout3, self.readout4 = ProjectReadout(width), ProjectReadout(width)
        self.reassemble3 = nn.Conv2d(width, width, 1)
        self.reassemble4 = nn.Sequential(nn.Conv2d(width, width, 1), nn.Conv2d(width, width, 3, stride=2, padding=1))
        self.to_features = nn.ModuleList(nn.Conv2d(channels, FEATURES, 3, padding=1, bias=False) for channels in (*RESNET_CHANNELS, width, width))
        self.fusion = nn.ModuleList(FusionBlock(FEATURES) for _ in range(4))  # fusion[k] fuses map k (0: finest)
        self.head = nn.Sequential(
            nn.Conv2d(FEATURES, FEATURES // 2, 3, padding=1),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
            nn.Conv2d(FEATURES // 2, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 1, 1),
            nn.ReLU(),  # non-negative inverse depth
        )

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """The class token's embedding and the patch grid's, bilinearly resized from the 24x24 it learned."""
        embedding = self.encoder.pos_embed
        learned = int((embedding.shape[1] - 1) ** 0.5)
        patches = embedding[:, 1:].reshape(1, learned, learned, -1).permute(0, 3, 1, 2)
        patches = F.interpolate(patches, size=grid, mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
        return torch.cat([embedding[:, :1], patches], dim=1)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The four maps DPT fuses, at 1/4, 1/8, 1/16 and 1/32 of the input."""
        vit, resnet = self.encoder, self.encoder.patch_embed.backbone
        quarter = resnet.stages[0](resnet.stem(images))
        eighth = resnet.stages[1](quarter)
        patches = vit.patch_embed.proj(resnet.norm(resnet.stages[2](eighth)))
        grid = tuple(patches.shape[-2:])
        tokens = torch.cat([vit.cls_token.expand(len(images), -1, -1), patches.flatten(2).transpose(1, 2)], dim=1)
        tokens = vit.pos_drop(tokens + self.position_embedding(grid))
        tapped = []
        for index, block in enumerate(vit.blocks):
            tokens = block(tokens)
            if index in TAPPED_BLOCKS:
                tapped.append(tokens)  # before the ViT's final norm, as DPT's forward hooks see them

        def on_grid(readout: ProjectReadout, block_tokens: torch.Tensor) -> torch.Tensor:
            return readout(block_tokens).transpose(1, 2).unflatten(2, grid)

        return quarter, eighth, self.reassemble3(on_grid(self.readout3, tapped[0])), self.reassemble4(on_grid(self.readout4, tapped[1]))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = [conv(feature) for conv, feature in zip(self.to_features, self.encode(images))]
        path = self.fusion[3](maps[3], size=maps[2].shape[-2:])
        for k in (2, 1):
            path = self.fusion[k](path, maps[k], size=maps[k - 1].shape[-2:])
        path = self.fusion[0](path, maps[0])
        return self.head(path)[:, 0]


# MiDaS's module name -> ours, first match wins
MIDAS_NAMES = (
    (r"^pretrained\.model\.", "encoder."),
    (r"^pretrained\.act_postprocess([34])\.0\.project\.", r"readout\1.project."),
    (r"^pretrained\.act_postprocess3\.3\.", "reassemble3."),
    (r"^pretrained\.act_postprocess4\.3\.", "reassemble4.0."),
    (r"^pretrained\.act_postprocess4\.4\.", "reassemble4.1."),
    (r"^scratch\.output_conv\.", "head."),
)
SCRATCH_MAPS = re.compile(r"^scratch\.layer([1-4])_rn\.")
SCRATCH_FUSION = re.compile(r"^scratch\.refinenet([1-4])\.(resConfUnit1|resConfUnit2|out_conv)\.")
FUSION_PARTS = {"resConfUnit1": "skip_unit", "resConfUnit2": "refine_unit", "out_conv": "out_conv"}


def ours_from_midas(name: str) -> str:
    if match := SCRATCH_MAPS.match(name):
        return f"to_features.{int(match[1]) - 1}.{name[match.end():]}"
    if match := SCRATCH_FUSION.match(name):
        return f"fusion.{int(match[1]) - 1}.{FUSION_PARTS[match[2]]}.{name[match.end():]}"
    for pattern, replacement in MIDAS_NAMES:
        if re.match(pattern, name):
            return re.sub(pattern, replacement, name)
    return name  # not MiDaS's: load_into reports it as unexpected


def load_midas(path: str | Path, setting: str) -> DPTHybridDepth:
    """A frozen DPT-Hybrid from MiDaS's file (keys as MiDaS saves them; also inside a {"model": ...} checkpoint)."""
    state = load_state_dict(path, setting)
    if "scratch.output_conv.0.weight" not in state or "pretrained.model.patch_embed.backbone.stem.conv.weight" not in state:
        raise WeightsError(f"{path}: not MiDaS DPT-Hybrid weights (no 'scratch.output_conv.0.weight' and "
                           f"'pretrained.model.patch_embed.backbone.stem.conv.weight' of dpt_hybrid-midas-501f0c75.pt); set {setting} to that file")
    converted, source_names = {}, {}
    for name, tensor in state.items():
        if name.startswith("pretrained.model.head."):
            continue  # ImageNet classifier, unused by DPT
        ours = ours_from_midas(name)
        converted[ours], source_names[ours] = tensor, name
    network = DPTHybridDepth()
    load_into(network, converted, path, source_names)
    return network.requires_grad_(False).eval()


def random_midas(seed: int) -> DPTHybridDepth:
    """The smoke preset's stand-in (seeded random weights): its depth means nothing."""
    with torch.random.fork_rng(devices=[]):  # the caller's random stream stays where it was
        torch.manual_seed(seed)
        return DPTHybridDepth().requires_grad_(False).eval()
