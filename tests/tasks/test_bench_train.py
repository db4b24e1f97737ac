"""`versvideo bench train`'s training-step figures: the FLOP count MFU divides by, and the step
it times (the GPU half runs the same function on the L and H presets)."""

from dataclasses import replace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from model.presets import get_preset
from model.unet import VersVideoUNet
from tasks.benchmarks.common import latent_shape, peak_bf16_tflops, unet_training_flops
from tasks.benchmarks.train import training_step_figures


def test_meta_device_flop_count_matches_a_real_training_step():
    """Counted on the meta device (free for H), the model FLOPs equal a real CPU step's, up to how
    attention is counted (the CPU's fused kernel vs its matrix products: measured 1.1 % of the
    smoke UNet's total with attention at all three levels, 0.4 % at two), and scale with the batch."""
    preset = get_preset("smoke")
    torch.manual_seed(0)
    model = VersVideoUNet(preset.unet).train()
    x, context = torch.randn(2, *latent_shape(preset.name)), torch.randn(2, 77, preset.unet.context_dim)
    with FlopCounterMode(display=False) as real:
        model(x, torch.tensor([10, 900]), context).float().square().mean().backward()
    assert real.get_total_flops() == pytest.approx(2 * unet_training_flops(preset.unet, latent_shape(preset.name)), rel=0.02)
    assert unet_training_flops(replace(preset.unet, gradient_checkpointing=True), latent_shape(preset.name)) == unet_training_flops(preset.unet, latent_shape(preset.name))  # recomputation is no model FLOP
    assert unet_training_flops(get_preset("H").unet, latent_shape("H")) > 20 * unet_training_flops(get_preset("L").unet, latent_shape("L"))


def test_timed_step_trains_and_checkpointing_changes_time_not_losses():
    plain = training_step_figures("smoke", 2, False, steps=2, device=torch.device("cpu"), warmup=1)
    checkpointed = training_step_figures("smoke", 2, True, steps=2, device=torch.device("cpu"), warmup=1)
    assert len(plain["losses"]) == 3 and all(loss > 0 for loss in plain["losses"])
    assert checkpointed["losses"] == pytest.approx(plain["losses"], rel=1e-5)  # same seed, same data: recomputation is exact
    assert plain["samples_per_s"] == pytest.approx(2 / plain["step_s"], rel=0.01)
    assert plain["model_flops_per_step"] == 2 * unet_training_flops(get_preset("smoke").unet, latent_shape("smoke"))
    assert "mfu" not in plain  # no datasheet peak for a CPU


def test_peak_lookup_by_device_name():
    assert peak_bf16_tflops("NVIDIA A100-SXM4-40GB") == 312.0 and peak_bf16_tflops("NVIDIA H200") == 989.0
    assert peak_bf16_tflops("NVIDIA GeForce RTX 4090") is None
