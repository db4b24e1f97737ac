"""Stage `cache_latents`: clip shards -> frozen image VAE + text encoder -> latent shards.

Training then reads arrays instead of decoding video and running two frozen networks at every
step. This is a batch-inference job on Ray Data: one row per clip shard flows to a pool of
encoder actors (each loads the VAE and the text encoder once; one actor per GPU when the cluster
has GPUs, `num_workers` CPU actors otherwise), and each actor writes one latent shard
(tasks/storage/latent_shards.py describes the files).

Crash safety and resume: the new cache is built in a staging folder beside data/latents and
replaces it whole when complete, so until then every reader sees the previous cache, complete.
Each shard carries a fingerprint of everything it was computed from (the clip shard's bytes, its
clip ids and captions, the encoders' weights, the seed and options, the encoding code). A shard
whose fingerprint matches one in the previous cache is linked, not recomputed; a killed run's
staging folder is taken over by the rerun, so a crash costs only the shards in flight. dvc.yaml
marks the folder `persist: true` so DVC leaves the previous cache in place for the rerun. Same
inputs and seed give identical bytes: the posterior noise of each clip is drawn from a generator
seeded by (seed, clip_id), independent of which actor or batch encodes it.

The image stream's one-frame clips (data/clips/images) are encoded the same way, by the same
encoders, into data/latents/images (its own shards and index.parquet): the UNet reads them as a
second dataset of latents (1, 4, h/8, w/8).

With VERSVIDEO_DATA_STORAGE set, the actors read the clip shards from it and put the latent
shards there, named by their fingerprints (a rerun finds the complete ones of any earlier run);
data/latents/shards.json names them (tasks/storage/shard_store.py).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pandas as pd

from model.presets import get_preset
from tasks.config.params import CacheLatentsParams, Params
from tasks.config.paths import CACHE_LATENTS_REPORT, CLIPS, IMAGE_CLIPS, IMAGE_LATENTS, LATENTS
from tasks.inference.encoders import encode_captions, encoder_info, load_text, project_path
from tasks.preprocessing.latents import cache_latents
from tasks.preprocessing.smoke_vae import fit_smoke_vae
from tasks.storage.atomic import atomic_folder, write_json, write_npy, write_parquet
from tasks.storage.shard_store import data_storage
from tasks.storage.weight_files import require_weight_files


def main(params: Params) -> None:
    cfg = params.cache_latents
    require_weight_files(params, "cache_latents")
    index_path = CLIPS / "index.parquet"
    if not index_path.exists():
        raise FileNotFoundError(f"{index_path} not found: run the decode stage first (versvideo stage decode)")
    index = pd.read_parquet(index_path)
    if not (IMAGE_CLIPS / "index.parquet").exists():  # decode always writes it, empty without images
        raise FileNotFoundError(f"{IMAGE_CLIPS / 'index.parquet'} not found: these clips predate the image stream; rerun the decode stage (versvideo stage decode)")
    image_index = pd.read_parquet(IMAGE_CLIPS / "index.parquet")
    with atomic_folder(LATENTS, resume=True) as staging:
        started = time.perf_counter()
        status, image_status, info = build_cache(index, image_index, cfg, params.preset, staging)
        seconds = time.perf_counter() - started
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
        "images": len(image_index),
        "image_shards_encoded": int((image_status["status"] == "encoded").sum()),
        "random_init": info["random_init"],
        "comparable": info["comparable"],
    }
    write_json(summary, CACHE_LATENTS_REPORT)
    print(f"cache_latents: {summary['clips']} clips -> latents {tuple(summary['latent_shape'])} in {summary['shards']} shard(s) "
          f"({summary['shards_encoded']} encoded, {summary['shards_skipped']} already complete)"
          + (f", {len(image_index)} images -> latents (1, 4, {height // 8}, {width // 8})" if len(image_index) else "") + f" in {seconds:.1f} s"
          + ("; stand-in encoders (smoke): comparable=false" if info["random_init"] else ""))


def build_cache(index: pd.DataFrame, image_index: pd.DataFrame, cfg: CacheLatentsParams, preset: str, staging: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """The whole cache (shards, VAE fit, empty-prompt context, encoders.json, index; the image
    stream's shards and index under images/) in `staging`; returns the per-shard status of the
    videos and of the images, and the encoders' description."""
    stand_in = not cfg.vae_weights and cfg.smoke_vae_fit_steps > 0
    if stand_in:
        fitted = fit_smoke_vae(index, CLIPS, staging / "image_vae", cfg, previous=LATENTS / "image_vae")
        cfg = dataclasses.replace(cfg, vae_weights=str(fitted.resolve()))
    info = encoder_info(cfg, vae_stand_in=stand_in)
    if stand_in:  # recorded where it will be read from once the staging folder is in place
        info["image_vae"]["weights"] = project_path(str(LATENTS / "image_vae"))
    context_dim = get_preset(preset).unet.context_dim
    if info["text_encoder"]["width"] != context_dim:
        raise ValueError(f"cache_latents.text_model: token width {info['text_encoder']['width']} does not match the {preset} UNet's context_dim {context_dim}")

    storage = data_storage()  # None: the shards go into data/latents itself
    status = cache_latents(index, cfg, info, CLIPS, staging, previous=LATENTS, storage=storage)
    image_status = cache_latents(image_index, cfg, info, IMAGE_CLIPS, staging / IMAGE_LATENTS.name, previous=IMAGE_LATENTS, storage=storage)
    write_parquet(image_index, staging / IMAGE_LATENTS.name / "index.parquet")
    text, tokenizer = load_text(cfg)  # on the driver, for the one empty-prompt context
    write_npy(encode_captions(text, tokenizer, [""])[0], staging / "null_context.npy")
    write_json(info, staging / "encoders.json")
    write_parquet(index, staging / "index.parquet")
    return status, image_status, info
