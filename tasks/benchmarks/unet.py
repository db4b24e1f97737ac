"""`versvideo bench unet`: our UNet against diffusers' UNet3DConditionModel (the ModelScope design)
at the same width, depth, heads, context, frames and resolution, in the same run.

Reported: forward+backward seconds and peak memory per training step (ours with and without
gradient checkpointing; UNet3D has no checkpointing), inference seconds for the MoE UNet
unmerged (eval), merged, and a UNet built with plain FFNs, and the training-step cost of each
MEC path (the paper's Table 5 ablation as a cost table). On CPU the networks are narrower
(base 64, 8 frames, the L preset's 32 x 32 latent; a few minutes on 2 cores); with CUDA the L
preset itself runs in bf16 and the report adds samples/s and model FLOPs utilisation.
"""

from __future__ import annotations

import argparse
import copy
import functools
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from model.mec import MECPaths
from model.moe_attention import merge_experts
from model.presets import UNetConfig
from model.unet import VersVideoUNet
from tasks.benchmarks.common import best_seconds, peak_bf16_tflops, unet_training_flops


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _cpu_memory_child(build: Callable[[], torch.nn.Module], shapes: tuple, queue) -> None:
    """In a fresh process (a fresh allocator takes every byte from the OS): build the model, then
    one training step; report RSS growth over the forward (the activations kept for backward)
    and the step's high-water mark (activations + gradients)."""
    torch.manual_seed(0)
    model = build().train()
    x_shape, context_shape = shapes
    x, context = torch.randn(x_shape), torch.randn(context_shape)
    timesteps = torch.randint(0, 1000, (x_shape[0],))
    before, peak, done = _rss_bytes(), [0], threading.Event()

    def sample() -> None:  # ru_maxrss would not do: Linux carries it over from the parent
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = model(x, timesteps, context)
    activations = _rss_bytes() - before
    _prediction(out).square().mean().backward()
    done.set()
    sampler.join()
    queue.put((activations, max(peak[0], _rss_bytes()) - before))


def step_memory(build: Callable[[], torch.nn.Module], device: torch.device, step: Callable[[], None], shapes: tuple) -> dict:
    """MiB a training step needs beyond the model: on CUDA the allocator's peak (and the memory
    held after the forward), on CPU a fresh process's RSS growth."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return {"peak_mem_mb": round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)}
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_cpu_memory_child, args=(build, shapes, queue))
    child.start()
    activations, peak = queue.get(timeout=600)
    child.join()
    return {"activation_mem_mb": round(activations / 2**20, 1), "peak_mem_mb": round(peak / 2**20, 1)}


def _time(steps: dict[str, Callable[[], None]], device: torch.device, repeats: int) -> dict[str, float]:
    seconds = best_seconds(steps, repeats, torch.cuda.synchronize if device.type == "cuda" else None)
    return {name: round(value, 4) for name, value in seconds.items()}


def _prediction(out) -> torch.Tensor:
    """Our UNet returns a tensor; diffusers' returns an output object with `.sample`."""
    return out.sample if hasattr(out, "sample") else out


def _training_step(model: torch.nn.Module, call: Callable[[torch.nn.Module], torch.Tensor]) -> Callable[[], None]:
    model.train()

    def step() -> None:
        model.zero_grad(set_to_none=False)  # reuse gradient buffers, as a GPU caching allocator would
        call(model).float().square().mean().backward()

    return step


def diffusers_unet3d(config: UNetConfig) -> torch.nn.Module:
    from diffusers import UNet3DConditionModel

    levels = len(config.channel_mult)
    down = tuple("CrossAttnDownBlock3D" if level in config.attention_levels else "DownBlock3D" for level in range(levels))
    up = tuple("CrossAttnUpBlock3D" if level in config.attention_levels else "UpBlock3D" for level in reversed(range(levels)))
    return UNet3DConditionModel(
        in_channels=config.in_channels,
        out_channels=config.in_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(config.base_channels * m for m in config.channel_mult),
        layers_per_block=config.num_res_blocks,
        cross_attention_dim=config.context_dim,
        attention_head_dim=config.heads,  # UNet3D reads this as the number of heads
    )


def run(args: argparse.Namespace) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    if device.type == "cuda":
        config, batch, frames, size, dtype = UNetConfig(base_channels=128), 2, 16, 32, torch.bfloat16  # the L preset
    else:
        torch.set_num_threads(os.cpu_count() or 1)
        # The L preset's latent geometry (32 x 32) at reduced width and frames: at smaller latents
        # each of the 32 experts gets a handful of tokens and the benchmark measures tiny GEMMs.
        config, batch, frames, size, dtype = UNetConfig(base_channels=64, context_dim=64), 1, 8, 32, torch.float32
    x = torch.randn(batch, config.in_channels, frames, size, size, device=device)
    timesteps = torch.randint(0, 1000, (batch,), device=device)
    context = torch.randn(batch, 77, config.context_dim, device=device)

    def call(model: torch.nn.Module) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            return _prediction(model(x, timesteps, context))

    shapes = (tuple(x.shape), tuple(context.shape))
    report: dict = {"device": device.type, "dtype": str(dtype).removeprefix("torch."), "batch": batch, "frames": frames, "latent_size": size, "base_channels": config.base_channels}

    # Training step: diffusers' UNet3D vs ours (with and without gradient checkpointing).
    builds = {
        "diffusers_unet3d": functools.partial(diffusers_unet3d, config),
        "ours": functools.partial(VersVideoUNet, config),
        "ours_checkpointing": functools.partial(VersVideoUNet, replace(config, gradient_checkpointing=True)),
    }
    models = {name: build().to(device) for name, build in builds.items()}
    report["params"] = {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}
    seconds = _time({name: _training_step(model, call) for name, model in models.items()}, device, args.repeats)
    for name, build in builds.items():
        report[f"{name}_train"] = {"step_s": seconds[name], **step_memory(build, device, _training_step(models[name], call), shapes)}
    report["train_step_ratio_vs_diffusers"] = round(seconds["ours"] / seconds["diffusers_unet3d"], 3)
    memory_key = "activation_mem_mb" if device.type == "cpu" else "peak_mem_mb"
    report["checkpointing_memory_ratio"] = round(report["ours_checkpointing_train"][memory_key] / report["ours_train"][memory_key], 3)

    # Inference: MoE UNet unmerged (eval) and merged, against a UNet built with plain FFNs.
    unmerged = models.pop("ours").eval()
    del models
    merged = merge_experts(copy.deepcopy(unmerged))  # merge_experts works in place
    plain = VersVideoUNet(replace(config, spatial_experts=1, temporal_experts=1)).to(device).eval()
    with torch.no_grad():  # cheap, so 4x the repeats: a 5% comparison needs them on a noisy VM
        inference = _time({name: functools.partial(call, model) for name, model in (("unmerged", unmerged), ("merged", merged), ("plain_ffn", plain))}, device, 4 * args.repeats)
    report["inference_s"] = inference
    report["merged_vs_plain_ffn_ratio"] = round(inference["merged"] / inference["plain_ffn"], 3)
    del merged, plain, unmerged

    # Table 5 as a cost table: the training step with each MEC path off (plain-FFN UNets, so
    # only the MEC paths differ).
    plain_config = replace(config, spatial_experts=1, temporal_experts=1)
    variants = {"all_paths": MECPaths(), **{f"without_{path}": replace(MECPaths(), **{path: False}) for path in ("factorized_temporal", "spatial_temporal", "channel", "motion")}, "plain_2d_conv": MECPaths(False, False, False, False)}
    steps = {name: _training_step(VersVideoUNet(replace(plain_config, mec_paths=paths)).to(device), call) for name, paths in variants.items()}
    report["mec_ablation_train_step_s"] = _time(steps, device, args.repeats)

    if device.type == "cuda":
        flops = unet_training_flops(config, (config.in_channels, frames, size, size)) * batch
        name = torch.cuda.get_device_name()
        peak = peak_bf16_tflops(name)
        step_s = seconds["ours"]
        report["gpu"] = name
        report["samples_per_s"] = round(batch / step_s, 2)
        report["model_flops_per_step"] = flops
        report["mfu"] = round(flops / step_s / (peak * 1e12), 4) if peak else None
    return report
