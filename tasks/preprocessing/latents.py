"""The latent cache's batch inference: one row per clip shard flows to a pool of encoder actors
(Ray Data; one actor per GPU, or `num_workers` CPU actors), each writing one latent shard under a
temporary name with the fingerprint of everything it was computed from, so a rerun skips the
shards that are already complete, or links them from the previous cache
(tasks/storage/latent_shards.py describes the files). With a data storage
(tasks/storage/shard_store.py) the actors read the clip shards from it and put each latent shard
there, named by that fingerprint."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray
import torch

from model.weights import file_digest
from tasks.config.params import CacheLatentsParams
from tasks.inference.encoders import Encoders
from tasks.operations.ray_runtime import ensure_ray
from tasks.storage.atomic import remove_stale_temporaries, reuse_file
from tasks.storage.clip_shards import shard_name as clip_shard_name
from tasks.storage.latent_shards import latent_shard_bytes, shard_fingerprint, shard_name, write_latent_shard
from tasks.storage.object_store import is_file, sha256
from tasks.storage.shard_store import (STORED_KEYS, load_npy, object_location, read_manifest, read_shard_bytes, shard_location,
                                       store_shard, stored_entry, write_manifest)

# A change to any of these files changes what a shard would contain, so it is part of the fingerprint.
CODE = ("tasks/preprocessing/latents.py", "tasks/inference/encoders.py", "tasks/storage/latent_shards.py", "model/image_vae.py", "model/text_encoder.py")


def config_fingerprint(cfg: CacheLatentsParams, info: dict[str, Any], device: str) -> str:
    """Everything except the clip shard itself that decides a latent shard's bytes."""
    code = file_digest(*(Path(__file__).resolve().parents[2] / name for name in CODE))
    payload = {"encoders": info, "micro_batch_frames": cfg.micro_batch_frames, "code": code, "torch": torch.__version__, "device": device}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class ShardEncoder:
    """Ray Data actor: encodes whole clip shards into latent shards, skipping complete ones."""

    def __init__(self, cfg: CacheLatentsParams, fingerprint: str, sources: dict[int, tuple[str, str | None]], out_dir: str, previous_dir: str | None,
                 storage: str | None, use_gpu: bool) -> None:
        if not use_gpu:
            torch.set_num_threads(1)  # one core per actor; also keeps CPU results bit-identical run to run
        self.cfg, self.device, self._encoders = cfg, "cuda" if use_gpu else "cpu", None
        self.fingerprint, self.sources, self.out_dir, self.storage = fingerprint, sources, Path(out_dir), storage
        self.previous_dir = Path(previous_dir) if previous_dir else None

    @property
    def encoders(self) -> Encoders:
        """Loaded on the first shard to encode: a rerun whose shards are all complete loads none."""
        if self._encoders is None:
            self._encoders = Encoders(self.cfg, device=self.device)
        return self._encoders

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame([self.encode_shard(int(shard), rows.sort_values("shard_row")) for shard, rows in batch.groupby("shard")])

    def encode_shard(self, shard: int, rows: pd.DataFrame) -> dict[str, Any]:
        started = time.perf_counter()
        source, source_sha256 = self.sources[shard]
        fingerprint = shard_input_fingerprint(self.fingerprint, source_digest(source, source_sha256), rows)
        done = {"shard": shard, "clips": len(rows), "status": "skipped"}
        if self.storage is not None:
            # objects are named by their fingerprint: one that exists is complete (one PUT) and current
            stored = object_location(self.storage, f"{fingerprint}.parquet")
            if is_file(stored):  # read back for its sha256: far cheaper than encoding it again
                return {**done, **stored_entry(f"{fingerprint}.parquet", read_shard_bytes(stored)), "seconds": time.perf_counter() - started}
        else:
            target = self.out_dir / shard_name(shard)
            previous = self.previous_dir / target.name if self.previous_dir else None
            if shard_fingerprint(target) != fingerprint and previous is not None and shard_fingerprint(previous) == fingerprint:
                reuse_file(previous, target)  # the previous cache's shard, as it is
            if shard_fingerprint(target) == fingerprint:
                return {**done, "seconds": time.perf_counter() - started}
        loading = time.perf_counter()
        encoders = self.encoders
        started += time.perf_counter() - loading  # their one load is not this shard's encoding time
        clips = load_npy(source)
        if len(clips) != len(rows):
            raise ValueError(f"{source}: {len(clips)} clips, but the clip index lists {len(rows)} for shard {shard}; rerun the decode stage")
        latents = np.stack([encoders.encode_clip(clips[row], clip_id) for row, clip_id in zip(rows["shard_row"], rows["clip_id"])])
        context = encoders.encode_text(rows["caption"].astype(str).tolist())
        written = {**done, "status": "encoded"}
        if self.storage is not None:
            written.update(store_shard(self.storage, f"{fingerprint}.parquet", latent_shard_bytes(rows, latents, context, fingerprint)))
        else:
            write_latent_shard(target, rows, latents, context, fingerprint)
        return {**written, "seconds": time.perf_counter() - started}


def source_digest(location: str, known_sha256: str | None) -> str:
    """file_digest of one clip shard (sha256 of its sha256), from its manifest's sha256 when known."""
    return hashlib.sha256(bytes.fromhex(known_sha256 or sha256(location))).hexdigest()


def shard_input_fingerprint(config: str, source_digest: str, rows: pd.DataFrame) -> str:
    digest = hashlib.sha256(config.encode())
    digest.update(source_digest.encode())
    digest.update(json.dumps([rows["clip_id"].tolist(), rows["caption"].astype(str).tolist()]).encode())
    return digest.hexdigest()


def cache_latents(index: pd.DataFrame, cfg: CacheLatentsParams, info: dict[str, Any], clips_dir: Path, out_dir: Path,
                  previous: Path | None = None, storage: str | None = None) -> pd.DataFrame:
    """Encode every clip shard listed in `index` into out_dir, taking complete shards from the
    `previous` cache where their fingerprints match, or, with a data `storage`, into it (named
    by fingerprint, so complete shards of any earlier run are found there) and out_dir's
    shards.json; returns one status row per shard."""
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)  # leftovers of a crashed run are never read, only removed
    ensure_ray()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    fingerprint = config_fingerprint(cfg, info, device="cuda" if gpus else "cpu")
    shards = [rows for _, rows in index.groupby("shard", sort=True)]
    manifest = read_manifest(clips_dir)  # read here: actors on other nodes do not see clips_dir
    sources = {int(shard): (shard_location(clips_dir, clip_shard_name(int(shard)), manifest),
                            manifest["shards"][clip_shard_name(int(shard))]["sha256"] if manifest else None) for shard in index["shard"].unique()}
    results = []
    if shards:
        dataset = ray.data.from_pandas(shards).map_batches(
            ShardEncoder,
            batch_format="pandas",
            batch_size=None,  # one block = one clip shard = one latent shard
            compute=ray.data.ActorPoolStrategy(size=gpus or cfg.num_workers),
            num_gpus=1 if gpus else 0,
            num_cpus=1,
            fn_constructor_kwargs={"cfg": cfg, "fingerprint": fingerprint, "sources": sources, "out_dir": str(out_dir.resolve()),
                                   "previous_dir": str(previous.resolve()) if previous else None, "storage": storage, "use_gpu": bool(gpus)},
        )
        for row in dataset.iter_rows():
            results.append(row)
            print(f"cache_latents: shard {row['shard']:5d} {row['status']} ({row['clips']} clips, {row['seconds']:.1f} s) [{len(results)}/{len(shards)}]", flush=True)
    if storage is not None:
        write_manifest(out_dir, storage, {shard_name(int(row["shard"])): {key: row[key] for key in STORED_KEYS} for row in results})
    expected = {shard_name(int(rows["shard"].iloc[0])) for rows in shards}
    for stale in out_dir.glob("latents-*.parquet"):
        if stale.name not in expected or storage is not None:  # a shard of an earlier, larger input, or of a local cache
            stale.unlink()
    return pd.DataFrame(results, columns=["shard", "clips", "status", "seconds"]).sort_values("shard").reset_index(drop=True)
