"""Timing, FLOP counting and accelerator peaks shared by the `versvideo bench` benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

import torch
from torch.utils.flop_counter import FlopCounterMode

from model.presets import UNetConfig, get_preset
from model.unet import VersVideoUNet
from tasks.config.params import clip_shape

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}  # dense, per GPU


def peak_bf16_tflops(device_name: str) -> float | None:
    """The datasheet's dense bf16 peak of a GPU named like torch.cuda.get_device_name(); None when unknown."""
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS.items() if key in device_name), None)


def latent_shape(preset: str) -> tuple[int, int, int, int]:
    """(c, t, h, w) of one latent clip the preset trains on (VAE factor 8)."""
    frames, height, width = clip_shape(preset)
    return get_preset(preset).unet.in_channels, frames, height // 8, width // 8


def unet_training_flops(config: UNetConfig, latent_shape: tuple[int, int, int, int], context_tokens: int = 77) -> int:
    """Model FLOPs of one training sample (forward + backward of the UNet on one video latent),
    counted on the meta device: no device memory, seconds for H, the same figure on any machine.
    Recomputation by gradient checkpointing is not counted (model FLOPs, as MFU defines them), so
    the count is taken without it; attention is counted as its matrix products."""
    with torch.device("meta"):
        model = VersVideoUNet(replace(config, gradient_checkpointing=False)).train()
        x = torch.zeros(1, *latent_shape)
        timesteps = torch.zeros(1, dtype=torch.long)
        context = torch.zeros(1, context_tokens, config.context_dim)
    with FlopCounterMode(display=False) as flops:
        model(x, timesteps, context).float().square().mean().backward()
    return flops.get_total_flops()


def best_seconds(steps: dict[str, Callable[[], object]], repeats: int, synchronize: Callable[[], None] | None = None) -> dict[str, float]:
    """Best wall time of each step over `repeats` runs, after one warm-up run each.

    Steps run round-robin, so that a noisy moment on a shared machine hits every entry alike;
    `synchronize` (e.g. torch.cuda.synchronize) brackets each run when work is asynchronous.
    """
    sync = synchronize or (lambda: None)
    for step in steps.values():
        step()  # warm-up: allocations, kernel selection, file caches
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(repeats):
        for name, step in steps.items():
            sync()
            start = time.perf_counter()
            step()
            sync()
            best[name] = min(best[name], time.perf_counter() - start)
    return best
