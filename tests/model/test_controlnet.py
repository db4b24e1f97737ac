"""The unified ControlNet (section 2.4): zero start, eq. 10's one-adapter-per-condition routing,
the ControlNet as a copy of the UNet's encoder, and style tokens reaching cross-attention."""

import pytest
import torch

from model.controlnet import CONDITIONS, ConditionAdapters, ControlledUNet, StyleAdapter, VideoControlNet
from model.moe_attention import merge_experts
from model.presets import get_preset
from model.unet import VersVideoUNet

PRESET = get_preset("smoke")
IMAGE_EMBED = 16


def trained_unet() -> VersVideoUNet:
    """A merged-expert UNet whose zero-initialised layers have moved, as after training."""
    torch.manual_seed(0)
    unet = merge_experts(VersVideoUNet(PRESET.unet))
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    return unet.requires_grad_(False).eval()


def perturb(module: torch.nn.Module, scale: float = 0.05) -> None:
    """Move the zero convs (and everything else) off their start, as after some training."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(scale * torch.randn_like(parameter))


def steered_model() -> ControlledUNet:
    """A trained-looking UNet with a ControlNet and style adapter off their zero start."""
    unet = trained_unet()
    controlnet = VideoControlNet(unet, PRESET.controlnet)
    perturb(controlnet)
    return ControlledUNet(unet, controlnet, StyleAdapter(IMAGE_EMBED, PRESET.unet.context_dim, PRESET.controlnet.style_tokens))


def inputs(batch: int = 2):
    generator = torch.Generator().manual_seed(1)
    c, t, h, w = PRESET.unet.in_channels, 8, 8, 8  # the smoke clips' latents: 8 frames of 64 x 64 / 8
    return {
        "x": torch.randn(batch, c, t, h, w, generator=generator),
        "timesteps": torch.tensor([10, 900][:batch]),
        "context": torch.randn(batch, 77, PRESET.unet.context_dim, generator=generator),
        "condition": torch.rand(batch, 3, t, 8 * h, 8 * w, generator=generator),
        "kind": torch.tensor([0, 3][:batch]),
    }


def test_a_fresh_controlnet_leaves_the_unet_output_unchanged():
    unet = trained_unet()
    model = ControlledUNet(unet, VideoControlNet(unet, PRESET.controlnet), None)
    a = inputs()
    with torch.no_grad():
        controlled = model(a["x"], a["timesteps"], a["context"], a["condition"], a["kind"], control_scale=1.0)
        plain = unet(a["x"], a["timesteps"], a["context"])
    assert torch.equal(controlled, plain)


def test_the_controlnet_starts_as_a_copy_of_the_unet_encoder_and_middle():
    unet = trained_unet()
    controlnet = VideoControlNet(unet, PRESET.controlnet)
    unet_state = unet.state_dict()
    copied = [name for name in controlnet.state_dict() if name.split(".")[0] in ("time_embed", "conv_in", "down", "middle")]
    assert len(copied) > 20
    for name in copied:
        assert torch.equal(controlnet.state_dict()[name], unet_state[name]), name
    assert all(parameter.requires_grad for parameter in controlnet.parameters())
    assert not any(parameter.requires_grad for parameter in unet.parameters())
    # one zero conv per skip connection the UNet's decoder reads, plus the middle
    assert [conv.out_channels for conv in controlnet.zero_convs] == list(unet.skip_channels)


def test_controlnet_residuals_reach_the_unet_and_scale_with_control_scale():
    unet = trained_unet()
    controlnet = VideoControlNet(unet, PRESET.controlnet)
    perturb(controlnet)
    model = ControlledUNet(unet, controlnet, None)
    a = inputs()
    with torch.no_grad():
        plain = unet(a["x"], a["timesteps"], a["context"])
        off = model(a["x"], a["timesteps"], a["context"], a["condition"], a["kind"], control_scale=0.0)
        on = model(a["x"], a["timesteps"], a["context"], a["condition"], a["kind"], control_scale=1.0)
        down, middle = controlnet(a["x"], a["timesteps"], a["context"], a["condition"], a["kind"])
        by_hand = unet(a["x"], a["timesteps"], a["context"], down_residuals=down, mid_residual=middle)
    assert torch.allclose(off, plain, atol=1e-6)
    assert (on - plain).abs().mean() > 1e-3
    assert torch.allclose(on, by_hand, atol=1e-6)


def test_only_the_selected_adapter_receives_gradient():
    unet = trained_unet()
    controlnet = VideoControlNet(unet, PRESET.controlnet)
    perturb(controlnet)
    model = ControlledUNet(unet, controlnet, None)
    a = inputs()
    kind = torch.tensor([CONDITIONS.index("canny"), CONDITIONS.index("canny")])
    model(a["x"], a["timesteps"], a["context"], a["condition"], kind).square().mean().backward()
    for index, adapter in enumerate(controlnet.adapters.adapters):
        grads = [parameter.grad for parameter in adapter.parameters()]
        if index == CONDITIONS.index("canny"):
            assert all(grad is not None and grad.abs().sum() > 0 for grad in grads)
        else:
            assert all(grad is None for grad in grads), CONDITIONS[index]
    assert all(parameter.grad is None for parameter in unet.parameters())


def test_eq10_each_sample_goes_through_its_own_adapter():
    torch.manual_seed(0)
    adapters = ConditionAdapters(8, (4, 8, 8, 8))
    perturb(adapters)
    condition = torch.rand(3, 3, 2, 16, 16)
    kind = torch.tensor([2, 0, 2])
    mixed = adapters(condition, kind)
    for sample in range(3):
        alone = adapters.adapters[int(kind[sample])](condition[sample : sample + 1])[0]
        assert torch.allclose(mixed[sample], alone, atol=1e-6)
    with pytest.raises(ValueError, match="condition index out of range"):
        adapters(condition, torch.tensor([0, 1, len(CONDITIONS)]))


def test_style_tokens_reach_the_cross_attention_of_unet_and_controlnet():
    model = steered_model()
    controlnet, style = model.controlnet, model.style
    a = inputs()
    first, second = torch.randn(2, 2, IMAGE_EMBED, generator=torch.Generator().manual_seed(3))
    context = model.with_style(a["context"], first)
    assert context.shape == (2, 77 + PRESET.controlnet.style_tokens, PRESET.unet.context_dim)
    assert torch.equal(context[:, :77], a["context"])  # the text path's adapter is the identity
    with torch.no_grad():
        # the UNet alone (no visual condition): the style tokens change its output
        assert (model(a["x"], a["timesteps"], a["context"], style_embedding=first) - model(a["x"], a["timesteps"], a["context"], style_embedding=second)).abs().mean() > 1e-4
        # the ControlNet's residuals see them too
        down_first, _ = controlnet(a["x"], a["timesteps"], model.with_style(a["context"], first), a["condition"], a["kind"])
        down_second, _ = controlnet(a["x"], a["timesteps"], model.with_style(a["context"], second), a["condition"], a["kind"])
        assert (down_first[-1] - down_second[-1]).abs().mean() > 1e-5
    # and the style adapter receives gradient through the frozen UNet
    model(a["x"], a["timesteps"], a["context"], a["condition"], a["kind"], style_embedding=first).square().mean().backward()
    assert style.proj.weight.grad is not None and style.proj.weight.grad.abs().sum() > 0


def test_the_denoiser_tiles_condition_and_style_for_guidance_batches():
    model = steered_model()
    a = inputs()
    embedding = torch.randn(2, IMAGE_EMBED)
    denoise = model.denoiser(a["condition"], a["kind"], embedding, 0.7)
    with torch.no_grad():
        doubled = denoise(torch.cat([a["x"], a["x"]]), torch.cat([a["timesteps"]] * 2), torch.cat([a["context"]] * 2))
        single = model(a["x"], a["timesteps"], a["context"], a["condition"], a["kind"], embedding, 0.7)
    assert torch.allclose(doubled[:2], single, atol=1e-5) and torch.allclose(doubled[2:], single, atol=1e-5)
