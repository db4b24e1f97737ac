"""Stage `cache_latents`: clip shards -> frozen image VAE + text encoder -> latent shards.

Training then reads arrays instead of decoding video and running two frozen networks at every
step. This is a batch-inference job on Ray Data: one row per clip shard flows to a pool of
encoder actors (each loads the VAE and the text encoder once; one actor per GPU when the cluster
has GPUs, `num_workers` CPU actors otherwise), and each actor writes one latent shard
(tasks/latent_shards.py describes the files).

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
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray
import torch
from safetensors.torch import save_file

from model.image_vae import SCALE_FACTOR, build_tiny_image_vae, encode_posterior, frames_to_pixels, load_image_vae, scaling_factor, weights_digest
from model.presets import get_preset
from model.text_encoder import TINY_TEXT_CONFIG, build_text_encoder, clip_config, load_text_encoder, tokenizer_for
from model.weights import file_digest

from tasks.atomic import atomic_path, remove_stale_temporaries, write_json, write_npy, write_parquet
from tasks.decode import shard_name as clip_shard_name
from tasks.latent_shards import shard_fingerprint, shard_name, write_latent_shard
from tasks.params import CacheLatentsParams, Params
from tasks.ray_runtime import ensure_ray

CLIPS_DIR = Path("data/clips")
OUT_DIR = Path("data/latents")
METRICS = Path("metrics/cache_latents.json")
# A change to any of these files changes what a shard would contain, so it is part of the fingerprint.
CODE = ("tasks/cache_latents.py", "tasks/latent_shards.py", "model/image_vae.py", "model/text_encoder.py")
TOKENIZER_MODEL = "ViT-L-14"  # its tokenizer: CLIP's BPE vocabulary, bundled with open_clip


def load_vae(cfg: CacheLatentsParams):
    if cfg.vae_weights:
        return load_image_vae(cfg.vae_weights, "cache_latents.vae_weights")
    return build_tiny_image_vae(seed=cfg.seed)


def load_text(cfg: CacheLatentsParams):
    """(text encoder, tokenizer); every open_clip native tower uses CLIP's BPE vocabulary."""
    if cfg.text_weights:
        text = load_text_encoder(cfg.text_model, cfg.text_weights, "cache_latents.text_model", "cache_latents.text_weights")
        return text, tokenizer_for(clip_config(cfg.text_model, "cache_latents.text_model")[0])
    return build_text_encoder(TINY_TEXT_CONFIG, seed=cfg.seed), tokenizer_for(TOKENIZER_MODEL)


@torch.no_grad()
def encode_captions(text, tokenizer, captions: list[str]) -> np.ndarray:
    """(n,) captions -> (n, 77, width) float16 context; each distinct caption encoded once."""
    distinct = sorted(set(captions))
    device = next(text.parameters()).device
    context = text(tokenizer(distinct).to(device)).float().cpu().numpy().astype(np.float16)
    position = {caption: k for k, caption in enumerate(distinct)}
    return context[[position[caption] for caption in captions]]


class Encoders:
    """The frozen VAE and text encoder a cache is made with (loaded once per actor)."""

    def __init__(self, cfg: CacheLatentsParams, device: str = "cpu") -> None:
        self.vae = load_vae(cfg).to(device)
        text, self.tokenizer = load_text(cfg)
        self.text = text.to(device)
        self.cfg = cfg

    def encode_text(self, captions: list[str]) -> np.ndarray:
        return encode_captions(self.text, self.tokenizer, captions)

    def encode_clip(self, clip: np.ndarray, clip_id: str) -> np.ndarray:
        """(t, h, w, 3) uint8 -> (t, 4, h/8, w/8) float16 scaled latents. With sample_posterior,
        z = mean + std * eps (LDM's reparameterised sample), eps seeded by (seed, clip_id)."""
        mean, std = encode_posterior(self.vae, frames_to_pixels(clip), self.cfg.micro_batch_frames)
        mean, std = mean.cpu(), std.cpu()
        if not self.cfg.sample_posterior:
            return mean.numpy().astype(np.float16)
        eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(clip_noise_seed(self.cfg.seed, clip_id)))
        return (mean + std * eps).numpy().astype(np.float16)


def fit_smoke_vae(index: pd.DataFrame, clips_dir: Path, folder: Path, cfg: CacheLatentsParams) -> Path:
    """The smoke preset's VAE: the tiny seeded VAE fitted for `smoke_vae_fit_steps` on frames of
    the clips (L1 reconstruction + 1e-6 KL, LDM's weighting without its perceptual and GAN terms),
    so latents decode back to recognisable frames and samples can be looked at. One thread and a
    seeded frame order make the weights, and so the cache, byte-identical run to run. Saved as a
    diffusers folder; refitted only when the clips, steps or seed change."""
    shards = [clips_dir / clip_shard_name(int(shard)) for shard in sorted(index["shard"].unique())]
    stamp = {"clips": file_digest(*shards), "steps": cfg.smoke_vae_fit_steps, "seed": cfg.seed, "code": file_digest(Path(__file__))}
    if (folder / "fit.json").exists() and json.loads((folder / "fit.json").read_text()) == stamp:
        return folder
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        frames = np.concatenate([np.load(path, mmap_mode="r").reshape(-1, *np.load(path, mmap_mode="r").shape[2:]) for path in shards])
        vae = build_tiny_image_vae(seed=cfg.seed).train().requires_grad_(True)
        optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
        generator = torch.Generator().manual_seed(cfg.seed)
        for _ in range(cfg.smoke_vae_fit_steps):
            pixels = frames_to_pixels(frames[np.sort(torch.randint(0, len(frames), (8,), generator=generator).numpy())])
            posterior = vae.encode(pixels).latent_dist
            reconstruction = vae.decode(posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)).sample
            loss = (reconstruction - pixels).abs().mean() + 1e-6 * posterior.kl().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
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
        if folder.exists():
            shutil.rmtree(folder)  # the old fit, replaced by the rename on the next line
    print(f"cache_latents: fitted the smoke VAE for {cfg.smoke_vae_fit_steps} steps (final L1 {loss.item():.3f}, latent scale {config['scaling_factor']})", flush=True)
    return folder


def clip_noise_seed(seed: int, clip_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{clip_id}".encode()).digest()[:8], "little") >> 1


def encoder_info(cfg: CacheLatentsParams, vae_stand_in: bool = False) -> dict[str, Any]:
    """What encoders.json records: enough for later stages to rebuild the same encoders and for
    a reader to know whether numbers from this cache are comparable to published ones.
    vae_stand_in: vae_weights is the smoke preset's fitted tiny VAE, not a pretrained one."""
    if cfg.vae_weights:
        vae = {"weights": project_path(cfg.vae_weights), "sha256": weights_digest(cfg.vae_weights)}
        if vae_stand_in:
            vae["stand_in"] = f"tiny VAE (seed {cfg.seed}) fitted {cfg.smoke_vae_fit_steps} steps on the clips"
    else:
        vae = {"weights": "", "stand_in": f"tiny random-init VAE, seed {cfg.seed}"}
    if cfg.text_weights:
        _, config = clip_config(cfg.text_model, "cache_latents.text_model")
        text = {"model": cfg.text_model, "weights": project_path(cfg.text_weights), "sha256": file_digest(cfg.text_weights), "width": config["text_cfg"]["width"]}
    else:
        text = {"model": "tiny", "weights": "", "stand_in": f"tiny random-init text tower, seed {cfg.seed}", "width": TINY_TEXT_CONFIG["text_cfg"]["width"]}
    random_init = "stand_in" in vae or "stand_in" in text
    return {
        "image_vae": {**vae, "scale_factor": scaling_factor(cfg.vae_weights) if cfg.vae_weights else SCALE_FACTOR, "latent_channels": 4, "downsample": 8},
        "text_encoder": {**text, "context_length": 77},
        "sample_posterior": cfg.sample_posterior,
        "seed": cfg.seed,
        "random_init": random_init,
        "comparable": not random_init,
    }


def project_path(path: str) -> str:
    """A path as recorded in encoders.json: relative when inside the project, so the file is the
    same in every checkout."""
    absolute = os.path.abspath(path)
    return os.path.relpath(absolute) if absolute.startswith(os.getcwd() + os.sep) else path


def resolved_encoders(latents: Path, cfg: CacheLatentsParams) -> CacheLatentsParams:
    """cache_latents params pointing at the weights the cache in `latents` was made with (the
    smoke preset's fitted VAE included), with absolute paths for Ray workers."""
    info = json.loads((latents / "encoders.json").read_text())
    vae = info["image_vae"].get("weights") or ""
    return dataclasses.replace(cfg, vae_weights=os.path.abspath(vae) if vae else "", text_weights=os.path.abspath(cfg.text_weights) if cfg.text_weights else "")


def config_fingerprint(cfg: CacheLatentsParams, info: dict[str, Any], device: str) -> str:
    """Everything except the clip shard itself that decides a latent shard's bytes."""
    code = file_digest(*(Path(__file__).resolve().parents[1] / name for name in CODE))
    payload = {"encoders": info, "micro_batch_frames": cfg.micro_batch_frames, "code": code, "torch": torch.__version__, "device": device}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class ShardEncoder:
    """Ray Data actor: encodes whole clip shards into latent shards, skipping complete ones."""

    def __init__(self, cfg: CacheLatentsParams, fingerprint: str, clips_dir: str, out_dir: str, use_gpu: bool) -> None:
        if not use_gpu:
            torch.set_num_threads(1)  # one core per actor; also keeps CPU results bit-identical run to run
        self.encoders = Encoders(cfg, device="cuda" if use_gpu else "cpu")
        self.fingerprint, self.clips_dir, self.out_dir = fingerprint, Path(clips_dir), Path(out_dir)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame([self.encode_shard(int(shard), rows.sort_values("shard_row")) for shard, rows in batch.groupby("shard")])

    def encode_shard(self, shard: int, rows: pd.DataFrame) -> dict[str, Any]:
        started = time.perf_counter()
        source = self.clips_dir / clip_shard_name(shard)
        fingerprint = shard_input_fingerprint(self.fingerprint, source, rows)
        target = self.out_dir / shard_name(shard)
        if shard_fingerprint(target) == fingerprint:
            return {"shard": shard, "clips": len(rows), "status": "skipped", "seconds": time.perf_counter() - started}
        clips = np.load(source, mmap_mode="r")
        if len(clips) != len(rows):
            raise ValueError(f"{source}: {len(clips)} clips, but {CLIPS_DIR}/index.parquet lists {len(rows)} for shard {shard}; rerun the decode stage")
        latents = np.stack([self.encoders.encode_clip(clips[row], clip_id) for row, clip_id in zip(rows["shard_row"], rows["clip_id"])])
        context = self.encoders.encode_text(rows["caption"].astype(str).tolist())
        write_latent_shard(target, rows, latents, context, fingerprint)
        return {"shard": shard, "clips": len(rows), "status": "encoded", "seconds": time.perf_counter() - started}


def shard_input_fingerprint(config: str, source: Path, rows: pd.DataFrame) -> str:
    digest = hashlib.sha256(config.encode())
    digest.update(file_digest(source).encode())
    digest.update(json.dumps([rows["clip_id"].tolist(), rows["caption"].astype(str).tolist()]).encode())
    return digest.hexdigest()


def check_random_init_allowed(params: Params) -> None:
    cfg = params.cache_latents
    if params.preset != "smoke" and cfg.random_init:
        missing = "cache_latents.vae_weights" if not cfg.vae_weights else "cache_latents.text_weights"
        raise FileNotFoundError(f"{missing}: required for preset {params.preset} (a local weight file; only the smoke preset may use random-init encoders)")
    for key in ("vae_weights", "text_weights"):
        path = getattr(cfg, key)
        if path and not Path(path).exists():
            raise FileNotFoundError(f"{path}: weight file not found; set cache_latents.{key} to a local file or folder (nothing is downloaded)")


def cache_latents(index: pd.DataFrame, cfg: CacheLatentsParams, info: dict[str, Any], clips_dir: Path, out_dir: Path) -> pd.DataFrame:
    """Encode every clip shard listed in `index` into out_dir; returns one status row per shard."""
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)  # leftovers of a crashed run are never read, only removed
    ensure_ray()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    fingerprint = config_fingerprint(cfg, info, device="cuda" if gpus else "cpu")
    shards = [rows for _, rows in index.groupby("shard", sort=True)]
    results = []
    if shards:
        dataset = ray.data.from_pandas(shards).map_batches(
            ShardEncoder,
            batch_format="pandas",
            batch_size=None,  # one block = one clip shard = one latent shard
            compute=ray.data.ActorPoolStrategy(size=gpus or cfg.num_workers),
            num_gpus=1 if gpus else 0,
            num_cpus=1,
            fn_constructor_kwargs={"cfg": cfg, "fingerprint": fingerprint, "clips_dir": str(clips_dir.resolve()), "out_dir": str(out_dir.resolve()), "use_gpu": bool(gpus)},
        )
        for row in dataset.iter_rows():
            results.append(row)
            print(f"cache_latents: shard {row['shard']:5d} {row['status']} ({row['clips']} clips, {row['seconds']:.1f} s) [{len(results)}/{len(shards)}]", flush=True)
    expected = {shard_name(int(rows["shard"].iloc[0])) for rows in shards}
    for stale in out_dir.glob("latents-*.parquet"):
        if stale.name not in expected:  # a shard of an earlier, larger input
            stale.unlink()
    return pd.DataFrame(results, columns=["shard", "clips", "status", "seconds"]).sort_values("shard").reset_index(drop=True)


def main(params: Params) -> None:
    cfg = params.cache_latents
    check_random_init_allowed(params)
    index_path = CLIPS_DIR / "index.parquet"
    if not index_path.exists():
        raise FileNotFoundError(f"{index_path} not found: run the decode stage first (versvideo stage decode)")
    index = pd.read_parquet(index_path)
    stand_in = not cfg.vae_weights and cfg.smoke_vae_fit_steps > 0
    if stand_in:
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        cfg = dataclasses.replace(cfg, vae_weights=str(fit_smoke_vae(index, CLIPS_DIR, OUT_DIR / "image_vae", cfg).resolve()))
    info = encoder_info(cfg, vae_stand_in=stand_in)
    context_dim = get_preset(params.preset).unet.context_dim
    if info["text_encoder"]["width"] != context_dim:
        raise ValueError(f"cache_latents.text_model: token width {info['text_encoder']['width']} does not match the {params.preset} UNet's context_dim {context_dim}")

    started = time.perf_counter()
    status = cache_latents(index, cfg, info, CLIPS_DIR, OUT_DIR)
    seconds = time.perf_counter() - started

    text, tokenizer = load_text(cfg)  # on the driver, for the one empty-prompt context
    write_npy(encode_captions(text, tokenizer, [""])[0], OUT_DIR / "null_context.npy")
    write_json(info, OUT_DIR / "encoders.json")
    write_parquet(index, OUT_DIR / "index.parquet")  # last: it is what makes the shards visible
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
    write_json(summary, METRICS)
    print(f"cache_latents: {summary['clips']} clips -> latents {tuple(summary['latent_shape'])} in {summary['shards']} shard(s) "
          f"({summary['shards_encoded']} encoded, {summary['shards_skipped']} already complete) in {seconds:.1f} s"
          + ("; stand-in encoders (smoke): comparable=false" if info["random_init"] else ""))
