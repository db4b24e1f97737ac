"""The VersVideo denoising UNet (paper section 2.2, Table 4, appendix A).

LDM layout: conv_in -> encoder levels (channel multipliers 1, 2, 4, 4; 2 ResBlocks each; a
MoE-STA block after each ResBlock at the attention levels; a stride-2 downsample between
levels) -> middle (ResBlock, MoE-STA, ResBlock) -> decoder levels (3 ResBlocks each, taking the
encoder's skip features, upsampling between levels) -> conv_out. Every ResBlock conv is an MEC.
Down/upsampling and conv_in/out are per-frame 2D convs, as in video LDMs.

Input and output (b, 4, t, h, w); timesteps (b,); text context (b, 77, context_dim).
`forward(..., down_residuals, mid_residual)` adds ControlNet residuals to the skip features
and the middle output (the encoder-side feature taps; same order as `skip_channels`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.mec import MEC
from model.moe_attention import SpatialTemporalTransformer
from model.presets import UNetConfig


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of diffusion timesteps (b,) -> (b, dim), as in LDM/DDPM."""
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, device=timesteps.device, dtype=torch.float32) / half)
    angles = timesteps.float()[:, None] * frequencies[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32 if channels % 32 == 0 else math.gcd(channels, 8), channels, eps=1e-6)


def per_frame(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2D layer to every frame: (b, c, t, h, w) -> (b, c', t, h', w')."""
    b = x.shape[0]
    return rearrange(layer(rearrange(x, "b c t h w -> (b t) c h w")), "(b t) c h w -> b c t h w", b=b)


class ResBlock(nn.Module):
    """LDM ResBlock with both 3x3 convs replaced by MEC (appendix A), timestep-conditioned."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, config: UNetConfig) -> None:
        super().__init__()
        self.norm1, self.conv1 = group_norm(in_channels), MEC(in_channels, out_channels, config.mec_paths)
        self.emb = nn.Linear(emb_dim, out_channels)
        self.norm2, self.conv2 = group_norm(out_channels), MEC(out_channels, out_channels, config.mec_paths)
        self.dropout = nn.Dropout(config.dropout)
        nn.init.zeros_(self.conv2.spatial.weight)  # the residual branch starts at zero (LDM's zero_module)
        nn.init.zeros_(self.conv2.spatial.bias)
        self.skip = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return per_frame(self.conv, x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return per_frame(lambda frames: self.conv(F.interpolate(frames, scale_factor=2.0, mode="nearest")), x)


class Stage(nn.Module):
    """A ResBlock optionally followed by an MoE-STA block (one entry of the encoder/decoder)."""

    def __init__(self, resblock: nn.Module, attention: nn.Module | None) -> None:
        super().__init__()
        self.resblock, self.attention = resblock, attention

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.resblock(x, emb)
        return self.attention(x, context) if self.attention is not None else x


class VersVideoUNet(nn.Module):
    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        base, emb_dim = config.base_channels, config.base_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(config.in_channels, base, 3, padding=1)

        def transformer(channels: int) -> nn.Module:
            return SpatialTemporalTransformer(channels, config.heads, config.context_dim, config.spatial_experts, config.temporal_experts, config.ff_mult)

        def attention(channels: int, level: int) -> nn.Module | None:
            return transformer(channels) if level in config.attention_levels else None

        self.down = nn.ModuleList()
        skip_channels = [base]
        channels = base
        levels = len(config.channel_mult)
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                self.down.append(Stage(ResBlock(channels, base * mult, emb_dim, config), attention(base * mult, level)))
                channels = base * mult
                skip_channels.append(channels)
            if level < levels - 1:
                self.down.append(Downsample(channels))
                skip_channels.append(channels)
        self.skip_channels = tuple(skip_channels)  # what each ControlNet down residual must match

        self.middle = nn.ModuleList(
            [
                Stage(ResBlock(channels, channels, emb_dim, config), transformer(channels)),
                Stage(ResBlock(channels, channels, emb_dim, config), None),
            ]
        )

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for block in range(config.num_res_blocks + 1):
                self.up.append(Stage(ResBlock(channels + skip_channels.pop(), base * mult, emb_dim, config), attention(base * mult, level)))
                channels = base * mult
                if level > 0 and block == config.num_res_blocks:
                    self.up.append(Upsample(channels))
        self.norm_out = group_norm(channels)
        self.conv_out = nn.Conv2d(channels, config.in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def _run(self, block: nn.Module, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
            # Non-reentrant checkpointing restores the RNG state, so MoE shuffles and dropout
            # repeat exactly in the recomputation.
            return checkpoint(block, x, emb, context, use_reentrant=False)
        return block(x, emb, context)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        down_residuals: list[torch.Tensor] | None = None,
        mid_residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (b, 4, t, h, w), timesteps (b,), context (b, 77, context_dim) -> prediction like x."""
        emb = self.time_embed(timestep_embedding(timesteps, self.config.base_channels).to(x.dtype))
        h = per_frame(self.conv_in, x)
        skips = [h]
        for block in self.down:
            h = self._run(block, h, emb, context)
            skips.append(h)
        for block in self.middle:
            h = self._run(block, h, emb, context)
        if down_residuals is not None:
            skips = [skip + residual for skip, residual in zip(skips, down_residuals, strict=True)]
        if mid_residual is not None:
            h = h + mid_residual
        for block in self.up:
            if isinstance(block, Stage):
                h = torch.cat([h, skips.pop()], dim=1)
            h = self._run(block, h, emb, context)
        return per_frame(self.conv_out, F.silu(self.norm_out(h)))  # GroupNorm over (c/g, t, h, w), as in the ResBlocks
