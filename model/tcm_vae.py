"""TCM-VAE: the temporal-compensated video decoder (paper section 2.3, appendix C, Figures 3, 9, 10).

The image VAE's encoder stays frozen and encodes a video frame by frame (eq. 11). The decoder is
the image VAE's decoder with a Temporal Compensation Module before each decoder block (eq. 12-13):

    F_S^{i-1} = S_i(T_i(z_i) + z_i),     z_M = conv_in(post_quant_conv(z))
    X_hat     = R(S_1(...))

Here the decoder blocks S_i are diffusers' mid block and the four up blocks (M = 5), T_i is a
small residual stack of two MEC convolutions (section 2.2) that runs on (b, c, t, h, w), and R is
the refinement UNet: residual blocks at two resolutions, no attention (Figure 10), added to the
decoded frames. Everything outside the TCMs stays 4-D, ((b t), c, h, w) (appendix C.1).

Both T_i and R end in zero-initialised convolutions, so an untrained TCM-VAE decodes exactly like
the image VAE it was built from; training then only has to learn the temporal correction.

Table 3's other video decoders are built the same way, from the same image decoder and starting
as it (`TCMVAEConfig.video_layers`, both with the TCMs and R off):
    conv3d    the 3-D convolution decoder: every 3x3 convolution of the decoder inflated to 3x3x3
              (the centre frame's taps are the 2-D kernel, the others start at zero);
    videoldm  the temporally fine-tuned decoder of Blattmann et al. (2023): after each decoder
              block a temporal residual block of 3x1x1 convolutions (its last one zeroed, where
              VideoLDM blends with a learned weight; both start as the image decoder).

`FrozenEncoder` returns the frozen encoder's features at the resolution of each TCM, the
targets of the consistency loss L_TCM of eq. 9. When a TCM's width differs from the encoder
feature's (SD's decoder is wider than its encoder at high resolution), a 1x1 projection head maps
the TCM feature to the encoder's width for the loss; the heads take no part in decoding.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from einops import rearrange
from torch import nn

from model.mec import MEC, MECPaths
from model.unet import group_norm


@dataclass(frozen=True)
class TCMVAEConfig:
    temporal_compensation: bool = True  # the TCMs T_i of eq. 13; False = the image decoder
    refinement: bool = True  # the refinement UNet R of eq. 12
    refine_channels: int = 64  # width of R's first level (the second is twice as wide)
    mec_paths: MECPaths = field(default_factory=MECPaths)
    video_layers: str = ""  # Table 3's baselines: "conv3d" | "videoldm" (see the module docstring); "" = none

    def __post_init__(self) -> None:
        if self.video_layers not in VIDEO_LAYERS:
            raise ValueError(f"video_layers {self.video_layers!r} is not one of {', '.join(map(repr, VIDEO_LAYERS))}")

    @property
    def is_image_decoder(self) -> bool:
        return not (self.temporal_compensation or self.refinement or self.video_layers)


VIDEO_LAYERS = ("", "conv3d", "videoldm")


class TemporalCompensation(nn.Module):
    """T_i of eq. 13 on (b, c, t, h, w): norm -> SiLU -> MEC -> norm -> SiLU -> MEC, the last MEC
    zeroed so T_i(z) = 0 at initialisation (the module starts as the identity z -> z + T_i(z))."""

    def __init__(self, channels: int, paths: MECPaths) -> None:
        super().__init__()
        self.norm1, self.conv1 = group_norm(channels), MEC(channels, channels, paths)
        self.norm2, self.conv2 = group_norm(channels), MEC(channels, channels, paths)
        for conv in (self.conv2.spatial, self.conv2.temporal):
            if conv is not None:
                nn.init.zeros_(conv.bias)
        nn.init.zeros_(self.conv2.spatial.weight)  # spatial output 0 -> temporal(0) = its bias = 0

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(z))))))


class InflatedConv3d(nn.Module):
    """A k x k Conv2d inflated to 3 x k x k, run on ((b t), c, h, w) frames of `frames` per video
    (set by the decoder before each forward). The centre frame's taps are the 2-D kernel and the
    other two start at zero, so the layer starts as the 2-D convolution it replaces."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.frames = 1
        self.conv = nn.Conv3d(conv.in_channels, conv.out_channels, (3, *conv.kernel_size), padding=(1, *conv.padding), stride=(1, *conv.stride))
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[:, :, 1] = conv.weight
            self.conv.bias.copy_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        video = rearrange(x, "(b t) c h w -> b c t h w", t=self.frames)
        return rearrange(self.conv(video), "b c t h w -> (b t) c h w")


def inflate_convolutions(module: nn.Module) -> list[InflatedConv3d]:
    """Replace every 3x3 Conv2d below `module` by its InflatedConv3d, in place; returns them."""
    inflated = []
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Conv2d) and child.kernel_size == (3, 3):
            replacement = InflatedConv3d(child)
            setattr(module, name, replacement)
            inflated.append(replacement)
        else:
            inflated += inflate_convolutions(child)
    return inflated


class TemporalResidualBlock(nn.Module):
    """VideoLDM's decoder temporal layer on (b, c, t, h, w): norm -> SiLU -> 3x1x1 conv, twice,
    added to its input; the last conv is zeroed, so the block starts as the identity."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = group_norm(channels), nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0))
        self.norm2, self.conv2 = group_norm(channels), nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0))
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(z))))))


def decoder_block_outputs(vae: AutoencoderKL) -> list[int]:
    """Channel width at the output of each decoder block (mid block, up blocks)."""
    decoder = vae.decoder
    return [decoder.mid_block.resnets[-1].out_channels] + [block.resnets[-1].out_channels for block in decoder.up_blocks]


class ResidualBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = group_norm(in_channels), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2, self.conv2 = group_norm(out_channels), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))


class RefinementUNet(nn.Module):
    """R of eq. 12 (Figure 10): a two-level UNet of residual blocks without attention on the decoded
    frames ((b t), 3, h, w); its output is added to the frames and starts at zero."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        wide = 2 * channels
        self.conv_in = nn.Conv2d(3, channels, 3, padding=1)
        self.down = ResidualBlock2D(channels, channels)
        self.downsample = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        self.middle = nn.Sequential(ResidualBlock2D(channels, wide), ResidualBlock2D(wide, wide))
        self.upsample = nn.Conv2d(wide, channels, 3, padding=1)
        self.up = ResidualBlock2D(2 * channels, channels)  # after concatenating the skip
        self.norm_out, self.conv_out = group_norm(channels), nn.Conv2d(channels, 3, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        skip = self.down(self.conv_in(frames))
        h = self.middle(self.downsample(skip))
        h = self.upsample(F.interpolate(h, size=skip.shape[-2:], mode="nearest"))
        h = self.up(torch.cat([h, skip], dim=1))
        return frames + self.conv_out(F.silu(self.norm_out(h)))


def decoder_block_inputs(vae: AutoencoderKL) -> list[int]:
    """Channel width at the input of each decoder block S_M ... S_1 (mid block, up blocks)."""
    decoder = vae.decoder
    return [decoder.conv_in.out_channels] + [block.resnets[0].in_channels for block in decoder.up_blocks]


def encoder_feature_widths(vae: AutoencoderKL) -> list[int]:
    """Width of the encoder feature paired with each decoder block input (see `encode_with_features`)."""
    encoder = vae.encoder
    widths = [block.resnets[-1].out_channels for block in encoder.down_blocks]
    return [encoder.mid_block.resnets[-1].out_channels, widths[3], widths[1], widths[0], encoder.conv_in.out_channels]


class TCMDecoder(nn.Module):
    """(b, 4, t, h/8, w/8) scaled latents -> (b, 3, t, h, w) frames in [-1, 1]."""

    def __init__(self, vae: AutoencoderKL, config: TCMVAEConfig = TCMVAEConfig()) -> None:
        super().__init__()
        self.config = config
        self.image_vae_config = {key: value for key, value in vae.config.items() if not key.startswith("_")}  # rebuilds the architecture
        self.scaling_factor = float(vae.config.scaling_factor)
        self.post_quant_conv = copy.deepcopy(vae.post_quant_conv).requires_grad_(True)
        self.decoder = copy.deepcopy(vae.decoder).requires_grad_(True).train()
        self.decoder.gradient_checkpointing = False
        widths = decoder_block_inputs(vae)
        self.tcms = nn.ModuleList(TemporalCompensation(c, config.mec_paths) for c in widths) if config.temporal_compensation else None
        self.refine = RefinementUNet(config.refine_channels) if config.refinement else None
        self.inflated = inflate_convolutions(self.decoder) if config.video_layers == "conv3d" else []
        self.temporal_blocks = nn.ModuleList(TemporalResidualBlock(c) for c in decoder_block_outputs(vae)) if config.video_layers == "videoldm" else None
        if self.tcms is not None:  # only for the consistency loss: TCM width -> encoder feature width
            self.feature_heads = nn.ModuleList(
                nn.Conv2d(c, target, 1) if c != target else nn.Identity() for c, target in zip(widths, encoder_feature_widths(vae))
            )

    def compensate(self, level: int, h: torch.Tensor, frames: int) -> torch.Tensor:
        """T_i(z_i) + z_i on the 5-D view of the ((b t), c, h, w) tensor (eq. 13)."""
        z = rearrange(h, "(b t) c h w -> b c t h w", t=frames)
        return rearrange(z + self.tcms[level](z), "b c t h w -> (b t) c h w")

    def forward(self, latents: torch.Tensor, return_features: bool = False):
        frames = latents.shape[2]
        z = rearrange(latents, "b c t h w -> (b t) c h w") / self.scaling_factor
        decoder = self.decoder
        for conv in self.inflated:
            conv.frames = frames
        h = decoder.conv_in(self.post_quant_conv(z))  # z_M
        features = []
        for level, block in enumerate([decoder.mid_block, *decoder.up_blocks]):
            if self.tcms is not None:
                h = self.compensate(level, h, frames)
                features.append(h)  # F_S at this level, for L_TCM
            h = block(h, None)  # S_i
            if self.temporal_blocks is not None:
                video = self.temporal_blocks[level](rearrange(h, "(b t) c h w -> b c t h w", t=frames))
                h = rearrange(video, "b c t h w -> (b t) c h w")
        x = decoder.conv_out(decoder.conv_act(decoder.conv_norm_out(h)))
        if self.refine is not None:
            x = self.refine(x)
        video = rearrange(x, "(b t) c h w -> b c t h w", t=frames)
        return (video, features) if return_features else video

    def projected_features(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        return [head(feature) for head, feature in zip(self.feature_heads, features)]


class FrozenEncoder(nn.Module):
    """The image VAE's encoder, frozen, encoding a video frame by frame (eq. 11)."""

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.encoder, self.quant_conv = vae.encoder, vae.quant_conv
        self.scaling_factor = float(vae.config.scaling_factor)
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> FrozenEncoder:
        return super().train(False)  # always frozen

    @torch.no_grad()
    def forward(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(b, 3, t, h, w) frames in [-1, 1] -> the posterior's mean and std (b, 4, t, h/8, w/8),
        scaled like the latent cache, and the encoder features F_A paired with the TCM levels,
        deepest first, each ((b t), c, h', w'): mid block output, last down block, second down
        block, first down block, conv_in output (the resolutions of the decoder block inputs)."""
        frames = video.shape[2]
        x = rearrange(video, "b c t h w -> (b t) c h w").to(self.quant_conv.weight.dtype)
        encoder = self.encoder
        stem = encoder.conv_in(x)
        h, down_outputs = stem, []
        for block in encoder.down_blocks:
            h = block(h)
            down_outputs.append(h)
        h = encoder.mid_block(h)
        features = [h, down_outputs[3], down_outputs[1], down_outputs[0], stem]
        moments = self.quant_conv(encoder.conv_out(encoder.conv_act(encoder.conv_norm_out(h))))
        mean, logvar = moments.float().chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))  # diffusers' DiagonalGaussianDistribution
        to_video = lambda t: rearrange(t, "(b t) c h w -> b c t h w", t=frames)  # noqa: E731
        return to_video(mean) * self.scaling_factor, to_video(std) * self.scaling_factor, features
