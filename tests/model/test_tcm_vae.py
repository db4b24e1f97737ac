"""TCM-VAE decoder (section 2.3, eq. 12-13): starts as the image decoder, mixes time once trained."""

import pytest
import torch
from einops import rearrange

from model.image_vae import build_tiny_image_vae, frames_to_pixels
from model.tcm_vae import FrozenEncoder, TCMDecoder, TCMVAEConfig


@pytest.fixture(scope="module")
def vae():
    return build_tiny_image_vae(seed=0)


@pytest.fixture(scope="module")
def video(fixture_clip):
    return rearrange(frames_to_pixels(fixture_clip), "t c h w -> 1 c t h w")  # (1, 3, 8, 64, 64)


def test_untrained_tcm_vae_decodes_exactly_like_the_image_decoder(vae, video):
    latents = FrozenEncoder(vae)(video)[0]
    with torch.no_grad():
        tcm = TCMDecoder(vae, TCMVAEConfig(refine_channels=16))(latents)
        image = vae.decode(rearrange(latents, "b c t h w -> (b t) c h w") / vae.config.scaling_factor).sample
    assert (rearrange(tcm, "b c t h w -> (b t) c h w") - image).abs().max() < 1e-5


def test_frozen_encoder_matches_the_vae_posterior_and_pairs_features_by_resolution(vae, video):
    mean, std, features = FrozenEncoder(vae)(video)
    posterior = vae.encode(rearrange(video, "b c t h w -> (b t) c h w")).latent_dist
    scale = vae.config.scaling_factor
    assert torch.allclose(rearrange(mean, "b c t h w -> (b t) c h w"), posterior.mean * scale, atol=1e-6)
    assert torch.allclose(rearrange(std, "b c t h w -> (b t) c h w"), posterior.std * scale, atol=1e-6)
    decoder = TCMDecoder(vae)
    with torch.no_grad():
        _, tcm_features = decoder(mean, return_features=True)
    projected = decoder.projected_features(tcm_features)
    assert [f.shape for f in projected] == [f.shape for f in features]  # every L_TCM pair lines up
    assert [f.shape[-1] for f in features] == [8, 8, 16, 32, 64]  # deepest first, the decoder's order


def test_tcms_carry_information_across_frames_and_the_image_decoder_does_not(vae, video):
    latents = FrozenEncoder(vae)(video)[0]
    changed = latents.clone()
    changed[:, :, 0] += 1.0  # perturb frame 0 only
    torch.manual_seed(1)
    tcm = TCMDecoder(vae, TCMVAEConfig(refinement=False))
    for module in tcm.tcms:  # as after training: the zero-initialised last convs are no longer zero
        torch.nn.init.normal_(module.conv2.spatial.weight, std=0.02)
    image = TCMDecoder(vae, TCMVAEConfig(temporal_compensation=False, refinement=False))
    with torch.no_grad():
        tcm_delta = (tcm(changed) - tcm(latents))[:, :, 1:].abs().max()
        image_delta = (image(changed) - image(latents))[:, :, 1:].abs().max()
    assert image_delta == 0  # frame by frame: frame 0's latent cannot reach frames 1..7
    assert tcm_delta > 1e-3


def test_refinement_unet_and_tcms_are_the_only_new_trainable_parts(vae):
    image_params = sum(p.numel() for p in TCMDecoder(vae, TCMVAEConfig(False, False)).parameters())
    decoder = TCMDecoder(vae, TCMVAEConfig(refine_channels=16))
    assert image_params == sum(p.numel() for p in vae.decoder.parameters()) + sum(p.numel() for p in vae.post_quant_conv.parameters())
    new = {name.split(".")[0] for name, _ in decoder.named_parameters()} - {"decoder", "post_quant_conv"}
    assert new == {"tcms", "refine", "feature_heads"}
    assert all(p.requires_grad for p in decoder.parameters())
    assert not any(p.requires_grad for p in vae.parameters())  # the image VAE itself stays frozen


@pytest.mark.parametrize("layers", ["conv3d", "videoldm"])
def test_table3_video_baselines_start_as_the_image_decoder_and_mix_frames_once_trained(vae, video, layers):
    """Table 3's 3-D convolution decoder and VideoLDM's temporally fine-tuned decoder: untrained,
    each decodes exactly like the image decoder it was built from; with its temporal weights off
    zero (as after training) a change to frame 0 reaches frame 1 (the image decoder's cannot)."""
    latents = FrozenEncoder(vae)(video)[0]
    image = TCMDecoder(vae, TCMVAEConfig(temporal_compensation=False, refinement=False))
    baseline = TCMDecoder(vae, TCMVAEConfig(temporal_compensation=False, refinement=False, video_layers=layers))
    with torch.no_grad():
        assert (baseline(latents) - image(latents)).abs().max() < 1e-4  # float32 sums in another order (conv3d)
        torch.manual_seed(1)
        if layers == "conv3d":
            assert len(baseline.inflated) == sum(1 for m in vae.decoder.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
            for conv in baseline.inflated:  # the side frames' taps, zero at the start
                conv.conv.weight[:, :, 0].normal_(std=0.02)
                conv.conv.weight[:, :, 2].normal_(std=0.02)
        else:
            assert len(baseline.temporal_blocks) == 1 + len(vae.decoder.up_blocks)
            for block in baseline.temporal_blocks:
                block.conv2.weight.normal_(std=0.02)
        changed = latents.clone()
        changed[:, :, 0] += 1.0
        delta = (baseline(changed) - baseline(latents)).abs().amax(dim=(0, 1, 3, 4))  # per frame
    assert delta[1] > 1e-3

