"""`versvideo bench train`: training throughput of the engine with the smoke UNet on CPU.

The same run, on the same latent cache (a synthetic one: blobs moving one latent cell per frame,
the smoke preset's (8, 4, 8, 8) latents and 77 x 64 contexts), trains with 1 worker (batch 4),
with 2 workers (batch 2 each: the same global batch) under DDP, and with 2 workers under FSDP,
and reports samples/s and the share of step time spent waiting for data, from the runs' MLflow
histories (steady state: step 1 left out). The baseline is the 1-worker run; the ratios are 2
workers over 1, and FSDP over DDP on 2 workers (the price of gathering sharded weights per block).

Not written yet, so not measured even on a GPU: the L preset's samples/s through the engine,
model FLOPs utilisation and peak memory in bf16 with and without checkpointing, and whether H
fits batch 2 in 40 GB. `versvideo bench unet` times the L UNet's own training step on a GPU.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.atomic import write_json
from tasks.latent_shards import shard_name, write_latent_shard
from tasks.params import CacheLatentsParams, Params, TrainUnetParams
from tasks.train_unet import train_unet

STEPS = 60
CLIPS_PER_SHARD, SHARDS = 64, 4


def synthetic_cache(folder: Path, frames: int = 8, size: int = 8, width: int = 64, seed: int = 0) -> Path:
    """A latent cache in the stage's format with moving-blob latents (learnable, with motion)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for shard in range(SHARDS):
        latents = np.full((CLIPS_PER_SHARD, frames, 4, size, size), -0.1, np.float32)
        for clip in range(CLIPS_PER_SHARD):
            y, x, dy, dx = rng.integers(0, size, 2).tolist() + rng.choice([-1, 1], 2).tolist()
            for t in range(frames):
                latents[clip, t, :, (y + dy * t) % size, (x + dx * t) % size] = 1.5
        clips = pd.DataFrame({"clip_id": [f"s{shard}c{k}" for k in range(CLIPS_PER_SHARD)], "video_id": "synthetic", "caption": "a blob moves"})
        context = (rng.standard_normal((CLIPS_PER_SHARD, 77, width)) * 0.1).astype(np.float16)
        write_latent_shard(folder / shard_name(shard), clips, latents, context, fingerprint="bench")
        rows.append(clips.assign(shard=shard, shard_row=np.arange(CLIPS_PER_SHARD)))
    pd.concat(rows).to_parquet(folder / "index.parquet", index=False)
    np.save(folder / "null_context.npy", np.zeros((77, width), np.float16))
    write_json({"image_vae": {"weights": ""}}, folder / "encoders.json")
    return folder


def run(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="versvideo-bench-train-"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    try:
        latents = synthetic_cache(work / "latents")
        figures = {}
        for name, workers, strategy in (("1", 1, "ddp"), ("2", 2, "ddp"), ("2-fsdp", 2, "fsdp")):
            train = TrainUnetParams(steps=STEPS, batch_size=4 // workers, num_workers=workers, strategy=strategy, checkpoint_every=STEPS,
                                    sample_every=0, sample_count=1, sample_steps=2, held_out_share=0.0)
            params = Params(train_unet=train, cache_latents=CacheLatentsParams(smoke_vae_fit_steps=0))
            figures[name] = train_unet(params, latents=latents, output_dir=work / f"unet-{name}", runs=work / "runs", run_name=f"bench-{name}")
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
        "gpu": "not measured: this benchmark's GPU part is not written yet (see the module's docstring)",
    }
