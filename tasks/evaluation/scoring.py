"""Text-to-video metrics under named protocols (paper Tables 1, 2 and 5): what the evaluate stage
runs, and the ablation stage for each of its rows.

Per protocol (tasks/evaluation/protocols.py): the prompts (one per generated video, each with its
own seed), the real videos, and how both are viewed (frames, size, which frames of a real video).
Ray actors (one per GPU, or `num_workers` on CPU) generate the videos in batches and score
generated and real videos alike; the driver reduces the per-video outputs to the metrics.

    FVD               Fréchet distance of I3D features, generated vs real (eval/frechet.py)
    IS                of the UCF-101 C3D's class probabilities, 10 splits (eval/inception.py)
    CLIPSIM           mean text-frame CLIP cosine (eval/clip_metrics.py)
    frame consistency mean CLIP cosine of successive frames

Protocols: heldout, captions, ucf101 and msrvtt follow the demo's clips (decode.frames at
decode's size, real videos from frame 0 at the clips' fps) and report every metric; the reference
protocols stylegan-v, ucf101-is10k and msrvtt-paper (eval/protocols.py) fix frames, size, real
window, counts and covariance divisor as the published numbers did, report only the metrics they
define, and record any deviation. With the smoke preset's random feature networks every number
carries `comparable: false`.

Real-data statistics are cached in data/eval_stats/ by (dataset, split, real-video list, feature-
network hashes, view, seed), so a second evaluation of a new model only generates.

`evaluate` returns the report (every number beside its protocol: N, split, seed, frames,
resolution, frame offsets, list and prompt-table hashes, sampler steps, CFG, weight-file hashes),
writes per-frame CLIPSIM and consistency (generated vs real) as PROTOCOL.csv/.png to its plots
folder, and logs one MLflow run with the same figures and MP4/GIF samples.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray
import torch
from matplotlib.figure import Figure
from mlflow import MlflowClient
from mlflow.entities import Metric

from eval.caption_probe import CHANCE, ProbeResult, agreement, probe
from eval.clip_metrics import build_tiny_clip, frame_embeddings, successive_similarity, text_embeddings, text_frame_similarity
from eval.frechet import FeatureStats, stats_distance
from eval.inception import inception_score
from eval.reconstruction import paired_difference
from eval.protocols import seeded_offset
from eval.video_features import I3D_FEATURES, UCF101_CLASSES, fvd_network, fvd_weights_id, is_network, is_weights_id
from model.weights import file_digest
from tasks.config.params import PREVIEW_FPS, CacheLatentsParams, EvaluateParams, Params, flatten, params_to_dict
from tasks.config.paths import CLIPS, DECODER, EVAL_STATS, LATENTS, PLOTS, UNET
from tasks.evaluation.protocols import Protocol, View, build_protocols
from tasks.inference.clip_score import load_clip
from tasks.inference.encoders import load_vae, resolved_encoders
from tasks.inference.generation import VideoGenerator, read_video_clip
from tasks.inference.models import IMAGE_VAE, TCM_VAE, image_vae_decoder, load_decoder, trained_decoders
from tasks.operations.lineage import lineage_tags, log_params, start_run, tracking_uri
from tasks.operations.ray_runtime import ensure_ray
from tasks.storage.atomic import atomic_path
from tasks.storage.latent_shards import load_encoders_info
from tasks.storage.previews import write_preview
from tasks.storage.shard_store import data_storage, load_npy, read_output_file, write_output_file
from tasks.storage.video_io import VideoError, center_crop, cover_size, decode_frames, probe_video, resize_frames
from tasks.storage.weight_files import require_weight_files

C3D_FRAMES = 16  # the UCF-101 C3D's input length


@dataclass(frozen=True)
class Settings:
    """What every scoring actor needs (plain values: it travels to Ray workers)."""

    height: int  # the size the UNet generates at (decode's); each protocol's View says how it is scored
    width: int
    fps: float  # the clips' frame rate: `start` views read real videos at it
    steps: int
    guidance_scale: float
    cfg: EvaluateParams
    encoders: CacheLatentsParams
    unet: str
    decoder: str
    latents: str
    views: dict[str, View]  # per protocol name
    max_frames: int  # longest scored clip over the protocols: per-frame columns are padded to it
    table_decoders: dict[str, str]  # decoder_table's other decoders: name -> train_decoder's folder (beside the image VAE's own)


def feature_networks(cfg: EvaluateParams):
    """(I3D, C3D, (CLIP model, tokenizer)): the local weight files, or the smoke stand-ins."""
    fvd, _ = fvd_network(cfg.i3d_weights, "evaluate.i3d_weights", cfg.seed)
    inception, _ = is_network(cfg.c3d_weights, "evaluate.c3d_weights", cfg.seed)
    clip = load_clip(cfg.clip_model, cfg.clip_weights, "evaluate.clip_weights") if cfg.clip_weights else build_tiny_clip(cfg.seed)
    return fvd, inception, clip


def feature_network_ids(cfg: EvaluateParams) -> dict[str, str]:
    """The networks' weight hashes (or stand-in seeds), computed once on the driver without loading them."""
    clip_id = f"{cfg.clip_model}:{file_digest(cfg.clip_weights)}" if cfg.clip_weights else f"tiny-random-clip-seed{cfg.seed}"
    return {"i3d": fvd_weights_id(cfg.i3d_weights, cfg.seed), "c3d": is_weights_id(cfg.c3d_weights, cfg.seed), "clip": clip_id}


def to_view(videos: np.ndarray, view: View) -> np.ndarray:
    """Generated (b, t, h, w, 3) -> the view's first `frames` frames, resized to cover the view's
    size and centre-cropped, as real videos are read."""
    videos = videos[:, : view.frames]
    b, t, h, w, _ = videos.shape
    if (h, w) == (view.height, view.width):
        return videos
    cover_height, cover_width = cover_size(h, w, view.height, view.width)
    resized = resize_frames(videos.reshape(b * t, h, w, 3), cover_height, cover_width).reshape(b, t, cover_height, cover_width, 3)
    return np.ascontiguousarray(center_crop(resized, view.height, view.width))


def read_real(row, view: View, s: Settings | None) -> tuple[np.ndarray, int]:
    """A real video as (frames, height, width, 3) uint8 and the index of its first source frame:
    shard  a clip of the clip shards (offset -1: clips have their own windows);
    start  a video file from frame 0 at the clips' frame rate, resized to cover and centre-cropped;
    window `frames` consecutive native frames from a seeded offset (the reference protocols)."""
    if view.real_read == "shard":
        return np.asarray(load_npy(row.path)[int(row.shard_row)]), -1
    if view.real_read == "start":
        return read_video_clip(row.path, view.frames, s.fps, view.height, view.width), 0
    probed = probe_video(Path(row.path))
    if probed.num_frames < view.frames:
        raise VideoError("too_short", f"{row.path}: {probed.num_frames} frames, fewer than the {view.frames} consecutive frames the protocol reads")
    offset = seeded_offset(row.id, s.cfg.seed, probed.num_frames, view.frames)
    cover_height, cover_width = cover_size(probed.height, probed.width, view.height, view.width)
    frames = decode_frames(Path(row.path), np.arange(offset, offset + view.frames), cover_height, cover_width)
    return center_crop(frames, view.height, view.width), offset


class VideoScorer:
    """Ray Data actor: generates the batch's `generated` rows and scores every row (generated or
    real). Every batch holds rows of one protocol, so one view applies."""

    def __init__(self, settings: Settings) -> None:
        device = "cuda" if settings.cfg.use_gpu and torch.cuda.is_available() else "cpu"
        if device == "cpu":
            torch.set_num_threads(1)
        self.settings = settings
        self.fvd, self.inception, (self.clip, self.tokenizer) = feature_networks(settings.cfg)
        for network in (self.fvd.network, self.inception.network, self.clip):
            network.to(device)
        self.generator = VideoGenerator(settings.unet, settings.decoder, settings.latents, settings.encoders, device=device)
        self.table_decoders = {}
        if settings.cfg.decoder_table in settings.views:
            self.table_decoders = {IMAGE_VAE: image_vae_decoder(load_vae(settings.encoders)),
                                   **{name: load_decoder(folder) for name, folder in settings.table_decoders.items()}}
            for decoder in self.table_decoders.values():
                decoder.to(device)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        s = self.settings
        protocol = batch["protocol"].iloc[0]
        view = s.views[protocol]
        generated = batch[batch["kind"] == "generated"]
        videos, captions, keep, offsets = [], [], [], {}
        if len(generated):
            latents = self.generator.sample_latents(generated["prompt"].tolist(), generated["seed"].tolist(), frames=view.generate_frames,
                                                    height=s.height, width=s.width, steps=s.steps, guidance_scale=s.guidance_scale)
            videos += list(to_view(self.generator.decode(latents), view))
            captions += generated["prompt"].tolist()
            keep += list(generated.index)
        status = {}
        for row in batch[batch["kind"] == "real"].itertuples():
            try:
                video, offsets[row.Index] = read_real(row, view, s)
                videos.append(video)
                captions.append(row.prompt)
                keep.append(row.Index)
            except VideoError as error:
                status[row.Index] = f"skipped: {error}"
        out = score_rows(self, batch, view, np.stack(videos) if videos else None, captions, keep, status)
        out["frame_offset"] = [offsets.get(label, -1) for label in batch.index]
        if len(generated) and protocol == s.cfg.decoder_table:
            out = pd.concat([out, *self.decoded_by_table_decoders(generated, latents, view)], ignore_index=True)
        return out

    def decoded_by_table_decoders(self, generated: pd.DataFrame, latents: torch.Tensor, view: View) -> list[pd.DataFrame]:
        """The same latents through each other decoder, scored as rows of protocol PROTOCOL/DECODER
        (Table 3: only the decoder differs, not the prompts, seeds or sampler)."""
        tables = []
        for name, decoder in self.table_decoders.items():
            rows = generated.assign(protocol=f"{generated['protocol'].iloc[0]}/{name}")
            out = score_rows(self, rows, view, to_view(self.generator.decode(latents, decoder), view), rows["prompt"].tolist(), list(rows.index), {})
            tables.append(out.assign(preview=[b""] * len(out), frame_offset=-1))  # samples: the main decoder's only
        return tables


def score_rows(scorer: VideoScorer, batch: pd.DataFrame, view: View, videos: np.ndarray | None, captions: list[str], keep: list[int],
               status: dict[int, str]) -> pd.DataFrame:
    """One output row per input row: FVD features, IS probabilities and CLIP scores (NaN when skipped)."""
    out = batch[["protocol", "kind", "index", "id"]].copy()
    out["status"] = [status.get(position, "ok") for position in batch.index]
    # One fixed shape per column over all protocols (NaN-padded past a view's frames, NaN where a
    # row was skipped), so Ray stores each column as one tensor
    frames = scorer.settings.max_frames
    shapes = {"fvd_features": (I3D_FEATURES,), "is_probabilities": (UCF101_CLASSES,), "clipsim_frames": (frames,), "consistency_pairs": (frames - 1,)}
    columns: dict[str, list] = {name: list(np.full((len(batch), *shape), np.nan)) for name, shape in shapes.items()}
    columns["preview"] = [b""] * len(batch)  # raw uint8 bytes of the sample videos; the driver writes MP4/GIF
    columns["probe"] = [""] * len(batch)  # captions protocol: the probed [colour, shape, direction] as JSON
    if videos is not None:
        tensor = torch.from_numpy(videos).permute(0, 4, 1, 2, 3)  # (b, t, h, w, 3) -> uint8 (b, 3, t, h, w)
        embedded = frame_embeddings(scorer.clip, videos)
        outputs = {
            "fvd_features": scorer.fvd(tensor[:, :, : view.fvd_frames]).numpy(),
            "is_probabilities": scorer.inception(tensor[:, :, :C3D_FRAMES]).numpy(),
            "clipsim_frames": text_frame_similarity(text_embeddings(scorer.clip, scorer.tokenizer, captions), embedded).numpy(),  # CLIPSIM's terms
            "consistency_pairs": successive_similarity(embedded).numpy(),  # frame consistency's terms
        }
        positions = {label: k for k, label in enumerate(batch.index)}
        for k, label in enumerate(keep):
            for name, values in outputs.items():
                columns[name][positions[label]][: values.shape[1]] = values[k].astype(np.float64)
            if batch.at[label, "kind"] == "generated" and batch.at[label, "index"] < scorer.settings.cfg.sample_count:
                columns["preview"][positions[label]] = videos[k].tobytes()
            if batch.at[label, "protocol"] == "captions":
                found = probe(videos[k])
                columns["probe"][positions[label]] = json.dumps([found.color, found.shape, found.direction])
    for name, values in columns.items():
        out[name] = values
    return out


def caption_following(protocol: Protocol, probed: list[list[str | None]], real: pd.DataFrame) -> dict[str, Any]:
    """Per group, the share of generated videos whose probed colour, shape and direction match
    the prompt's (eval/caption_probe.py), with chance; and the probe's agreement with the real
    clips' own captions, the ceiling of what it can confirm."""
    results = [ProbeResult(color, shape, direction, np.empty((0, 2)), 0) for color, shape, direction in probed]
    figures: dict[str, Any] = {}
    for group in ("training", "unseen"):
        members = [k for k, name in enumerate(protocol.groups) if name == group]
        if members:
            scores = agreement([results[k] for k in members], [protocol.prompts[k] for k in members])
            figures.update({f"{key}_accuracy_{group}": round(scores[key], 4) for key in ("color", "shape", "direction")})
            figures[f"videos_{group}"] = len(members)
    clips = [read_real(row, protocol.view, None)[0] for row in real.itertuples()]
    scores = agreement([probe(clip) for clip in clips], real["prompt"].tolist())
    figures.update({f"{key}_accuracy_real_clips": round(scores[key], 4) for key in ("color", "shape", "direction")})
    figures.update({f"{key}_chance": round(CHANCE[key], 4) for key in ("color", "shape", "direction")})
    return figures


def stats_key(protocol: Protocol, ids: dict[str, str], s: Settings) -> dict[str, Any]:
    """Everything the real statistics depend on: which videos (and how many of them count), the
    networks, and how the videos are viewed (a seeded window depends on the seed)."""
    view = protocol.view
    return {
        "dataset": protocol.dataset, "split": protocol.split, "real_videos": hashlib.sha256("\n".join(protocol.real["id"]).encode()).hexdigest(),
        "real_limit": protocol.real_limit, "i3d": ids["i3d"], "clip": ids["clip"], "frames": view.frames, "fvd_frames": view.fvd_frames,
        "height": view.height, "width": view.width, "real_read": view.real_read, "fps": s.fps if view.real_read == "start" else None,
        "offset_seed": s.cfg.seed if view.real_read == "window" else None,
    }


def stats_name(key: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return f"{key['dataset']}-{digest}.npz"


def load_real_stats(folder: Path, name: str) -> dict[str, Any] | None:
    """The cached statistics `name` of the stats folder (or of the data storage its shards.json
    names), or None when they have not been computed."""
    data = read_output_file(folder, name)
    if data is None:
        return None
    with np.load(io.BytesIO(data)) as saved:
        return {"fvd": FeatureStats.from_arrays(saved), "clipsim_frames": saved["clipsim_frames"], "consistency_pairs": saved["consistency_pairs"],
                "skipped": int(saved["skipped"]), "offsets": json.loads(str(saved["offsets"]))}


def save_real_stats(folder: Path, name: str, real: dict[str, Any], key: dict[str, Any]) -> None:
    """Into the stats folder, or with VERSVIDEO_DATA_STORAGE into the bucket beside the shards
    (the folder then keeps shards.json): the cache every node and every clone reads."""
    buffer = io.BytesIO()
    np.savez(buffer, **real["fvd"].arrays(), clipsim_frames=real["clipsim_frames"], consistency_pairs=real["consistency_pairs"],
             skipped=real["skipped"], offsets=json.dumps(real["offsets"]), key=json.dumps(key, sort_keys=True))
    write_output_file(folder, name, buffer.getvalue(), data_storage())


def reduce_rows(rows: pd.DataFrame, frames: int, limit: int | None = None) -> dict[str, Any]:
    """Per-video outputs -> FVD statistics, IS probabilities and per-video CLIP score arrays (the
    view's `frames`). With `limit`, only the first `limit` usable rows count: the rest were
    reserves for discarded ones, and are reported as unused."""
    rows = rows.sort_values("index")
    ok = rows[rows["status"] == "ok"]
    unused = max(0, len(ok) - limit) if limit is not None else 0
    ok = ok.head(limit) if limit is not None else ok
    stats = FeatureStats(I3D_FEATURES)
    if len(ok):
        stats.update(np.stack(ok["fvd_features"].to_numpy()))
    stack = lambda name, width: np.stack(ok[name].to_numpy())[:, :width] if len(ok) else np.zeros((0, width))  # noqa: E731
    return {"fvd": stats, "is_probabilities": stack("is_probabilities", UCF101_CLASSES), "clipsim_frames": stack("clipsim_frames", frames),
            "consistency_pairs": stack("consistency_pairs", frames - 1), "skipped": int((rows["status"] != "ok").sum()), "unused": unused,
            "skip_reasons": rows.loc[rows["status"] != "ok", "status"].head(3).tolist(),
            "offsets": dict(zip(ok["id"].astype(str), ok["frame_offset"].astype(int).tolist()))}


def score(protocols: list[Protocol], s: Settings, ids: dict[str, str], samples: Path, stats: Path) -> dict[str, dict[str, Any]]:
    """Generate and score every protocol's videos in one pass over a Ray actor pool; the first
    `sample_count` generated videos of each protocol go to `samples` as MP4 + GIF; the real
    videos' statistics are read from, or saved to, the `stats` folder."""
    batches, cached, keys = [], {}, {protocol.name: stats_key(protocol, ids, s) for protocol in protocols}
    for protocol in protocols:
        rows = [{"protocol": protocol.name, "kind": "generated", "index": k, "prompt": prompt, "seed": s.cfg.seed * 1_000_003 + k, "path": "", "shard_row": -1, "id": ""}
                for k, prompt in enumerate(protocol.prompts)]
        cached[protocol.name] = load_real_stats(stats, stats_name(keys[protocol.name])) if len(protocol.real) else None
        if cached[protocol.name] is None:
            rows += [{"protocol": protocol.name, "kind": "real", "index": k, "prompt": row.prompt, "seed": 0, "path": row.path, "shard_row": int(row.shard_row), "id": str(row.id)}
                     for k, row in enumerate(protocol.real.itertuples())]
        table = pd.DataFrame(rows)
        batches += [table.iloc[start : start + s.cfg.batch_size] for start in range(0, len(table), s.cfg.batch_size)]  # one protocol per batch: one view
    ensure_ray()
    gpus = int(ray.cluster_resources().get("GPU", 0)) if s.cfg.use_gpu else 0
    # One block per batch (no repartition: an all-to-all step would wait for CPUs the actors hold)
    dataset = ray.data.from_pandas(batches).map_batches(
        VideoScorer, batch_format="pandas", batch_size=None,
        compute=ray.data.ActorPoolStrategy(size=min(gpus or s.cfg.num_workers, len(batches))),
        num_gpus=1 if gpus else 0, num_cpus=1, fn_constructor_kwargs={"settings": s},
    )
    scored = dataset.to_pandas()
    results = {}
    for protocol in protocols:
        view = protocol.view
        mine = scored[scored["protocol"] == protocol.name]
        for row in mine[mine["preview"].map(len) > 0].itertuples():
            stem = f"{protocol.name}_{row.index:03d}_" + re.sub(r"[^a-z0-9]+", "_", protocol.prompts[row.index].lower())[:48]
            write_preview(np.frombuffer(row.preview, dtype=np.uint8).reshape(view.frames, view.height, view.width, 3), samples, stem, PREVIEW_FPS)
        generated = reduce_rows(mine[mine["kind"] == "generated"], view.frames)
        real = cached[protocol.name]
        if real is None:
            real = reduce_rows(mine[mine["kind"] == "real"], view.frames, protocol.real_limit)
            if real["fvd"].count >= 2:
                save_real_stats(stats, stats_name(keys[protocol.name]), real, keys[protocol.name])
        probed = [json.loads(text) for text in mine[mine["kind"] == "generated"].sort_values("index")["probe"]] if protocol.name == "captions" else []
        results[protocol.name] = {"generated": generated, "real": real, "real_cached": cached[protocol.name] is not None, "probed": probed}
        if protocol.name == s.cfg.decoder_table:
            results[protocol.name]["decoders"] = {name: reduce_rows(scored[scored["protocol"] == f"{protocol.name}/{name}"], view.frames)
                                                  for name in (IMAGE_VAE, *s.table_decoders)}
    return results


def offsets_record(offsets: dict[str, int], view: View) -> dict[str, Any]:
    """Which source frames the real videos contributed: the rule, the stride, and the per-video
    first frames (their sha256 over sorted `id offset` lines, and the first few)."""
    rule = {"shard": "the clip shards' own windows", "start": "from frame 0, every k-th frame to the clips' fps",
            "window": f"{view.frames} consecutive native frames from a seeded offset"}[view.real_read]
    lines = sorted(f"{video} {offset}" for video, offset in offsets.items())
    return {"rule": rule, "stride": 1 if view.real_read == "window" else "clip fps", "sha256": hashlib.sha256("\n".join(lines).encode()).hexdigest(),
            "first": lines[:5]}


def is_splits(protocol: Protocol, generated: dict[str, Any], s: Settings) -> int:
    """IS splits: the reference's (or evaluate.is_splits), at most one per generated video."""
    return min(protocol.reference.is_splits if protocol.reference else s.cfg.is_splits, len(generated["is_probabilities"]))


def video_metrics(protocol: Protocol, generated: dict[str, Any], real: dict[str, Any], splits: int) -> dict[str, float]:
    """The protocol's metrics of generated videos against its real ones (reduced by reduce_rows)."""
    wanted = protocol.metrics
    figures: dict[str, float] = {}
    if "fvd" in wanted:
        figures["fvd"] = round(stats_distance(real["fvd"], generated["fvd"], protocol.covariance_ddof), 4)
    if "is" in wanted:
        figures["is_mean"], figures["is_std"] = (round(value, 4) for value in inception_score(generated["is_probabilities"], splits))
    if "clipsim" in wanted:
        figures["clipsim"] = round(float(generated["clipsim_frames"].mean()), 5)
        if len(real["clipsim_frames"]):
            figures["real_clipsim"] = round(float(real["clipsim_frames"].mean()), 5)
    if "frame_consistency" in wanted:
        figures["frame_consistency"] = round(float(generated["consistency_pairs"].mean()), 5)
        figures["real_frame_consistency"] = round(float(real["consistency_pairs"].mean()), 5)
    return figures


def decoder_table(protocol: Protocol, result: dict[str, Any], s: Settings, ids: dict[str, str], comparable: bool) -> dict[str, Any]:
    """Table 3's generation columns: the protocol's metrics with each decoder decoding the same
    latents; the TCM-VAE's row is the protocol's own figures."""
    splits = is_splits(protocol, result["generated"], s)
    rows = {TCM_VAE: video_metrics(protocol, result["generated"], result["real"], splits)}
    for name, generated in result["decoders"].items():
        if generated["skipped"]:
            raise RuntimeError(f"evaluate/{protocol.name}/{name}: {generated['skipped']} decoded video(s) failed to score: {generated['skip_reasons']}")
        rows[name] = video_metrics(protocol, generated, result["real"], splits)
    # Per-video figures, paired across decoders (same latents): the TCM-VAE minus each, with the
    # 95 % interval over resampled videos. FVD has no per-video terms, so no interval here
    per_video = {name: {"frame_consistency": generated["consistency_pairs"].mean(axis=1), "clipsim": generated["clipsim_frames"].mean(axis=1)}
                 for name, generated in {TCM_VAE: result["generated"], **result["decoders"]}.items()}
    videos = np.arange(len(per_video[TCM_VAE]["clipsim"]))
    differences = {f"{TCM_VAE} - {name}": {key: paired_difference(per_video[TCM_VAE][key], values, videos, seed=s.cfg.seed) for key, values in figures.items()}
                   for name, figures in per_video.items() if name != TCM_VAE}
    weights = {TCM_VAE: ids["decoder"], **{name: file_digest(Path(folder) / "model.safetensors") for name, folder in s.table_decoders.items()},
               IMAGE_VAE: "the cache's image VAE (encoders.json)"}
    return {"protocol": protocol.name, "decoders": rows, "differences": differences, "comparable": comparable, "weights": weights,
            "same_latents": f"{len(protocol.prompts)} videos: the same prompts, seeds and DDIM latents for every decoder"}


def protocol_metrics(protocol: Protocol, result: dict[str, Any], s: Settings, ids: dict[str, str], comparable: bool) -> dict[str, Any]:
    """The protocol's metrics (a reference protocol's only), with the full protocol record."""
    generated, real, view, wanted = result["generated"], result["real"], protocol.view, protocol.metrics
    if "fvd" in wanted and real["fvd"].count < 2:
        raise ValueError(f"evaluate/{protocol.name}: {real['fvd'].count} usable real video(s) (skipped {real['skipped']}: {real.get('skip_reasons')}); FVD needs at least 2")
    if generated["skipped"]:
        raise RuntimeError(f"evaluate/{protocol.name}: {generated['skipped']} generated video(s) failed to score: {generated['skip_reasons']}")
    deviations = list(protocol.deviations)
    if protocol.reference and protocol.real_limit and real["fvd"].count < protocol.real_limit:
        deviations.append(f"{real['fvd'].count} usable real videos of the {protocol.real_limit} wanted ({real['skipped']} discarded, reserves exhausted)")
    splits = is_splits(protocol, generated, s)
    figures = video_metrics(protocol, generated, real, splits)
    if protocol.name == "captions":
        figures.update(caption_following(protocol, result["probed"], protocol.real))
    record = {
        "generated_videos": len(protocol.prompts), "real_videos": int(real["fvd"].count), "real_skipped": int(real["skipped"]),
        "real_unused_reserves": int(real.get("unused", 0)), "real_stats_cached": result["real_cached"], "dataset": protocol.dataset,
        "split": protocol.split, "seed": s.cfg.seed, "frames": view.frames, "generated_frames": view.generate_frames, "fvd_frames": view.fvd_frames,
        "is_frames": min(view.frames, C3D_FRAMES), "is_splits": splits, "is_shuffle": "numpy RandomState(42)",
        "covariance_divisor": "n" if protocol.covariance_ddof == 0 else "n - 1", "resolution": f"{view.height}x{view.width}",
        "generated_size": f"{s.height}x{s.width}", "resize": "cover, centre crop", "fps": "native" if view.real_read == "window" else s.fps,
        "real_frames": offsets_record(real["offsets"], view),
        "sampler": "DDIM", "sampler_steps": s.steps, "cfg": s.guidance_scale, "weights": ids, **protocol.details,
    }
    if "clipsim" in wanted:
        record["clipsim_frame_count"] = len(protocol.prompts) * view.frames  # msrvtt-paper: 2990 x 16 = 47,840
    if protocol.reference:
        record.update(reference=protocol.reference.record(), follows_reference=not deviations, deviations=deviations)
    return {**figures, "comparable": comparable and not deviations, "protocol": record}


def per_frame_table(result: dict[str, Any]) -> pd.DataFrame:
    """Per frame index: CLIPSIM and (from frame 1) consistency with the previous frame, generated
    vs real (NaN where a protocol has no real videos)."""
    generated, real = result["generated"], result["real"]
    frames = generated["clipsim_frames"].shape[1]
    mean = lambda values: values.mean(axis=0) if len(values) else np.full(values.shape[1], np.nan)  # noqa: E731
    consistency = lambda pairs: [np.nan] + mean(pairs).tolist()  # noqa: E731
    return pd.DataFrame({
        "frame": np.arange(frames), "clipsim": mean(generated["clipsim_frames"]), "clipsim_real": mean(real["clipsim_frames"]),
        "consistency": consistency(generated["consistency_pairs"]), "consistency_real": consistency(real["consistency_pairs"]),
    })


def draw_per_frame(table: pd.DataFrame, path: Path, protocol: str) -> None:
    """The per-frame table as an image (DVC's own CSV plots need Vega from a CDN to show)."""
    figure = Figure(figsize=(10, 3.2), layout="constrained")
    figure.suptitle(f"evaluate/{protocol}: per frame, generated vs real")
    for column, (key, title) in enumerate((("clipsim", "CLIPSIM (prompt vs frame)"), ("consistency", "frame consistency (with the previous frame)"))):
        axes = figure.add_subplot(1, 2, column + 1)
        axes.plot(table["frame"], table[key], marker="o", label="generated")
        axes.plot(table["frame"], table[f"{key}_real"], marker="o", label="real")
        axes.set(title=title, xlabel="frame")
        axes.legend()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=90)


PROBE_ATTRIBUTES = ("color", "shape", "direction")
PROBE_GROUPS = {"training": "training captions", "unseen": "unseen combinations", "real_clips": "real clips (the probe itself)"}


def prompt_following_table(figures: dict[str, Any]) -> pd.DataFrame:
    """The captions protocol's probe accuracies, one row per (attribute, group), beside chance."""
    return pd.DataFrame([
        {"attribute": attribute, "group": group, "accuracy": figures[f"{attribute}_accuracy_{group}"], "chance": figures[f"{attribute}_chance"]}
        for attribute in PROBE_ATTRIBUTES for group in PROBE_GROUPS
    ])


def draw_prompt_following(table: pd.DataFrame, path: Path) -> None:
    """Grouped bars: for each attribute the caption probe reads, how often the generated video shows
    the prompted value (training captions, unseen combinations) and how often the probe reads the
    real clips right (its ceiling), with chance as a dashed line."""
    figure = Figure(figsize=(7, 3.2), layout="constrained")
    axes = figure.add_subplot(1, 1, 1)
    width = 0.8 / len(PROBE_GROUPS)
    for offset, (group, label) in enumerate(PROBE_GROUPS.items()):
        rows = table[table["group"] == group]
        axes.bar(np.arange(len(PROBE_ATTRIBUTES)) + (offset - 1) * width, rows["accuracy"], width, label=label)
    chance = table.drop_duplicates("attribute")["chance"].to_numpy()
    axes.hlines(chance, np.arange(len(PROBE_ATTRIBUTES)) - 0.45, np.arange(len(PROBE_ATTRIBUTES)) + 0.45, colors="black", linestyles="dashed", label="chance")
    axes.set(title="evaluate/captions: prompt following (caption probe)", ylabel="accuracy", ylim=(0, 1.05),
             xticks=np.arange(len(PROBE_ATTRIBUTES)), xticklabels=PROBE_ATTRIBUTES)
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=90)


def check_inputs(params: Params, protocols: list[Protocol], unet: Path, decoder: Path) -> None:
    cfg = params.evaluate
    require_weight_files(params, "evaluate")
    for protocol in protocols:
        if cfg.c3d_weights and "is" in protocol.metrics and protocol.view.frames < C3D_FRAMES:
            raise ValueError(f"evaluate.c3d_weights: the UCF-101 C3D needs {C3D_FRAMES} frames, protocol {protocol.name} scores {protocol.view.frames} "
                             "(decode.frames); use a reference protocol (16 frames) or longer clips")
    for folder, stage in ((unet, "train_unet"), (decoder, "train_decoder")):
        if not (folder / "model.safetensors").is_file():
            raise FileNotFoundError(f"{folder}/model.safetensors not found: run the {stage} stage first (versvideo stage {stage})")


def log_to_mlflow(report: dict[str, Any], params: Params, samples: Path, run_name: str) -> str:
    uri = tracking_uri()
    client = MlflowClient(uri)
    run_id = start_run(client, uri, run_name, lineage_tags("evaluate"))
    flat = flatten({"preset": params.preset, "evaluate": params_to_dict(params)["evaluate"]})
    log_params(client, run_id, flat)
    metrics = [Metric(f"{name}/{key}", float(value), 0, 0) for name, figures in report["protocols"].items()
               for key, value in figures.items() if isinstance(value, (int, float)) and not isinstance(value, bool)]
    if "decoder_table" in report:
        metrics += [Metric(f"decoders/{name}/{key}", float(value), 0, 0) for name, figures in report["decoder_table"]["decoders"].items()
                    for key, value in figures.items()]
    client.log_batch(run_id, metrics=metrics)
    client.log_dict(run_id, report, "eval.json")
    for path in sorted(samples.iterdir()):
        client.log_artifact(run_id, str(path), "samples")
    client.set_terminated(run_id)
    return run_id


def evaluate(params: Params, clips: Path = CLIPS, latents: Path = LATENTS, unet: Path = UNET, decoder: Path = DECODER,
             plots: Path = PLOTS, stats: Path = EVAL_STATS, run_name: str = "") -> dict[str, Any]:
    """Score the UNet in `unet` (decoded by `decoder`) on params.evaluate's protocols; per-frame
    plots go to `plots`, the real videos' cached statistics to `stats`; one MLflow run."""
    cfg = params.evaluate
    protocols = build_protocols(params, clips)
    check_inputs(params, protocols, unet, decoder)
    encoders_random = bool(load_encoders_info(latents).get("random_init", True))
    comparable = not (cfg.missing_weights or encoders_random or params.preset == "smoke")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="versvideo-eval-") as samples:
        settings = Settings(
            height=params.decode.height, width=params.decode.width, fps=params.decode.fps, steps=cfg.steps, guidance_scale=cfg.guidance_scale, cfg=cfg,
            encoders=resolved_encoders(latents, params.cache_latents), unet=str(unet.resolve()), decoder=str(decoder.resolve()),
            latents=str(latents.resolve()), views={protocol.name: protocol.view for protocol in protocols},
            max_frames=max(protocol.view.frames for protocol in protocols),
            table_decoders={name: str(folder.resolve()) for name, folder in trained_decoders(decoder).items() if name != TCM_VAE},
        )
        ids = feature_network_ids(cfg)
        ids["unet"] = file_digest(unet / "model.safetensors")
        ids["decoder"] = file_digest(decoder / "model.safetensors")
        results = score(protocols, settings, ids, Path(samples), stats)
        report = {
            "protocols": {protocol.name: protocol_metrics(protocol, results[protocol.name], settings, ids, comparable) for protocol in protocols},
            "seconds": round(time.perf_counter() - started, 1),
        }
        table_protocol = next((protocol for protocol in protocols if protocol.name == cfg.decoder_table), None)
        if table_protocol is not None:
            report["decoder_table"] = decoder_table(table_protocol, results[table_protocol.name], settings, ids, comparable)
        for protocol in protocols:
            table = per_frame_table(results[protocol.name])
            with atomic_path(plots / f"{protocol.name}.csv") as tmp:
                table.to_csv(tmp, index=False)
            draw_per_frame(table, plots / f"{protocol.name}.png", protocol.name)
        if "color_accuracy_training" in report["protocols"].get("captions", {}):
            table = prompt_following_table(report["protocols"]["captions"])
            with atomic_path(plots / "prompt_following.csv") as tmp:
                table.to_csv(tmp, index=False)
            draw_prompt_following(table, plots / "prompt_following.png")
        report["mlflow_run_id"] = log_to_mlflow(report, params, Path(samples), run_name or f"evaluate-{params.preset}")
    return report
