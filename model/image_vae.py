"""The frozen image VAE: Stable Diffusion's KL-f8 autoencoder (4 latent channels, scale 0.18215).

diffusers' AutoencoderKL serves as the implementation (REFERENCE.md); this module pins the SD
architecture. Loading weights from local files belongs to the latent-cache stage.
"""

from __future__ import annotations

from diffusers import AutoencoderKL

SCALE_FACTOR = 0.18215  # latents are multiplied by this so their std is ~1 for the diffusion model
DOWNSAMPLE = 8


def build_image_vae() -> AutoencoderKL:
    """SD v1/v2 VAE architecture (83.7 M parameters), randomly initialised."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512,
    )
