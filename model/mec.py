"""Multi-Excitation Convolution (MEC), paper section 2.2, eq. 3-5, Table 4 kernels.

MEC replaces each 2D conv of an LDM ResBlock. On z of shape (b, c, t, h, w):

    z_hat = TSM(z)                                   temporal shift (Lin et al.), learnable
    z_STE = z_hat + z_hat * sigmoid(Conv3d_333(mean_c z_hat))           eq. 3
    z_CE  = z_hat + z_hat * sigmoid(expand(Conv_t3(squeeze(mean_hw z_hat))))   eq. 4
    z_ME  = z_hat + z_hat * sigmoid(expand(mean_hw(K_33 * s_{t+1} - s_t)))       eq. 5
    u     = mean of the enabled excitation outputs   (z itself when none is enabled)
    s     = Conv2d_33(u)                             per frame, on ((b t), c, h, w)
    MEC   = s + Conv_t(3,1,1)(s)                     the factorised 2D + 1D path

This follows ACTION-Net's Action module (REFERENCE.md): the excitation paths run in parallel on
the shifted input, are summed (we average, so the scale matches z when paths are switched off)
and feed the spatial conv; the temporal (3,1,1) conv is the "2D + 1D" path. Each path can be
switched off (the paper's Table 5 ablation). GroupNorm replaces ACTION-Net's BatchNorm: diffusion
batches are small. With t = 1 (image batches of the joint image-text training) every temporal
path is skipped and MEC is the plain 2D conv.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


@dataclass(frozen=True)
class MECPaths:
    """Which MEC paths are on (all on in the paper's model; Table 5 switches one off at a time)."""

    factorized_temporal: bool = True  # the 1D temporal (3,1,1) conv of the 2D + 1D path
    spatial_temporal: bool = True  # STE, eq. 3
    channel: bool = True  # CE, eq. 4
    motion: bool = True  # ME, eq. 5

    @property
    def any_excitation(self) -> bool:
        return self.spatial_temporal or self.channel or self.motion


class TemporalShift(nn.Module):
    """TSM as a depthwise temporal conv (kernel 3) initialised to a shift, as ACTION-Net does.

    Channels [0, c/8) take the next frame's value (shift back in time), [c/8, c/4) take the
    previous frame's (shift forward), the rest are copied; zero padding at the clip ends.
    The kernel stays learnable.
    """

    def __init__(self, channels: int, fold_div: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, kernel_size=3, padding=1, groups=channels, bias=False)
        fold = channels // fold_div
        weight = torch.zeros(channels, 1, 3)
        weight[:fold, 0, 2] = 1.0  # out[t] = in[t + 1]
        weight[fold : 2 * fold, 0, 0] = 1.0  # out[t] = in[t - 1]
        weight[2 * fold :, 0, 1] = 1.0  # out[t] = in[t]
        self.conv.weight.data.copy_(weight)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (b, c, t, h, w)
        b, c, t, h, w = z.shape
        series = rearrange(z, "b c t h w -> (b h w) c t")
        return rearrange(self.conv(series), "(b h w) c t -> b c t h w", b=b, h=h, w=w)


class SpatialTemporalExcitation(nn.Module):
    """Eq. 3: channel mean -> Conv3d 3x3x3 (1 -> 1) -> sigmoid mask M_S over (t, h, w)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 1, kernel_size=3, padding=1)

    def forward(self, z_hat: torch.Tensor) -> torch.Tensor:
        mask = torch.sigmoid(self.conv(z_hat.mean(dim=1, keepdim=True)))  # (b, 1, t, h, w)
        return z_hat + z_hat * mask


class ChannelExcitation(nn.Module):
    """Eq. 4: spatial mean -> 1x1 squeeze (c -> c/r) -> temporal conv 3 -> 1x1 expand -> sigmoid M_C."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv1d(channels, reduced, kernel_size=1)
        self.temporal = nn.Conv1d(reduced, reduced, kernel_size=3, padding=1)
        self.expand = nn.Conv1d(reduced, channels, kernel_size=1)

    def forward(self, z_hat: torch.Tensor) -> torch.Tensor:
        pooled = z_hat.mean(dim=(3, 4))  # C_1: (b, c, t); channels on the conv axis, time as length
        excitation = self.expand(F.silu(self.temporal(self.squeeze(pooled))))  # C_3: (b, c, t)
        return z_hat + z_hat * torch.sigmoid(excitation)[..., None, None]


class MotionExcitation(nn.Module):
    """Eq. 5: squeeze -> m_t = K_33 * s_{t+1} - s_t (last step zero) -> spatial mean -> expand -> sigmoid M_M."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(channels, reduced, kernel_size=1)
        self.norm = nn.GroupNorm(1, reduced)  # ACTION-Net: BatchNorm; small diffusion batches: GroupNorm
        self.transform = nn.Conv2d(reduced, reduced, kernel_size=3, padding=1)  # K_2D of eq. 5
        self.expand = nn.Conv1d(reduced, channels, kernel_size=1)

    def forward(self, z_hat: torch.Tensor) -> torch.Tensor:
        b, _, t, _, _ = z_hat.shape
        frames = rearrange(z_hat, "b c t h w -> (b t) c h w")
        squeezed = self.norm(self.squeeze(frames))  # (b t, r, h, w)
        transformed = rearrange(self.transform(squeezed), "(b t) r h w -> b r t h w", b=b)
        squeezed = rearrange(squeezed, "(b t) r h w -> b r t h w", b=b)
        motion = transformed[:, :, 1:] - squeezed[:, :, :-1]  # m_{t-1} = K * s_t - s_{t-1}
        motion = F.pad(motion, (0, 0, 0, 0, 0, 1))  # zero motion for the last frame: (b, r, t, h, w)
        excitation = self.expand(motion.mean(dim=(3, 4)))  # (b, c, t)
        return z_hat + z_hat * torch.sigmoid(excitation)[..., None, None]


class MEC(nn.Module):
    """Multi-excitation convolution: (b, c_in, t, h, w) -> (b, c_out, t, h, w)."""

    def __init__(self, in_channels: int, out_channels: int, paths: MECPaths = MECPaths(), reduction: int = 16) -> None:
        super().__init__()
        self.paths = paths
        reduced = max(4, in_channels // reduction)
        self.shift = TemporalShift(in_channels) if paths.any_excitation else None
        self.ste = SpatialTemporalExcitation() if paths.spatial_temporal else None
        self.ce = ChannelExcitation(in_channels, reduced) if paths.channel else None
        self.me = MotionExcitation(in_channels, reduced) if paths.motion else None
        self.spatial = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.temporal = nn.Conv1d(out_channels, out_channels, kernel_size=3, padding=1) if paths.factorized_temporal else None

    def excite(self, z: torch.Tensor) -> torch.Tensor:
        if self.shift is None or z.shape[2] == 1:
            return z
        z_hat = self.shift(z)
        outputs = [path(z_hat) for path in (self.ste, self.ce, self.me) if path is not None]
        return torch.stack(outputs).mean(dim=0)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        b, _, t, h, w = z.shape
        u = self.excite(z)
        s = self.spatial(rearrange(u, "b c t h w -> (b t) c h w"))
        if self.temporal is None or t == 1:
            return rearrange(s, "(b t) c h w -> b c t h w", b=b)
        series = rearrange(s, "(b t) c h w -> (b h w) c t", b=b)
        series = series + self.temporal(series)  # the 1D temporal half of the 2D + 1D path
        return rearrange(series, "(b h w) c t -> b c t h w", b=b, h=h, w=w)
