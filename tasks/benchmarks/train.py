"""`versvideo bench train`: training throughput of the engine, and of the UNet's training step.

The engine (any machine): the same run, on the same latent cache (a synthetic one: blobs moving
one latent cell per frame, the smoke preset's (8, 4, 8, 8) latents and 77 x 64 contexts), trains
with 1 worker (batch 4), with 2 workers (batch 2 each: the same global batch) under DDP, and with
2 workers under FSDP, and reports samples/s and the share of step time spent waiting for data,
from the runs' MLflow histories (steady state: step 1 left out). The baseline is the 1-worker
run; the ratios are 2 workers over 1, and FSDP over DDP on 2 workers (the price of gathering
sharded weights per block).

The training step (`training_step_figures`): one worker's work per optimizer step, in this
process: UNetRecipe's loss (v-prediction, text dropout) under the engine's autocast (bf16 on a
GPU, fp32 on the CPU), backward, gradient clipping, AdamW, expert averaging (eq. 7-8); what the
engine adds around it (data, DDP) is measured above. On the CPU: the smoke preset at batch 4.
On a GPU, the paper's Table 4 settings: L at batch 16 per GPU with and without gradient
checkpointing (samples/s, model FLOPs utilisation, peak memory; the baseline is the step without
checkpointing), and H at batch 2 with checkpointing, to answer whether it fits the paper's 40 GB
A100s. One GPU holds H's whole training state (6.3 B parameters: weights, gradients and AdamW
moments in fp32, about 93 GiB), so the per-GPU figure under FSDP over the paper's 32 GPUs is an
estimate: the measured peak less 31/32 of the measured training state, which FSDP shards.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from model.presets import get_preset
from tasks.benchmarks.common import latent_shape, peak_bf16_tflops, unet_training_flops
from tasks.config.params import CacheLatentsParams, TrainUnetParams, clip_shape
from tasks.preprocessing.synthetic_latents import moving_blob_latents, synthetic_cache
from tasks.storage.latent_shards import latent_dataset, load_null_context
from tasks.training.engine import make_optimizer
from tasks.training.launch import fit
from tasks.training.tracking import history_summary
from tasks.training.unet import UNetRecipe

STEPS = 60
FSDP_GPUS = 32  # the paper's H run: 32 A100s of 40 GB, batch 2 each



def training_step_figures(preset: str, batch: int, gradient_checkpointing: bool, steps: int, device: torch.device, warmup: int = 2) -> dict:
    """One worker's optimizer steps, timed after `warmup` of them: seconds per step, samples/s,
    the per-step losses, model FLOPs utilisation and memory on a GPU. An out-of-memory error is a
    figure too ({"out_of_memory": True})."""
    torch.manual_seed(0)
    frames, height, width = clip_shape(preset)
    shape = latent_shape(preset)
    train = TrainUnetParams(batch_size=batch, gradient_checkpointing=gradient_checkpointing, image_share=0.0, image_batch_size=0, lr=5e-5)  # videos only: one FLOP count
    context_dim = get_preset(preset).unet.context_dim
    recipe = UNetRecipe(preset, train, np.zeros((77, context_dim), np.float16), [], CacheLatentsParams(), (frames, height, width))
    cuda = device.type == "cuda"
    figures: dict = {"preset": preset, "batch": batch, "gradient_checkpointing": gradient_checkpointing, "dtype": "bfloat16" if cuda else "float32"}
    model = optimizer = data = None
    if cuda:  # what an earlier configuration (or its out-of-memory error) left in the allocator's cache
        gc.collect()
        torch.cuda.empty_cache()
    try:
        model = recipe.build().to(device).train()
        optimizer = make_optimizer([model.parameters()], train.lr, train.weight_decay)
        rng = np.random.default_rng(0)
        channels, frames, height, width = shape
        data = {"latents": torch.from_numpy(moving_blob_latents(rng, batch, frames, height, width, channels)).to(device),
                "context": torch.from_numpy(rng.standard_normal((batch, 77, context_dim)).astype(np.float32) * 0.1).to(device)}
        losses, state_bytes = [], 0
        for step in range(warmup + steps):
            if step == warmup:
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                started = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):  # the engine's Accelerator: bf16 on GPU only
                loss = recipe.loss(model, data, step, torch.Generator(device).manual_seed(step))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
            optimizer.step()
            recipe.after_optimizer_step(model)
            losses.append(loss.detach())  # read after the timing: no synchronisation per step
            if cuda and step == 0:
                state_bytes = torch.cuda.memory_allocated(device)  # weights, gradients and AdamW moments, between steps
        if cuda:
            torch.cuda.synchronize()
        step_s = (time.perf_counter() - started) / steps
    except torch.OutOfMemoryError:
        return {**figures, "out_of_memory": True}
    finally:
        del model, optimizer, data
        if cuda:
            torch.cuda.empty_cache()
    flops = unet_training_flops(get_preset(preset).unet, shape) * batch
    figures.update(step_s=round(step_s, 4), samples_per_s=round(batch / step_s, 2), losses=[round(float(value), 5) for value in losses],
                   model_flops_per_step=flops, achieved_tflops=float(f"{flops / step_s / 1e12:.4g}"))
    if cuda:
        peak = peak_bf16_tflops(torch.cuda.get_device_name(device))
        figures.update(mfu=round(flops / step_s / (peak * 1e12), 4) if peak else None,
                       peak_memory_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 2), training_state_gib=round(state_bytes / 2**30, 2))
    return figures


def gpu_figures(device: torch.device) -> dict:
    """The paper's settings on one GPU (see the module's docstring)."""
    name = torch.cuda.get_device_name(device)
    plain = training_step_figures("L", 16, False, steps=10, device=device)
    checkpointed = training_step_figures("L", 16, True, steps=10, device=device)
    report: dict = {"device": name, "L_batch16": plain, "L_batch16_checkpointing": checkpointed}
    if not (plain.get("out_of_memory") or checkpointed.get("out_of_memory")):
        report["checkpointing_vs_plain"] = {"samples_per_s": round(checkpointed["samples_per_s"] / plain["samples_per_s"], 3),
                                            "peak_memory": round(checkpointed["peak_memory_gib"] / plain["peak_memory_gib"], 3)}
    h = training_step_figures("H", 2, True, steps=3, device=device, warmup=1)
    report["H_batch2_checkpointing"] = h
    if not h.get("out_of_memory"):
        estimate = h["peak_memory_gib"] - h["training_state_gib"] * (FSDP_GPUS - 1) / FSDP_GPUS
        report["H_batch2_per_gpu_fsdp32_estimate_gib"] = round(estimate, 2)
        report["H_fits_batch2_in_40GB"] = bool(estimate <= 40)  # an A100's 40 GiB, before its CUDA context takes its share
    return report


def cpu_figures() -> dict:
    """The smoke preset's step on this machine's cores, with and without checkpointing."""
    torch.set_num_threads(os.cpu_count() or 1)
    plain = training_step_figures("smoke", 4, False, steps=10, device=torch.device("cpu"))
    checkpointed = training_step_figures("smoke", 4, True, steps=10, device=torch.device("cpu"))
    return {"device": "cpu", "smoke_batch4": plain, "smoke_batch4_checkpointing": checkpointed,
            "checkpointing_vs_plain": {"samples_per_s": round(checkpointed["samples_per_s"] / plain["samples_per_s"], 3)}}


def engine_figures() -> dict:
    """The smoke UNet through the engine: 1 worker, 2 under DDP, 2 under FSDP (MLflow histories)."""
    work = Path(tempfile.mkdtemp(prefix="versvideo-bench-train-"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    try:
        latents = synthetic_cache(work / "latents")
        figures = {}
        for name, workers, strategy in (("1", 1, "ddp"), ("2", 2, "ddp"), ("2-fsdp", 2, "fsdp")):
            train = TrainUnetParams(steps=STEPS, batch_size=4 // workers, image_share=0.0, image_batch_size=0, num_workers=workers, strategy=strategy, checkpoint_every=STEPS,
                                    sample_every=0, sample_count=1, sample_steps=2, held_out_share=0.0)
            recipe = UNetRecipe("smoke", train, load_null_context(latents), ["a red circle moves left"], CacheLatentsParams(smoke_vae_fit_steps=0), clip_shape("smoke"))
            run = fit(recipe, train, {"train": latent_dataset(latents, seed=train.seed)}, run_name=f"bench-{name}", storage=work / "runs",
                      output_dir=work / f"unet-{name}", params={}, tags={})
            figures[name] = history_summary(run["mlflow_run_id"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "preset": "smoke",
        "steps": STEPS,
        "global_batch": 4,
        "samples_per_s": {name: round(f["mean_samples_per_s"], 2) for name, f in figures.items()},
        "data_wait_share": {name: round(f["mean_data_wait_share"], 4) for name, f in figures.items()},
        "two_vs_one_worker": round(figures["2"]["mean_samples_per_s"] / figures["1"]["mean_samples_per_s"], 2),
        "fsdp_vs_ddp_two_workers": round(figures["2-fsdp"]["mean_samples_per_s"] / figures["2"]["mean_samples_per_s"], 2),
    }


def run(args: argparse.Namespace) -> dict:
    # the step first, in this process, before Ray's processes share the machine
    training_step = gpu_figures(torch.device("cuda")) if torch.cuda.is_available() else cpu_figures()
    return {**engine_figures(), "training_step": training_step}
