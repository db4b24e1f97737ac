"""Stage `cache_latents`: clip shards -> frozen image VAE + text encoder -> latent shards.

Training then reads arrays instead of decoding video and running two frozen networks at every
step. This is a batch-inference job on Ray Data: one row per clip shard flows to a pool of
encoder actors (each loads the VAE and the text encoder once; one actor per GPU when the cluster
has GPUs, `num_workers` CPU actors otherwise), and each actor writes one latent shard
(tasks/storage/latent_shards.py describes the files).

Crash safety and resume: a shard is written under a temporary name and renamed when complete,
with a fingerprint of everything it was computed from (the clip shard's bytes, its clip ids and
captions, the encoders' weights, the seed and options, this stage's code). A rerun skips every
shard whose fingerprint matches and recomputes the rest, so a crash costs only the shards in
flight. dvc.yaml marks the folder `persist: true` so DVC leaves finished shards in place for the
rerun. Same inputs and seed give identical bytes: the posterior noise of each clip is drawn from
a generator seeded by (seed, clip_id), independent of which actor or batch encodes it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file

from model.image_vae import LATENT_CHANNELS, build_tiny_image_vae, frames_to_pixels
from model.presets import get_preset
from model.weights import file_digest
from tasks.config.params import PROGRESS_SECONDS, CacheLatentsParams, Params
from tasks.config.paths import CACHE_LATENTS_METRICS, CLIPS, LATENTS
from tasks.inference.encoders import encode_captions, encoder_info, load_text
from tasks.preprocessing.latents import cache_latents
from tasks.storage.atomic import atomic_path, write_json, write_npy, write_parquet
from tasks.storage.clip_shards import shard_name as clip_shard_name
from tasks.storage.weight_files import require_weight_files

FIT_THREADS = 2  # the smoke VAE fit's threads on every machine: another count sums in another order, and the weights change


def fit_smoke_vae(index: pd.DataFrame, clips_dir: Path, folder: Path, cfg: CacheLatentsParams) -> Path:
    """The smoke preset's VAE: the tiny seeded VAE fitted for `smoke_vae_fit_steps` on frames of
    the clips (squared error + 1e-6 KL), so latents decode back to recognisable frames, with
    the shapes' colours, and samples can be looked at. LDM fits L1 beside a perceptual and a GAN
    term; alone, L1 pulls the few shape pixels to the background's median colour (after 800
    steps the caption probe read 31 % of the reconstructed clips' colours, against 90 % with the
    squared error). A fixed thread count and a seeded frame order make the weights, and so the
    cache, byte-identical run to run. Saved as a diffusers folder; refitted only when the clips,
    steps or seed change."""
    shards = [clips_dir / clip_shard_name(int(shard)) for shard in sorted(index["shard"].unique())]
    stamp = {"clips": file_digest(*shards), "steps": cfg.smoke_vae_fit_steps, "seed": cfg.seed, "code": file_digest(Path(__file__))}
    if (folder / "fit.json").exists() and json.loads((folder / "fit.json").read_text()) == stamp:
        return folder
    threads = torch.get_num_threads()
    torch.set_num_threads(FIT_THREADS)
    try:
        frames = np.concatenate([np.load(path, mmap_mode="r").reshape(-1, *np.load(path, mmap_mode="r").shape[2:]) for path in shards])
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


def main(params: Params) -> None:
    cfg = params.cache_latents
    require_weight_files(params, "cache_latents")
    index_path = CLIPS / "index.parquet"
    if not index_path.exists():
        raise FileNotFoundError(f"{index_path} not found: run the decode stage first (versvideo stage decode)")
    index = pd.read_parquet(index_path)
    stand_in = not cfg.vae_weights and cfg.smoke_vae_fit_steps > 0
    if stand_in:
        LATENTS.mkdir(parents=True, exist_ok=True)
        cfg = dataclasses.replace(cfg, vae_weights=str(fit_smoke_vae(index, CLIPS, LATENTS / "image_vae", cfg).resolve()))
    info = encoder_info(cfg, vae_stand_in=stand_in)
    context_dim = get_preset(params.preset).unet.context_dim
    if info["text_encoder"]["width"] != context_dim:
        raise ValueError(f"cache_latents.text_model: token width {info['text_encoder']['width']} does not match the {params.preset} UNet's context_dim {context_dim}")

    started = time.perf_counter()
    status = cache_latents(index, cfg, info, CLIPS, LATENTS)
    seconds = time.perf_counter() - started

    text, tokenizer = load_text(cfg)  # on the driver, for the one empty-prompt context
    write_npy(encode_captions(text, tokenizer, [""])[0], LATENTS / "null_context.npy")
    write_json(info, LATENTS / "encoders.json")
    write_parquet(index, LATENTS / "index.parquet")  # last: it is what makes the shards visible
    encoded = status[status["status"] == "encoded"]
    frames, height, width = params.decode.frames, params.decode.height, params.decode.width
    summary = {
        "clips": len(index),
        "shards": len(status),
        "shards_encoded": len(encoded),
        "shards_skipped": int((status["status"] == "skipped").sum()),
        "latent_shape": [frames, 4, height // 8, width // 8],
        "seconds": round(seconds, 2),
        # per actor, encoding time only (the stage's wall time includes starting Ray and the actors)
        "actor_clips_per_s": round(float(encoded["clips"].sum() / encoded["seconds"].sum()), 2) if len(encoded) else None,
        "random_init": info["random_init"],
        "comparable": info["comparable"],
    }
    write_json(summary, CACHE_LATENTS_METRICS)
    print(f"cache_latents: {summary['clips']} clips -> latents {tuple(summary['latent_shape'])} in {summary['shards']} shard(s) "
          f"({summary['shards_encoded']} encoded, {summary['shards_skipped']} already complete) in {seconds:.1f} s"
          + ("; stand-in encoders (smoke): comparable=false" if info["random_init"] else ""))
