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
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class MECPaths:
    """Which MEC paths are on (all on in the paper's model; Table 5 switches one off at a time)."""

    factorized_temporal: bool = True  # the 1D temporal (3,1,1) conv of the 2D + 1D path
    spatial_temporal: bool = True  # STE, eq. 3
    channel: bool = True  # CE, eq. 4
    motion: bool = True  # ME, eq. 5

    # Table 5's column names for the paths (train_unet.mec_paths lists the ones that are on)
    NAMES: ClassVar[dict[str, str]] = {"2d+1d": "factorized_temporal", "ste": "spatial_temporal", "ce": "channel", "me": "motion"}

    @property
    def any_excitation(self) -> bool:
        return self.spatial_temporal or self.channel or self.motion

    @classmethod
    def from_names(cls, names: str) -> MECPaths:
        """'2d+1d,ste,ce,me' (all on, the paper's MEC) ... '' (plain 2-D convolutions)."""
        chosen = {name.strip() for name in names.split(",") if name.strip()}
        unknown = chosen - set(cls.NAMES)
        if unknown:
            raise ValueError(f"unknown MEC path(s) {', '.join(sorted(unknown))}; choose from {', '.join(cls.NAMES)}")
        return cls(**{field: name in chosen for name, field in cls.NAMES.items()})


class TemporalShift(nn.Module):
    """TSM as a learnable depthwise temporal kernel of size 3, initialised to a shift (ACTION-Net).

    Channels [0, c/8) take the next frame's value (shift back in time), [c/8, c/4) take the
    previous frame's (shift forward), the rest are copied; zero padding at the clip ends.
    Computed as three weighted, time-shifted views of z: no permute copies.
    """

    def __init__(self, channels: int, fold_div: int = 8) -> None:
        super().__init__()
        fold = channels // fold_div
        weight = torch.zeros(channels, 3)  # taps on frames t-1, t, t+1
        weight[:fold, 2] = 1.0  # out[t] = in[t + 1]
        weight[fold : 2 * fold, 0] = 1.0  # out[t] = in[t - 1]
        weight[2 * fold :, 1] = 1.0  # out[t] = in[t]
        self.weight = nn.Parameter(weight)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (b, c, t, h, w)
        padded = F.pad(z, (0, 0, 0, 0, 1, 1))
        taps = self.weight.to(z.dtype)[None, :, :, None, None, None]  # (1, c, 3, 1, 1, 1)
        return padded[:, :, :-2] * taps[:, :, 0] + padded[:, :, 1:-1] * taps[:, :, 1] + padded[:, :, 2:] * taps[:, :, 2]


# Each excitation returns its mask M (eq. 3-5); MEC applies them together (see MEC.excite).


class SpatialTemporalExcitation(nn.Module):
    """Eq. 3 mask: channel mean -> Conv3d 3x3x3 (1 -> 1) -> sigmoid, M_S of shape (b, 1, t, h, w)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 1, kernel_size=3, padding=1)

    def forward(self, z_hat: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.conv(z_hat.mean(dim=1, keepdim=True)))


class ChannelExcitation(nn.Module):
    """Eq. 4 mask: spatial mean -> 1x1 squeeze (c -> c/r) -> temporal conv 3 -> 1x1 expand ->
    sigmoid, M_C of shape (b, c, t, 1, 1)."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv1d(channels, reduced, kernel_size=1)
        self.temporal = nn.Conv1d(reduced, reduced, kernel_size=3, padding=1)
        self.expand = nn.Conv1d(reduced, channels, kernel_size=1)

    def forward(self, z_hat: torch.Tensor) -> torch.Tensor:
        pooled = z_hat.mean(dim=(3, 4))  # C_1: (b, c, t); channels on the conv axis, time as length
        excitation = self.expand(F.silu(self.temporal(self.squeeze(pooled))))  # C_3: (b, c, t)
        return torch.sigmoid(excitation)[..., None, None]


class MotionExcitation(nn.Module):
    """Eq. 5 mask: squeeze -> m_t = K_33 * s_{t+1} - s_t (zero for the last frame) -> spatial
    mean -> expand -> sigmoid, M_M of shape (b, c, t, 1, 1)."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv3d(channels, reduced, kernel_size=1)
        self.norm = nn.GroupNorm(1, reduced)  # ACTION-Net: BatchNorm; small diffusion batches: GroupNorm
        self.transform = nn.Conv3d(reduced, reduced, kernel_size=(1, 3, 3), padding=(0, 1, 1))  # K_2D, per frame
        self.expand = nn.Conv1d(reduced, channels, kernel_size=1)

    def forward(self, z_hat: torch.Tensor) -> torch.Tensor:
        squeezed = self.norm(self.squeeze(z_hat))  # s: (b, r, t, h, w)
        motion = self.transform(squeezed[:, :, 1:]) - squeezed[:, :, :-1]  # m_{t-1} = K * s_t - s_{t-1}
        pooled = F.pad(motion.mean(dim=(3, 4)), (0, 1))  # (b, r, t): zero motion for the last frame
        return torch.sigmoid(self.expand(pooled))[..., None, None]


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
        # Per-frame 3x3 and per-pixel 3-tap temporal convs, both on the 5-D tensor (no permutes).
        self.spatial = nn.Conv3d(in_channels, out_channels, kernel_size=(1, 3, 3), padding=(0, 1, 1))
        self.temporal = nn.Conv3d(out_channels, out_channels, kernel_size=(3, 1, 1), padding=(1, 0, 0)) if paths.factorized_temporal else None

    def excite(self, z: torch.Tensor) -> torch.Tensor:
        """Mean over the enabled paths of z_p = z_hat + z_hat * M_p (eq. 3-5), computed as
        z_hat * (1 + mean_p M_p): the masks broadcast, so one full-size multiply suffices."""
        if self.shift is None or z.shape[2] == 1:
            return z
        z_hat = self.shift(z)
        masks = [path(z_hat) for path in (self.ste, self.ce, self.me) if path is not None]
        return z_hat * (1 + sum(masks) / len(masks))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        s = self.spatial(self.excite(z))
        if self.temporal is None or z.shape[2] == 1:
            return s
        return s + self.temporal(s)  # the 1D temporal half of the factorised 2D + 1D path
