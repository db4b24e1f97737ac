"""The UNet: shapes, t = 1, merging, checkpointing, ControlNet taps, save/load, bf16."""

from dataclasses import replace

import torch
from safetensors.torch import load_file, save_file

from model.moe_attention import MoEFeedForward, merge_experts
from model.presets import get_preset
from model.unet import VersVideoUNet

PRESET = get_preset("smoke")


def make(**overrides) -> VersVideoUNet:
    torch.manual_seed(0)
    model = VersVideoUNet(replace(PRESET.unet, **overrides))
    with torch.no_grad():  # leave the zero-initialised layers' start behind, as after training
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    return model


def inputs(frames=8, batch=2):  # the smoke clips: 8 frames of 64 x 64, latents 8 x 8
    generator = torch.Generator().manual_seed(1)
    c, h, w = PRESET.unet.in_channels, 8, 8
    return (
        torch.randn(batch, c, frames, h, w, generator=generator),
        torch.tensor([10, 900][:batch]),
        torch.randn(batch, 77, PRESET.unet.context_dim, generator=generator),
    )


def test_video_and_image_batches():
    model = make().eval()
    x, t, context = inputs()
    assert model(x, t, context).shape == x.shape
    image = inputs(frames=1)
    out = model(*image)
    assert out.shape == image[0].shape and torch.isfinite(out).all()


def test_merged_and_unmerged_eval_outputs_agree_and_match_a_plain_ffn_unet():
    model = make().eval()
    x, t, context = inputs()
    unmerged = model(x, t, context)
    merge_experts(model)
    assert not any(isinstance(m, MoEFeedForward) for m in model.modules())
    torch.testing.assert_close(model(x, t, context), unmerged, atol=1e-5, rtol=1e-5)
    plain = VersVideoUNet(replace(PRESET.unet, spatial_experts=1, temporal_experts=1)).eval()
    plain.load_state_dict(model.state_dict(), strict=True)  # merged weights = a plain-FFN UNet's
    torch.testing.assert_close(plain(x, t, context), unmerged, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_outputs_and_gradients():
    results = []
    for flag in (False, True):
        model = make(gradient_checkpointing=flag).train()
        torch.manual_seed(5)  # same MoE shuffles in both runs
        out = model(*inputs())
        out.square().mean().backward()
        results.append((out.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, msg=name)


def test_controlnet_taps_match_the_skip_features():
    model = make().eval()
    x, t, context = inputs()
    size = tuple(x.shape[-2:])
    zeros = []
    for block, channels in zip([None, *model.down], model.skip_channels):
        if block is not None and block.__class__.__name__ == "Downsample":
            size = ((size[0] + 1) // 2, (size[1] + 1) // 2)
        zeros.append(torch.zeros(x.shape[0], channels, x.shape[2], *size))
    mid = torch.zeros_like(zeros[-1])
    torch.testing.assert_close(model(x, t, context, zeros, mid), model(x, t, context))
    bumped = model(x, t, context, [z + 0.1 for z in zeros], mid)
    assert (bumped - model(x, t, context)).abs().max() > 1e-4


def test_safetensors_round_trip_is_exact(tmp_path):
    model = make().eval()
    save_file(model.state_dict(), str(tmp_path / "unet.safetensors"))
    loaded = VersVideoUNet(PRESET.unet).eval()
    loaded.load_state_dict(load_file(str(tmp_path / "unet.safetensors")), strict=True)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    x, t, context = inputs()
    assert torch.equal(model(x, t, context), loaded(x, t, context))


def test_bf16_autocast_runs_and_stays_close():
    model = make().eval()
    x, t, context = inputs()
    reference = model(x, t, context)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x, t, context)
    assert torch.isfinite(low).all()
    assert (low.float() - reference).abs().mean() < 0.05 * reference.abs().mean() + 1e-3
