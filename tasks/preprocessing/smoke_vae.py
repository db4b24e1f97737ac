"""The smoke preset's stand-in image VAE: the tiny seeded VAE fitted on the demo's own clips, so
that its latents decode back to frames a person (and the caption probe) can read. The L and H
presets load SD's pretrained VAE instead (cache_latents.vae_weights)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file

from model.image_vae import LATENT_CHANNELS, build_tiny_image_vae, frames_to_pixels
from model.weights import file_digest
from tasks.config.params import PROGRESS_SECONDS, CacheLatentsParams
from tasks.storage.atomic import atomic_path, reuse_file
from tasks.storage.clip_shards import shard_name as clip_shard_name
from tasks.storage.shard_store import load_npy, read_manifest, shard_location, shards_digest

FIT_CODE = (Path(__file__), Path(__file__).resolve().parents[2] / "model" / "image_vae.py")  # a change here refits
FIT_THREADS = 2  # the smoke VAE fit's threads on every machine: another count sums in another order, and the weights change


def fit_smoke_vae(index: pd.DataFrame, clips_dir: Path, folder: Path, cfg: CacheLatentsParams, previous: Path | None = None) -> Path:
    """The smoke preset's VAE: the tiny seeded VAE fitted for `smoke_vae_fit_steps` on frames of
    the clips (squared error + 1e-6 KL), so latents decode back to recognisable frames, with
    the shapes' colours, and samples can be looked at. LDM fits L1 beside a perceptual and a GAN
    term; alone, L1 pulls the few shape pixels to the background's median colour (after 800
    steps the caption probe read 31 % of the reconstructed clips' colours, against 90 % with the
    squared error). A fixed thread count and a seeded frame order make the weights, and so the
    cache, byte-identical run to run. Saved as a diffusers folder; refitted only when the clips,
    steps, seed or fitting code change: a fit already in `folder`, or in `previous` (the last
    run's), is kept."""
    names = [clip_shard_name(int(shard)) for shard in sorted(index["shard"].unique())]
    stamp = {"clips": shards_digest(clips_dir, names), "steps": cfg.smoke_vae_fit_steps, "seed": cfg.seed, "code": file_digest(*FIT_CODE)}
    if fit_stamp(folder) == stamp:
        return folder
    if previous is not None and fit_stamp(previous) == stamp:
        reuse_file(previous, folder)
        return folder
    threads = torch.get_num_threads()
    torch.set_num_threads(FIT_THREADS)
    try:
        manifest = read_manifest(clips_dir)
        shards = [load_npy(shard_location(clips_dir, name, manifest)) for name in names]
        frames = np.concatenate([shard.reshape(-1, *shard.shape[2:]) for shard in shards])
        vae = build_tiny_image_vae(seed=cfg.seed).train().requires_grad_(True)
        with torch.no_grad():  # posterior std ~0.02 at the start, not ~1: the decoder sees the content, not noise
            vae.quant_conv.bias[LATENT_CHANNELS:] -= 8.0
        optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
        generator = torch.Generator().manual_seed(cfg.seed)
        last_line = time.monotonic()
        for step in range(cfg.smoke_vae_fit_steps):
            pixels = frames_to_pixels(frames[np.sort(torch.randint(0, len(frames), (8,), generator=generator).numpy())])
            posterior = vae.encode(pixels).latent_dist
            reconstruction = vae.decode(posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)).sample
            loss = (reconstruction - pixels).square().mean() + 1e-6 * posterior.kl().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if time.monotonic() - last_line >= PROGRESS_SECONDS:
                print(f"cache_latents: fitting the smoke VAE, step {step + 1}/{cfg.smoke_vae_fit_steps}, squared error {loss.item():.4f}", flush=True)
                last_line = time.monotonic()
        # LDM's rule for a new autoencoder: scale latents to unit variance (SD's 0.18215 is this
        # figure for SD's VAE; with it, the tiny VAE's latents had std ~0.34 and the diffusion
        # model saw mostly noise)
        with torch.no_grad():
            sample = frames_to_pixels(frames[np.sort(torch.randint(0, len(frames), (256,), generator=generator).numpy())])
            latent_std = float(torch.cat([vae.encode(chunk).latent_dist.mean for chunk in sample.split(32)]).std())
    finally:
        torch.set_num_threads(threads)
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        # diffusers' private "_..." keys hold a set-ordered list that changes from process to process
        config = {key: value for key, value in vae.config.items() if not key.startswith("_")}
        config["scaling_factor"] = round(1.0 / latent_std, 5)
        (tmp / "config.json").write_text(json.dumps(config, sort_keys=True))
        save_file({name: tensor.detach().contiguous() for name, tensor in vae.state_dict().items()}, str(tmp / "diffusion_pytorch_model.safetensors"))
        (tmp / "fit.json").write_text(json.dumps(stamp))
    print(f"cache_latents: fitted the smoke VAE for {cfg.smoke_vae_fit_steps} steps (final squared error {loss.item():.4f}, latent scale {config['scaling_factor']})", flush=True)
    return folder


def fit_stamp(folder: Path) -> dict | None:
    """What a fitted VAE folder was fitted from (None when there is none)."""
    stamp = folder / "fit.json"
    return json.loads(stamp.read_text()) if stamp.is_file() else None

