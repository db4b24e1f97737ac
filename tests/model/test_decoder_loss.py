"""The decoder objective (eq. 9): LPIPS parity with the lpips package, the discriminator, VQ-GAN's
adaptive weight, and one backward giving each network exactly its own loss's gradient."""

import os

import lpips as lpips_package
import pytest
import torch
from einops import rearrange

from model.decoder_loss import DecoderLossConfig, DecoderTraining, PatchDiscriminator3D, adaptive_weight, hinge_discriminator_loss, load_lpips, random_lpips
from model.image_vae import build_tiny_image_vae, frames_to_pixels
from model.tcm_vae import FrozenEncoder, TCMDecoder, TCMVAEConfig
from model.weights import WeightsError

LINEAR_WEIGHTS = os.path.join(os.path.dirname(lpips_package.__file__), "weights", "v0.1", "vgg.pth")  # the real LPIPS layers


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """A VGG16 in torchvision's file layout (features.N.weight, classifier.*), random: the real
    ImageNet file is 528 MB. Returns (path, the lpips package's network with the same weights)."""
    torch.manual_seed(0)
    reference = lpips_package.LPIPS(net="vgg", pnet_rand=True, verbose=False)  # loads vgg.pth's linear layers
    state = {f"features.{name.split('.')[1]}.{name.split('.')[2]}": t for name, t in reference.net.state_dict().items()}
    state["classifier.0.weight"], state["classifier.0.bias"] = torch.zeros(8, 4), torch.zeros(8)
    path = tmp_path_factory.mktemp("lpips") / "vgg16-397923af.pth"
    torch.save(state, path)
    return path, reference.eval()


def test_lpips_matches_the_lpips_package_on_real_frames(vgg_file, fixture_clip):
    path, reference = vgg_file
    ours = load_lpips(path, LINEAR_WEIGHTS, "train_decoder.lpips_vgg_weights", "train_decoder.lpips_linear_weights")
    frames = frames_to_pixels(fixture_clip)
    shifted = frames.roll(1, dims=0)  # each frame against its neighbour
    with torch.no_grad():
        expected = reference(frames, shifted).flatten()
        got = ours(frames, shifted)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7)
    assert torch.all(got > 0) and torch.allclose(ours(frames, frames), torch.zeros(len(frames)))


def test_missing_lpips_weights_name_the_file_and_the_key(vgg_file, tmp_path):
    with pytest.raises(WeightsError, match=r"vgg16-397923af\.pth: weight file not found; set train_decoder\.lpips_vgg_weights"):
        load_lpips(tmp_path / "vgg16-397923af.pth", LINEAR_WEIGHTS, "train_decoder.lpips_vgg_weights", "train_decoder.lpips_linear_weights")
    with pytest.raises(WeightsError, match=r"vgg\.pth: weight file not found; set train_decoder\.lpips_linear_weights"):
        load_lpips(vgg_file[0], tmp_path / "vgg.pth", "train_decoder.lpips_vgg_weights", "train_decoder.lpips_linear_weights")
    torch.save({"lin0.model.1.weight": torch.zeros(1, 32, 1, 1)}, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match=r"'lin0\.model\.1\.weight' \(-> '0\.weight'\) has shape \(1, 32, 1, 1\)"):
        load_lpips(vgg_file[0], tmp_path / "bad.pth", "a", "b")


def test_discriminator_gives_one_logit_per_space_time_patch():
    logits = PatchDiscriminator3D(channels=8, layers=3)(torch.zeros(2, 3, 8, 64, 64))
    assert logits.shape[:2] == (2, 1) and logits.shape[2] == 2 and logits.shape[3] > 1  # time is judged, not pooled away


def test_hinge_loss_and_adaptive_weight():
    assert hinge_discriminator_loss(torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])) == pytest.approx(0.5 * (0.25 + 0.5))
    layer = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    rec, gan = (3 * layer).sum(), (layer**2).sum()  # gradients (3, 3) and (2, 4)
    assert float(adaptive_weight(rec, gan, layer)) == pytest.approx(18**0.5 / (20**0.5 + 1e-4))


def test_one_backward_gives_each_network_only_its_own_gradient(fixture_clip):
    vae = build_tiny_image_vae(seed=0)
    torch.manual_seed(0)
    model = DecoderTraining(FrozenEncoder(vae), TCMDecoder(vae, TCMVAEConfig(refine_channels=8)), random_lpips(0), PatchDiscriminator3D(8, 2), DecoderLossConfig())
    video = rearrange(frames_to_pixels(fixture_clip), "t c h w -> 1 c t h w")
    out = model(video, adversarial=True, generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    disc_grads = [p.grad.clone() for p in model.discriminator.parameters()]
    decoder_grads = {name: p.grad.clone() for name, p in model.decoder.named_parameters()}
    assert all(p.grad is None for p in model.encoder.parameters()) and all(p.grad is None for p in model.lpips.parameters())

    # the same losses built by hand, each differentiated on its own
    model.zero_grad(set_to_none=True)
    mean, std, features = model.encoder(video)
    latents = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))
    reconstruction, tcm_features = model.decoder(latents, return_features=True)
    discriminator_loss = hinge_discriminator_loss(model.discriminator(video), model.discriminator(reconstruction.detach()))
    expected_disc = torch.autograd.grad(discriminator_loss, list(model.discriminator.parameters()))
    for got, expected in zip(disc_grads, expected_disc):
        assert torch.allclose(got, expected, atol=1e-6)
    assert float(out["discriminator"]) == pytest.approx(float(discriminator_loss), rel=1e-5)
    # the decoder's: reconstruction + adaptive-weighted generator loss + lambda * L_TCM, nothing else
    generator_loss = -model.discriminator(reconstruction).mean()
    perceptual = model.lpips(rearrange(reconstruction, "b c t h w -> (b t) c h w"), rearrange(video, "b c t h w -> (b t) c h w")).mean()
    consistency = sum(torch.nn.functional.mse_loss(f, target) for f, target in zip(model.decoder.projected_features(tcm_features), features)) / len(features)
    decoder_loss = (reconstruction - video).abs().mean() + perceptual + out["adaptive_weight"] * generator_loss + 1e-4 * consistency
    names = [name for name, _ in model.decoder.named_parameters()]
    expected_decoder = torch.autograd.grad(decoder_loss, list(model.decoder.parameters()))
    for name, expected in zip(names, expected_decoder):
        assert torch.allclose(decoder_grads[name], expected, rtol=1e-4, atol=1e-7), name
    assert float(out["generator"]) == pytest.approx(float(generator_loss), rel=1e-5)
    assert decoder_grads["refine.conv_out.weight"].abs().sum() > 0


@pytest.mark.parametrize("temporal_compensation, video_layers", [(False, "conv3d"), (False, "videoldm"), (True, "")])
def test_table3_baselines_train_through_the_adversarial_phase(temporal_compensation, video_layers, fixture_clip):
    """Past disc_start the adaptive weight differentiates at the decoder's output convolution,
    which the 3-D-conv baseline has inflated to a Conv3d and which, for the TCM-VAE without its
    refinement UNet, is the image decoder's: each gets a finite weight and a gradient there."""
    vae = build_tiny_image_vae(seed=0)
    decoder = TCMDecoder(vae, TCMVAEConfig(temporal_compensation=temporal_compensation, refinement=False, video_layers=video_layers))
    model = DecoderTraining(FrozenEncoder(vae), decoder, random_lpips(0), PatchDiscriminator3D(8, 2), DecoderLossConfig())
    video = rearrange(frames_to_pixels(fixture_clip), "t c h w -> 1 c t h w")
    out = model(video, adversarial=True, generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    layer = model.last_layer()
    assert layer.ndim == (5 if video_layers == "conv3d" else 4) and torch.isfinite(out["adaptive_weight"])
    assert layer.grad is not None and layer.grad.abs().sum() > 0
