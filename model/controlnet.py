"""Versatile conditions (paper section 2.4, Figure 4): one shared video ControlNet for every visual
condition, each condition type entering through its own light adapter (eq. 10), and style tokens
from a frozen CLIP image encoder through a trainable linear adapter.

    condition video (b, 3, t, H, W) in [0, 1], type k (b,)
      -> adapter k (eq. 10; the others see nothing)                      (b, base, t, H/8, W/8)
      -> added to the ControlNet's conv_in output (as ControlNet adds its hint)
      -> ControlNet = a trainable copy of the UNet's encoder and middle block
      -> one zero-initialised 1x1 conv per encoder tap and for the middle
      -> residuals added to the frozen UNet's skip connections and middle output (x control_scale)

Style (section 2.4): the frozen CLIP image embedding (b, e) -> linear adapter -> `style_tokens`
tokens of the context width, appended after the 77 text tokens in the cross-attention of both the
UNet and the ControlNet. The text path's adapter is the identity: the text context is used as is.

The UNet stays frozen: at initialisation every residual is exactly zero, so a fresh ControlNet
leaves the UNet's prediction unchanged (ControlNet's zero convolutions).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from model.presets import ControlNetConfig
from model.unet import VersVideoUNet, per_frame, timestep_embedding

# The visual conditions in adapter order: `k` of eq. 10 is an index into this tuple.
CONDITIONS = ("canny", "hed", "depth", "image")


def zero_module(module: nn.Module) -> nn.Module:
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


class ConditionAdapter(nn.Module):
    """One condition type's adapter F_Cov^(i) of eq. 10: per-frame convs from the condition
    frames (3, H, W) down to the latent grid (out_channels, H/8, W/8)."""

    def __init__(self, out_channels: int, channels: tuple[int, int, int, int]) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, channels[0], 3, padding=1), nn.SiLU()]
        for width, wider in zip(channels[:-1], channels[1:]):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.SiLU(), nn.Conv2d(width, wider, 3, padding=1, stride=2), nn.SiLU()]
        # Not zero-initialised (ControlNet's hint block is): the output zero convs already make a fresh
        # ControlNet a no-op, and a second zero layer in series gives the adapter no gradient until
        # the zero convs have moved, which slowed learning several-fold in our smoke runs
        layers.append(nn.Conv2d(channels[-1], out_channels, 3, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        return per_frame(self.layers, condition)


class ConditionAdapters(nn.Module):
    """Eq. 10: F_Adapter(I_c^k) = sum_i 1(i == k) F_Cov^(i)(I_c^k). Each sample goes through the
    adapter of its own condition type only, so only that adapter receives its gradient."""

    def __init__(self, out_channels: int, channels: tuple[int, int, int, int], num_conditions: int = len(CONDITIONS)) -> None:
        super().__init__()
        self.adapters = nn.ModuleList(ConditionAdapter(out_channels, channels) for _ in range(num_conditions))
        self.out_channels = out_channels

    def forward(self, condition: torch.Tensor, kind: torch.Tensor) -> torch.Tensor:
        """condition (b, 3, t, H, W) in [0, 1], kind (b,) condition indices -> (b, c, t, H/8, W/8)."""
        if kind.min() < 0 or kind.max() >= len(self.adapters):
            raise ValueError(f"condition index out of range 0..{len(self.adapters) - 1}: {kind.tolist()}")
        outputs: list[torch.Tensor | None] = [None] * condition.shape[0]
        for index, adapter in enumerate(self.adapters):
            samples = (kind == index).nonzero().flatten().tolist()
            if samples:
                for sample, features in zip(samples, adapter(condition[samples])):
                    outputs[sample] = features
        return torch.stack(outputs)


class VideoControlNet(nn.Module):
    """A trainable copy of the UNet's time embedding, conv_in, encoder and middle block, fed the
    adapted condition, with a zero conv per encoder tap (in `unet.skip_channels` order)."""

    def __init__(self, unet: VersVideoUNet, config: ControlNetConfig) -> None:
        super().__init__()
        self.unet_config, self.config = unet.config, config
        self.time_embed = copy.deepcopy(unet.time_embed)  # copies carry the trained UNet's weights
        self.conv_in = copy.deepcopy(unet.conv_in)
        self.down = copy.deepcopy(unet.down)
        self.middle = copy.deepcopy(unet.middle)
        self.requires_grad_(True)  # the UNet is frozen; its copy trains
        self.adapters = ConditionAdapters(unet.config.base_channels, config.adapter_channels)
        self.zero_convs = nn.ModuleList(zero_module(nn.Conv2d(channels, channels, 1)) for channels in unet.skip_channels)
        self.middle_zero_conv = zero_module(nn.Conv2d(unet.skip_channels[-1], unet.skip_channels[-1], 1))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, condition: torch.Tensor, kind: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """x (b, 4, t, h, w) -> (down residuals, one per UNet skip; middle residual)."""
        emb = self.time_embed(timestep_embedding(timesteps, self.unet_config.base_channels).to(x.dtype))
        h = per_frame(self.conv_in, x) + self.adapters(condition, kind).to(x.dtype)
        residuals = [per_frame(self.zero_convs[0], h)]
        for block, zero_conv in zip(self.down, self.zero_convs[1:], strict=True):
            h = block(h, emb, context)
            residuals.append(per_frame(zero_conv, h))
        for block in self.middle:
            h = block(h, emb, context)
        return residuals, per_frame(self.middle_zero_conv, h)


class StyleAdapter(nn.Module):
    """CLIP image embedding (b, e) -> style tokens (b, n, context_dim): IP-Adapter's linear
    projection + LayerNorm, the trainable part of the style path."""

    def __init__(self, image_embed_dim: int, context_dim: int, tokens: int) -> None:
        super().__init__()
        self.tokens, self.context_dim = tokens, context_dim
        self.proj = nn.Linear(image_embed_dim, tokens * context_dim)
        self.norm = nn.LayerNorm(context_dim)

    def forward(self, image_embedding: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(image_embedding).unflatten(-1, (self.tokens, self.context_dim)))


class ControlledUNet(nn.Module):
    """The frozen UNet steered by the shared ControlNet and the style tokens (Figure 4).

    Called like the UNet, plus the condition: (x, timesteps, context, condition, kind, style).
    With no condition and no style it is exactly the UNet."""

    def __init__(self, unet: VersVideoUNet, controlnet: VideoControlNet, style: StyleAdapter | None) -> None:
        super().__init__()
        self.unet = unet.requires_grad_(False).eval()
        self.controlnet, self.style = controlnet, style

    def train(self, mode: bool = True) -> ControlledUNet:
        super().train(mode)
        self.unet.eval()  # frozen: no dropout, merged experts, whatever the wrapper's mode
        return self

    def with_style(self, context: torch.Tensor, style_embedding: torch.Tensor | None) -> torch.Tensor:
        """Text context (b, 77, d) -> (b, 77 + n, d): the style tokens follow the text tokens."""
        if style_embedding is None:
            return context
        if self.style is None:
            raise ValueError("a style embedding was given, but this ControlNet was trained without a style adapter")
        return torch.cat([context, self.style(style_embedding.to(context.dtype))], dim=1)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        condition: torch.Tensor | None = None,
        kind: torch.Tensor | None = None,
        style_embedding: torch.Tensor | None = None,
        control_scale: float = 1.0,
    ) -> torch.Tensor:
        context = self.with_style(context, style_embedding)
        if condition is None:
            return self.unet(x, timesteps, context)
        down, middle = self.controlnet(x, timesteps, context, condition, kind)
        return self.unet(x, timesteps, context, down_residuals=[control_scale * r for r in down], mid_residual=control_scale * middle)

    def denoiser(self, condition: torch.Tensor | None, kind: torch.Tensor | None, style_embedding: torch.Tensor | None, control_scale: float):
        """A `model(z, t, context)` for the samplers. Classifier-free guidance stacks the
        unconditional and conditional halves into one batch; the condition and style are tiled
        to match, so both halves see the visual condition and the style (guidance sharpens text)."""

        def tiled(tensor: torch.Tensor | None, batch: int) -> torch.Tensor | None:
            return None if tensor is None else tensor.repeat(batch // tensor.shape[0], *([1] * (tensor.ndim - 1)))

        def call(z: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            batch = z.shape[0]
            return self(z, timesteps, context, tiled(condition, batch), tiled(kind, batch), tiled(style_embedding, batch), control_scale)

        return call
