"""The frozen image VAE: Stable Diffusion's KL-f8 autoencoder (4 latent channels, scale 0.18215).

diffusers' AutoencoderKL serves as the implementation (REFERENCE.md); this module pins the SD
architecture, loads SD's weights from local files in both published layouts, and encodes video
frames as a batch of images ((b t) c h w) in micro-batches, so memory stays bounded however long
the clip. The VAE is frozen everywhere in the project: loaders return it in eval mode without
gradients.

Weight layouts read by `load_image_vae`:
- a diffusers folder: `config.json` + `diffusion_pytorch_model.safetensors` (or `.bin`);
- an original (LDM / CompVis) single file, `.ckpt` / `.pt` / `.safetensors`: the VAE alone
  (`vae-ft-mse-840000-ema-pruned`, keys `encoder.down.0.block.0...`) or a whole SD checkpoint
  (keys under `first_stage_model.`); keys are converted to diffusers' names by diffusers' own
  converter, and errors name the key as it is written in the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from model.weights import WeightsError, file_digest, load_into, load_state_dict

SCALE_FACTOR = 0.18215  # latents are multiplied by this so their std is ~1 for the diffusion model
DOWNSAMPLE = 8
LATENT_CHANNELS = 4
DIFFUSERS_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
LDM_PREFIXES = ("first_stage_model.", "vae.")  # where a whole SD checkpoint keeps its VAE
LDM_TRAINING_ONLY = ("loss.", "model_ema.")  # LPIPS/discriminator and EMA copies in LDM files


def kl_f8(block_out_channels: tuple[int, ...], layers_per_block: int, norm_num_groups: int, sample_size: int) -> AutoencoderKL:
    """SD's VAE layout (4 down/up blocks: 8x downsampling, 4 latent channels, mid attention) at a
    given width and depth, randomly initialised."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=block_out_channels,
        layers_per_block=layers_per_block,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=norm_num_groups,
        sample_size=sample_size,
        scaling_factor=SCALE_FACTOR,
    )


def build_image_vae() -> AutoencoderKL:
    """SD v1/v2 VAE architecture (83.7 M parameters), randomly initialised."""
    return kl_f8((128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=512)


def build_tiny_image_vae(seed: int = 0) -> AutoencoderKL:
    """The smoke preset's stand-in: SD's layout at 1/8 width, one ResNet per block (0.9 M
    parameters). Seeded, so every stage rebuilds the same VAE."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        vae = kl_f8((16, 32, 64, 64), layers_per_block=1, norm_num_groups=8, sample_size=64)
    finally:
        torch.random.set_rng_state(generator_state)
    return freeze(vae)


def freeze(vae: AutoencoderKL) -> AutoencoderKL:
    vae.requires_grad_(False)
    return vae.eval()


def load_image_vae(path: str | Path, key: str) -> AutoencoderKL:
    """SD's VAE from a diffusers folder or an original single-file checkpoint (see module doc)."""
    path = Path(path)
    if path.is_dir():
        return freeze(_load_diffusers_folder(path, key))
    state = load_state_dict(path, key)
    if any(name.startswith("encoder.down_blocks.") for name in state):  # a diffusers weight file on its own
        vae = build_image_vae()
        load_into(vae, state, path)
        return freeze(vae)
    vae = build_image_vae()
    converted, source_names = convert_ldm_state(state, vae)
    load_into(vae, converted, path, source_names)
    return freeze(vae)


def weights_digest(path: str | Path) -> str:
    """sha256 of the weight files `load_image_vae(path)` reads."""
    path = Path(path)
    if path.is_dir():
        return file_digest(path / "config.json", _diffusers_weight_file(path))
    return file_digest(path)


def scaling_factor(path: str | Path) -> float:
    """The latent scale factor `load_image_vae(path)` will use (a diffusers config may set its own)."""
    config = Path(path) / "config.json"
    return float(json.loads(config.read_text()).get("scaling_factor", SCALE_FACTOR)) if config.is_file() else SCALE_FACTOR


def convert_ldm_state(state: dict[str, torch.Tensor], vae: AutoencoderKL) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """LDM (CompVis) VAE keys -> diffusers keys, plus the LDM name each converted key came from.

    diffusers' converter skips keys it cannot find, so a wrong file shows up afterwards as a
    missing diffusers key, and LDM keys it did not use are reported as unexpected."""
    prefix = next((p for p in LDM_PREFIXES if any(name.startswith(p) for name in state)), "")
    vae_state = {
        name.removeprefix(prefix): tensor
        for name, tensor in state.items()
        if name.startswith(prefix) and not name.removeprefix(prefix).startswith(LDM_TRAINING_ONLY)
    }
    converted = convert_ldm_vae_checkpoint(vae_state, dict(vae.config))
    origin = {tensor.data_ptr(): prefix + name for name, tensor in vae_state.items() if tensor.numel()}
    source_names = {name: origin[tensor.data_ptr()] for name, tensor in converted.items() if tensor.data_ptr() in origin}
    used = set(source_names.values())
    for name in sorted(vae_state):
        if prefix + name not in used:  # keep it under its own name so load_into reports it
            converted[prefix + name] = vae_state[name]
    return converted, source_names


def _diffusers_weight_file(folder: Path) -> Path:
    for name in DIFFUSERS_WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise WeightsError(f"{folder}: no {' or '.join(DIFFUSERS_WEIGHT_FILES)} in this diffusers VAE folder")


def _load_diffusers_folder(folder: Path, key: str) -> AutoencoderKL:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise WeightsError(f"{folder}: not a diffusers VAE folder (no config.json); set {key} to the folder or to a single .ckpt/.safetensors file")
    config = json.loads(config_path.read_text())
    if config.get("latent_channels") != LATENT_CHANNELS or len(config.get("block_out_channels", ())) != 4:
        raise WeightsError(f"{config_path}: not a KL-f8 VAE with 4 latent channels (latent_channels={config.get('latent_channels')}, {len(config.get('block_out_channels', ()))} blocks)")
    vae = AutoencoderKL.from_config(config)
    weights = _diffusers_weight_file(folder)
    load_into(vae, load_state_dict(weights, key), weights)
    return vae


def frames_to_pixels(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(n, h, w, 3) uint8 frames -> (n, 3, h, w) float in [-1, 1], the VAE's input range."""
    frames = torch.as_tensor(np.ascontiguousarray(frames) if isinstance(frames, np.ndarray) else frames)
    return frames.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def pixels_to_frames(pixels: torch.Tensor) -> np.ndarray:
    """(n, 3, h, w) float in [-1, 1] -> (n, h, w, 3) uint8."""
    return pixels.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def encode_posterior(vae: AutoencoderKL, pixels: torch.Tensor, micro_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of q(z | x) for (n, 3, h, w) images, in micro-batches of `micro_batch` images.
    Both are (n, 4, h/8, w/8) and already multiplied by the scale factor (the diffusion model's
    latent space)."""
    means, stds = [], []
    for chunk in pixels.split(micro_batch):
        posterior = vae.encode(chunk.to(vae.device, vae.dtype)).latent_dist
        means.append(posterior.mean.float())
        stds.append(posterior.std.float())
    scale = vae.config.scaling_factor
    return torch.cat(means) * scale, torch.cat(stds) * scale


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor, micro_batch: int) -> torch.Tensor:
    """(n, 4, h/8, w/8) scaled latents -> (n, 3, h, w) images in [-1, 1] (frame by frame: the
    image decoder; the TCM-VAE decodes the same latents as a video)."""
    images = [vae.decode(chunk.to(vae.device, vae.dtype) / vae.config.scaling_factor).sample.float() for chunk in latents.split(micro_batch)]
    return torch.cat(images)
