"""The image VAE: SD's architecture, both weight layouts, bad files, micro-batched encoding."""

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from model.image_vae import SCALE_FACTOR, build_image_vae, build_tiny_image_vae, decode_latents, encode_posterior, frames_to_pixels, load_image_vae, pixels_to_frames
from model.weights import WeightsError


def to_ldm_name(name: str) -> str:
    """diffusers AutoencoderKL key -> the CompVis/LDM key of the same tensor, written from LDM's
    module names (encoder.down.i.block.j, mid.block_1, mid.attn_1.q, decoder.up.(3-i), ...)."""
    name = re.sub(r"down_blocks\.(\d)\.resnets\.(\d)", r"down.\1.block.\2", name)
    name = re.sub(r"down_blocks\.(\d)\.downsamplers\.0", r"down.\1.downsample", name)
    name = re.sub(r"up_blocks\.(\d)\.resnets\.(\d)", lambda m: f"up.{3 - int(m[1])}.block.{m[2]}", name)
    name = re.sub(r"up_blocks\.(\d)\.upsamplers\.0", lambda m: f"up.{3 - int(m[1])}.upsample", name)
    name = re.sub(r"mid_block\.resnets\.(\d)", lambda m: f"mid.block_{int(m[1]) + 1}", name)
    name = name.replace("mid_block.attentions.0", "mid.attn_1").replace("group_norm", "norm")
    name = name.replace("to_q", "q").replace("to_k", "k").replace("to_v", "v").replace("to_out.0", "proj_out")
    return name.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")


def ldm_state(vae) -> dict[str, torch.Tensor]:
    state = {}
    for name, tensor in vae.state_dict().items():
        ldm = to_ldm_name(name)
        if ".attn_1." in ldm and ldm.endswith("weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # LDM's attention projections are 1x1 convs
        state[ldm] = tensor.clone().contiguous()
    return state


@pytest.fixture(scope="module")
def sd_vae():
    torch.manual_seed(0)
    return build_image_vae().eval()


def same_outputs(a, b) -> bool:
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return torch.equal(a.encode(x).latent_dist.mean, b.encode(x).latent_dist.mean) and torch.equal(
            a.decode(torch.ones(1, 4, 4, 4)).sample, b.decode(torch.ones(1, 4, 4, 4)).sample
        )


def test_sd_architecture_is_kl_f8_with_4_channels(sd_vae):
    assert sum(p.numel() for p in sd_vae.parameters()) == pytest.approx(83.65e6, rel=1e-3)
    mean, std = encode_posterior(sd_vae, torch.zeros(2, 3, 64, 48), micro_batch=1)
    assert mean.shape == std.shape == (2, 4, 8, 6)


def test_original_single_file_checkpoint_loads_like_the_diffusers_weights(sd_vae, tmp_path):
    single = tmp_path / "vae-ft-mse.safetensors"
    save_file(ldm_state(sd_vae), str(single))
    assert same_outputs(load_image_vae(single, "cache_latents.vae_weights"), sd_vae)

    # a whole SD checkpoint: the VAE under first_stage_model., next to UNet and training-only keys
    whole = {f"first_stage_model.{k}": v for k, v in ldm_state(sd_vae).items()}
    whole["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(3)
    whole["first_stage_model.loss.logvar"] = torch.zeros(())
    torch.save({"state_dict": whole, "global_step": 7}, tmp_path / "sd.ckpt")
    assert same_outputs(load_image_vae(tmp_path / "sd.ckpt", "cache_latents.vae_weights"), sd_vae)


def test_diffusers_folder_loads(sd_vae, tmp_path):
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(dict(sd_vae.config)))
    save_file({k: v.contiguous() for k, v in sd_vae.state_dict().items()}, str(folder / "diffusion_pytorch_model.safetensors"))
    loaded = load_image_vae(folder, "cache_latents.vae_weights")
    assert same_outputs(loaded, sd_vae)
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training


def test_bad_vae_files_name_the_file_and_the_key(sd_vae, tmp_path):
    with pytest.raises(WeightsError, match=r"nowhere.ckpt: weight file not found; set cache_latents.vae_weights"):
        load_image_vae(tmp_path / "nowhere.ckpt", "cache_latents.vae_weights")

    state = ldm_state(sd_vae)
    state["encoder.down.1.block.0.conv1.weight"] = torch.zeros(7, 7, 3, 3)
    save_file(state, str(tmp_path / "wrong_shape.safetensors"))
    with pytest.raises(WeightsError, match=r"wrong_shape.safetensors: key 'encoder.down.1.block.0.conv1.weight' .* has shape \(7, 7, 3, 3\)"):
        load_image_vae(tmp_path / "wrong_shape.safetensors", "cache_latents.vae_weights")

    state = ldm_state(sd_vae)
    state["encoder.mid.attn_1.qkv.weight"] = state.pop("encoder.mid.attn_1.q.weight")
    save_file(state, str(tmp_path / "renamed.safetensors"))
    with pytest.raises(WeightsError, match=r"renamed.safetensors: missing key 'encoder.mid_block.attentions.0.to_q.weight'"):
        load_image_vae(tmp_path / "renamed.safetensors", "cache_latents.vae_weights")


def test_micro_batches_do_not_change_the_latents():
    vae = build_tiny_image_vae(seed=3)
    pixels = frames_to_pixels(np.random.default_rng(0).integers(0, 256, (5, 32, 40, 3), dtype=np.uint8))
    whole_mean, whole_std = encode_posterior(vae, pixels, micro_batch=5)
    mean, std = encode_posterior(vae, pixels, micro_batch=2)
    torch.testing.assert_close(mean, whole_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(std, whole_std, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the scale factor is applied once, on the way in and out
        direct = vae.encode(pixels).latent_dist.mean * SCALE_FACTOR
        torch.testing.assert_close(mean, direct, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(decode_latents(vae, mean, micro_batch=2), vae.decode(direct / SCALE_FACTOR).sample, rtol=1e-5, atol=1e-5)


def test_tiny_vae_is_seeded_and_frozen():
    a, b = build_tiny_image_vae(seed=0), build_tiny_image_vae(seed=0)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not any(p.requires_grad for p in a.parameters())
    frames = np.random.default_rng(1).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    assert np.array_equal(pixels_to_frames(frames_to_pixels(frames)), frames)
