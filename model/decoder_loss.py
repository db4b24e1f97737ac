"""The TCM-VAE decoder's training objective, eq. 9 (paper section 2.3):

    L_dec = L_VQGAN(X, X_hat) + lambda * sum_i L_TCM(F_A^i, F_S^i)

L_VQGAN is VQ-GAN's (Esser et al. 2021, taming-transformers' `VQLPIPSWithDiscriminator`) on the
frames: L1 + perceptual (LPIPS, VGG16) + an adversarial hinge loss whose weight adapts so its
gradient at the decoder's last layer matches the reconstruction loss's (VQ-GAN eq. 7), switched on
at `disc_start`. The discriminator is a patch discriminator of 3-D convolutions that sees whole
clips, so it also judges motion: flicker is what it can catch and a per-frame one could not.
L_TCM is the mean squared distance between each TCM's output and the frozen encoder's feature at
the same resolution (lambda = 1e-4).

`DecoderTraining` computes everything in one forward and one backward: the generator's adversarial
term calls the discriminator through detached copies of its weights, and the discriminator's hinge
loss sees the reconstruction detached, so each network gets exactly the gradient of its own loss.
One AdamW over both, with each network's gradient clipped on its own (the recipe's two parameter
groups), then equals VQ-GAN's two alternating Adam optimizers (Adam is per-parameter), and the
training engine's single loop trains a GAN without a special case.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.func import functional_call
from torchvision.models.vgg import cfgs, make_layers

from model.tcm_vae import FrozenEncoder, InflatedConv3d, TCMDecoder
from model.weights import load_into, load_state_dict

LPIPS_LAYERS = (4, 9, 16, 23, 30)  # VGG16 `features` cut after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
LPIPS_CHANNELS = (64, 128, 256, 512, 512)


class LPIPS(nn.Module):
    """LPIPS v0.1 (Zhang et al. 2018) with VGG16, as the `lpips` package computes it: images in
    [-1, 1] are shifted/scaled, the five VGG stages' features are unit-normalised over channels, and
    the squared differences are weighted per channel by the linear layers, averaged over space and
    summed over stages. Without linear layers (smoke: random VGG) the channels are summed instead
    (the package's `lpips=False` baseline). Frozen."""

    def __init__(self, linear: bool = True) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.vgg = nn.Module()
        self.vgg.features = make_layers(cfgs["D"])[: LPIPS_LAYERS[-1]]  # torchvision's VGG16 layout, conv part
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in LPIPS_CHANNELS) if linear else None
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # always frozen

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-image distance, shape (n,), for (n, 3, h, w) images in [-1, 1]."""
        h = torch.cat([x, y]).sub(self.shift).div(self.scale)
        total, start = 0.0, 0
        for stage, end in enumerate(LPIPS_LAYERS):
            h = self.vgg.features[start:end](h)
            start = end
            a, b = unit_normalise(h).chunk(2)
            diff = (a - b) ** 2
            weighted = self.lins[stage](diff) if self.lins is not None else diff.sum(dim=1, keepdim=True)
            total = total + weighted.mean(dim=(1, 2, 3))
        return total


def unit_normalise(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


def load_lpips(vgg_path: str | Path, linear_path: str | Path, vgg_key: str, linear_key: str) -> LPIPS:
    """VGG16 from torchvision's ImageNet file (`vgg16-397923af.pth`, `features.*` keys; the
    classifier is not used) and the linear layers from the lpips package's `weights/v0.1/vgg.pth`
    (`lin0.model.1.weight` ... `lin4.model.1.weight`)."""
    lpips = LPIPS(linear=True)
    vgg_state = load_state_dict(vgg_path, vgg_key)
    load_into(lpips.vgg, {name: t for name, t in vgg_state.items() if not name.startswith("classifier.")}, vgg_path)
    linear_state = load_state_dict(linear_path, linear_key)
    renamed = {re.sub(r"^lin(\d)\.model\.1\.", r"\1.", name): t for name, t in linear_state.items()}  # lin0.model.1.weight -> 0.weight
    load_into(lpips.lins, renamed, linear_path, source_names={new: old for new, old in zip(renamed, linear_state)})
    return lpips.requires_grad_(False).eval()


def random_lpips(seed: int) -> LPIPS:
    """Smoke only: a seeded random VGG16 without linear layers (a random-feature perceptual loss)."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return LPIPS(linear=False)
    finally:
        torch.random.set_rng_state(state)


class PatchDiscriminator3D(nn.Module):
    """VQ-GAN's PatchGAN (pix2pix NLayerDiscriminator) with 3-D convolutions over (b, 3, t, h, w):
    one logit per space-time patch. The first layer keeps every frame (stride 1 in time), later
    strided layers halve time and space. GroupNorm instead of BatchNorm: batches of a few clips
    per GPU, and no running statistics to keep in step across workers."""

    def __init__(self, channels: int = 64, layers: int = 3) -> None:
        super().__init__()
        kernel, padding = (3, 4, 4), (1, 1, 1)
        blocks: list[nn.Module] = [nn.Conv3d(3, channels, kernel, stride=(1, 2, 2), padding=padding), nn.LeakyReLU(0.2)]
        width = channels
        for n in range(1, layers + 1):
            out = channels * min(2**n, 8)
            stride = (2, 2, 2) if n < layers else (1, 1, 1)
            blocks += [nn.Conv3d(width, out, kernel, stride=stride, padding=padding, bias=False), nn.GroupNorm(min(32, out // 4), out), nn.LeakyReLU(0.2)]
            width = out
        blocks.append(nn.Conv3d(width, 1, kernel, stride=1, padding=padding))
        self.net = nn.Sequential(*blocks)
        for module in self.modules():  # VQ-GAN's weights_init
            if isinstance(module, nn.Conv3d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.GroupNorm):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.net(video)


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def adaptive_weight(reconstruction_loss: torch.Tensor, generator_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4) -> torch.Tensor:
    """VQ-GAN eq. 7: ||grad_L(L_rec)|| / (||grad_L(L_GAN)|| + 1e-4) at the last layer L, detached."""
    rec_grad = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(generator_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()


@dataclass(frozen=True)
class DecoderLossConfig:
    perceptual_weight: float = 1.0
    disc_weight: float = 0.5  # VQ-GAN / LDM's KL-f8 setting
    consistency_weight: float = 1e-4  # lambda of eq. 9
    perceptual_frames: int = 0  # frames per clip given to LPIPS (seeded draw); 0 = all


class DecoderTraining(nn.Module):
    """What the engine trains: the decoder and the discriminator, with the frozen encoder and LPIPS
    alongside (frozen, so DDP and the optimizer leave them out)."""

    def __init__(self, encoder: FrozenEncoder, decoder: TCMDecoder, lpips: LPIPS, discriminator: PatchDiscriminator3D, config: DecoderLossConfig) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder, self.lpips, self.discriminator, self.config = decoder, lpips, discriminator, config

    def last_layer(self) -> torch.Tensor:
        """The weight of the decoder's output convolution, which VQ-GAN's adaptive weight compares
        gradients at: the refinement UNet's, else the image decoder's (a Conv3d once inflated)."""
        conv_out = self.decoder.refine.conv_out if self.decoder.refine is not None else self.decoder.decoder.conv_out
        return conv_out.conv.weight if isinstance(conv_out, InflatedConv3d) else conv_out.weight

    def forward(self, video: torch.Tensor, adversarial: bool, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Eq. 9 for (b, 3, t, h, w) frames in [-1, 1]; `adversarial` once past disc_start.
        Returns the total loss ("loss") and its detached parts."""
        cfg = self.config
        mean, std, encoder_features = self.encoder(video)
        latents = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)  # z ~ q(z|x)
        reconstruction, tcm_features = self.decoder(latents, return_features=True)
        reconstruction = reconstruction.float()

        l1 = (reconstruction - video).abs().mean()
        perceptual = self.perceptual(reconstruction, video, generator)
        rec_loss = l1 + cfg.perceptual_weight * perceptual
        parts = {"l1": l1, "perceptual": perceptual}
        total = rec_loss

        if tcm_features:  # L_TCM: mean over levels of the L2 distance to the encoder's feature
            projected = self.decoder.projected_features(tcm_features)
            consistency = sum(F.mse_loss(f.float(), target.float()) for f, target in zip(projected, encoder_features)) / len(projected)
            total = total + cfg.consistency_weight * consistency
            parts["consistency"] = consistency

        if adversarial:
            frozen = {name: p.detach() for name, p in self.discriminator.named_parameters()}
            generator_loss = -functional_call(self.discriminator, frozen, (reconstruction,)).mean()
            weight = cfg.disc_weight * adaptive_weight(rec_loss, generator_loss, self.last_layer()) if torch.is_grad_enabled() else torch.tensor(cfg.disc_weight)
            real_logits = self.discriminator(video)
            fake_logits = self.discriminator(reconstruction.detach())
            discriminator_loss = hinge_discriminator_loss(real_logits, fake_logits)
            total = total + weight * generator_loss + discriminator_loss
            parts.update(generator=generator_loss, adaptive_weight=weight, discriminator=discriminator_loss,
                         logits_real=real_logits.mean(), logits_fake=fake_logits.mean())
        return {"loss": total, **{name: value.detach() for name, value in parts.items()}}

    def perceptual(self, reconstruction: torch.Tensor, video: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Mean LPIPS over frames (or over `perceptual_frames` random frames of each clip)."""
        frames = video.shape[2]
        if 0 < self.config.perceptual_frames < frames:
            picks = torch.rand((video.shape[0], frames), generator=generator, device=video.device).argsort(dim=1)[:, : self.config.perceptual_frames]
            index = picks[:, None, :, None, None].expand(-1, 3, -1, *video.shape[3:])
            reconstruction, video = reconstruction.gather(2, index), video.gather(2, index)
        flat = lambda v: rearrange(v, "b c t h w -> (b t) c h w")  # noqa: E731
        return self.lpips(flat(reconstruction), flat(video)).mean()
