"""Stage `evaluate`: text-to-video metrics under named protocols (paper Tables 1, 2 and 5).

Per protocol: build the prompts (one per generated video, each with its own seed) and the list of
real videos; Ray actors (one per GPU, or `num_workers` on CPU) generate the videos in batches and
score generated and real videos alike; the driver reduces the per-video outputs to the metrics.

    FVD               Fréchet distance of I3D features, generated vs real (eval/frechet.py)
    IS                of the UCF-101 C3D's class probabilities, 10 splits (eval/inception.py)
    CLIPSIM           mean text-frame CLIP cosine (eval/clip_metrics.py)
    frame consistency mean CLIP cosine of successive frames

Protocols:
    heldout  the videos train_unet held out (train_unet.held_out_share, seeded by video id): their
             captions are the prompts (cycled to num_videos), their clips the real set. With the
             smoke preset's random feature networks its numbers carry `comparable: false`.
    captions prompt following on the demo world (eval/caption_probe.py): one video per prompt for
             training captions and for colour/shape/direction combinations no training video has;
             the share whose probed colour, shape and direction match the prompt, beside chance and
             beside the probe's agreement with the held-out real clips' captions.
    ucf101   prompts from class names (classes in turn), real set = testlist0N videos.
    msrvtt   one seeded caption per test video as the prompt (all 2990 when msrvtt_num_videos = 0,
             or the 1k-A split's 1000), real set = those videos.

Real videos are read at the training clips' frame rate and resolution (cover + centre crop),
from frame 0; shorter ones are skipped and counted. Real-data statistics are cached in
data/eval_stats/ by (dataset, split, real-video list, feature-network hashes, frames, resolution,
fps), so a second evaluation of a new model only generates.

Outputs: reports/eval.json (every number beside its protocol: N, split, seed, frames,
resolution, sampler steps, CFG, weight-file hashes), metrics/eval.json (the headline numbers, for
DVC), plots/eval/PROTOCOL.csv (per-frame CLIPSIM and consistency, generated vs real) and an MLflow
run with the same figures and MP4/GIF samples.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray
import torch
from matplotlib.figure import Figure
from mlflow import MlflowClient
from mlflow.entities import Metric

from eval.caption_probe import CHANCE, DIRECTIONS, PALETTE, SHAPES, TEXTURES, ProbeResult, agreement, parse_caption, probe
from eval.clip_metrics import build_tiny_clip, frame_embeddings, successive_similarity, text_embeddings, text_frame_similarity
from eval.datasets import class_prompt, read_msrvtt_1ka, read_msrvtt_test, read_ucf101_split
from eval.frechet import FeatureStats, stats_distance
from eval.inception import inception_score
from eval.video_features import I3D_FEATURES, UCF101_CLASSES, fvd_network, fvd_weights_id, is_network, is_weights_id
from model.weights import file_digest
from tasks.config.params import PREVIEW_FPS, CacheLatentsParams, EvaluateParams, Params, flatten, params_to_dict
from tasks.config.paths import CLIPS, DECODER, EVAL_METRICS, EVAL_REPORT, EVAL_STATS, LATENTS, PLOTS, UNET
from tasks.inference.clip_score import load_clip
from tasks.inference.encoders import resolved_encoders
from tasks.inference.generation import VideoGenerator, read_video_clip
from tasks.operations.lineage import lineage_tags, log_params, start_run, tracking_uri
from tasks.operations.ray_runtime import ensure_ray
from tasks.storage.atomic import atomic_path, write_json, write_metrics
from tasks.storage.clip_shards import split_clips
from tasks.storage.latent_shards import load_encoders_info
from tasks.storage.previews import write_preview
from tasks.storage.video_io import VideoError, path_under
from tasks.storage.weight_files import require_weight_files

C3D_FRAMES = 16  # the UCF-101 C3D's input length


@dataclass
class Protocol:
    name: str
    dataset: str
    split: str
    prompts: list[str]  # one per generated video
    real: pd.DataFrame  # path, shard_row (-1: a video file), caption
    details: dict[str, Any] = field(default_factory=dict)  # protocol facts to record (e.g. the prompt template)
    groups: list[str] = field(default_factory=list)  # captions: each prompt's group (training, unseen)


@dataclass(frozen=True)
class Settings:
    """What every scoring actor needs (plain values: it travels to Ray workers)."""

    frames: int
    height: int
    width: int
    fps: float
    fvd_frames: int
    steps: int
    guidance_scale: float
    cfg: EvaluateParams
    encoders: CacheLatentsParams
    unet: str
    decoder: str
    latents: str


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


class VideoScorer:
    """Ray Data actor: generates the batch's `generated` rows and scores every row (generated or real)."""

    def __init__(self, settings: Settings) -> None:
        device = "cuda" if settings.cfg.use_gpu and torch.cuda.is_available() else "cpu"
        if device == "cpu":
            torch.set_num_threads(1)
        self.settings = settings
        self.fvd, self.inception, (self.clip, self.tokenizer) = feature_networks(settings.cfg)
        for network in (self.fvd.network, self.inception.network, self.clip):
            network.to(device)
        self.generator = VideoGenerator(settings.unet, settings.decoder, settings.latents, settings.encoders, device=device)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        s = self.settings
        generated = batch[batch["kind"] == "generated"]
        videos, captions, keep = [], [], []
        if len(generated):
            made = self.generator(generated["prompt"].tolist(), generated["seed"].tolist(), frames=s.frames, height=s.height,
                                  width=s.width, steps=s.steps, guidance_scale=s.guidance_scale)
            videos += list(made)
            captions += generated["prompt"].tolist()
            keep += list(generated.index)
        status = {}
        for row in batch[batch["kind"] == "real"].itertuples():
            try:
                videos.append(read_real(row.path, int(row.shard_row), s))
                captions.append(row.prompt)
                keep.append(row.Index)
            except VideoError as error:
                status[row.Index] = f"skipped: {error}"
        return score_rows(self, batch, np.stack(videos) if videos else None, captions, keep, status)


def score_rows(scorer: VideoScorer, batch: pd.DataFrame, videos: np.ndarray | None, captions: list[str], keep: list[int], status: dict[int, str]) -> pd.DataFrame:
    """One output row per input row: FVD features, IS probabilities and CLIP scores (NaN when skipped)."""
    out = batch[["protocol", "kind", "index"]].copy()
    out["status"] = [status.get(position, "ok") for position in batch.index]
    # One fixed shape per column (NaN where a row was skipped), so Ray stores each column as one tensor
    frames = scorer.settings.frames
    shapes = {"fvd_features": (I3D_FEATURES,), "is_probabilities": (UCF101_CLASSES,), "clipsim_frames": (frames,), "consistency_pairs": (frames - 1,)}
    columns: dict[str, list] = {name: list(np.full((len(batch), *shape), np.nan)) for name, shape in shapes.items()}
    columns["preview"] = [b""] * len(batch)  # raw uint8 bytes of the sample videos; the driver writes MP4/GIF
    columns["probe"] = [""] * len(batch)  # captions protocol: the probed [colour, shape, direction] as JSON
    if videos is not None:
        tensor = torch.from_numpy(videos).permute(0, 4, 1, 2, 3)  # (b, t, h, w, 3) -> uint8 (b, 3, t, h, w)
        embedded = frame_embeddings(scorer.clip, videos)
        outputs = {
            "fvd_features": scorer.fvd(tensor[:, :, : scorer.settings.fvd_frames]).numpy(),
            "is_probabilities": scorer.inception(tensor[:, :, :C3D_FRAMES]).numpy(),
            "clipsim_frames": text_frame_similarity(text_embeddings(scorer.clip, scorer.tokenizer, captions), embedded).numpy(),  # CLIPSIM's terms
            "consistency_pairs": successive_similarity(embedded).numpy(),  # frame consistency's terms
        }
        positions = {label: k for k, label in enumerate(batch.index)}
        for k, label in enumerate(keep):
            for name, values in outputs.items():
                columns[name][positions[label]] = values[k].astype(np.float64)
            if batch.at[label, "kind"] == "generated" and batch.at[label, "index"] < scorer.settings.cfg.sample_count:
                columns["preview"][positions[label]] = videos[k].tobytes()
            if batch.at[label, "protocol"] == "captions":
                found = probe(videos[k])
                columns["probe"][positions[label]] = json.dumps([found.color, found.shape, found.direction])
    for name, values in columns.items():
        out[name] = values
    return out


def read_real(path: str, shard_row: int, s: Settings) -> np.ndarray:
    """A real video as (frames, height, width, 3) uint8: a clip of the clip shards, or a video
    file read from frame 0 at the clips' frame rate, resized to cover and centre-cropped."""
    if shard_row >= 0:
        return np.asarray(np.load(path, mmap_mode="r")[shard_row])
    return read_video_clip(path, s.frames, s.fps, s.height, s.width)


def heldout_protocol(params: Params, clips: Path) -> Protocol:
    """The videos train_unet held out (the same seeded draw by video id over the same videos)."""
    cfg, share = params.evaluate, params.train_unet.held_out_share
    if share == 0:
        raise ValueError("evaluate.protocols: 'heldout' needs videos the UNet never saw, but train_unet.held_out_share is 0; set it > 0 and retrain, or evaluate on ucf101/msrvtt")
    index = pd.read_parquet(clips / "index.parquet")
    _, held = split_clips(index, share, params.train_unet.seed)
    held = held.sort_values("clip_id").reset_index(drop=True)
    if len(held) > cfg.max_real:
        held = held.sample(cfg.max_real, random_state=cfg.seed).sort_values("clip_id").reset_index(drop=True)
    captions = held["caption"].astype(str).tolist()
    count = cfg.num_videos or len(held)
    real = pd.DataFrame({
        "path": [str((clips / f"clips-{int(shard):05d}.npy").resolve()) for shard in held["shard"]],
        "shard_row": held["shard_row"].astype(int), "prompt": captions, "id": held["clip_id"].astype(str),
    })
    split = f"train_unet held out (share {share}, seed {params.train_unet.seed}): {held['video_id'].nunique()} videos, {len(held)} clips"
    return Protocol("heldout", "clips", split, [captions[k % len(captions)] for k in range(count)], real)


def captions_protocol(params: Params, clips: Path) -> Protocol:
    """Prompt following on the demo world: up to `caption_prompts` training captions (of videos
    train_unet trained on) and as many colour/shape/direction combinations that no training video
    has, each on a seeded texture; the real set is heldout's (the probe's baseline)."""
    cfg = params.evaluate
    heldout = heldout_protocol(params, clips)
    index = pd.read_parquet(clips / "index.parquet")
    training, _ = split_clips(index, params.train_unet.held_out_share, params.train_unet.seed)
    try:
        seen = sorted(set(training["caption"].astype(str)))
        combinations = {tuple(parse_caption(caption).values()) for caption in seen}
    except ValueError as error:
        raise ValueError(f"evaluate.protocols: 'captions' needs the demo world's captions (prepare.source: synthetic): {error}") from None
    rng = np.random.default_rng(cfg.seed)
    unseen = [f"a {color} {shape} moves {direction} on a {TEXTURES[rng.integers(len(TEXTURES))]} background"
              for color, shape, direction in itertools.product(PALETTE, SHAPES, DIRECTIONS) if (color, shape, direction) not in combinations]
    pick = lambda items: [items[k] for k in sorted(rng.choice(len(items), min(cfg.caption_prompts, len(items)), replace=False))]  # noqa: E731
    trained, novel = pick(seen), pick(unseen)
    return Protocol("captions", heldout.dataset, heldout.split, trained + novel, heldout.real,
                    {"training_captions": len(seen), "unseen_combinations": len(unseen)}, ["training"] * len(trained) + ["unseen"] * len(novel))


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
    clips = [read_real(row.path, int(row.shard_row), None) for row in real.itertuples()]
    scores = agreement([probe(clip) for clip in clips], real["prompt"].tolist())
    figures.update({f"{key}_accuracy_real_clips": round(scores[key], 4) for key in ("color", "shape", "direction")})
    figures.update({f"{key}_chance": round(CHANCE[key], 4) for key in ("color", "shape", "direction")})
    return figures


def ucf101_protocol(params: Params) -> Protocol:
    cfg = params.evaluate
    videos = read_ucf101_split(cfg.ucf101_lists, cfg.ucf101_split, "test")
    if len(videos) > cfg.max_real:
        picked = np.random.default_rng(cfg.seed).choice(len(videos), cfg.max_real, replace=False)
        videos = [videos[k] for k in sorted(picked)]
    classes = sorted({(video.label, video.class_name) for video in videos})
    prompts = {name: class_prompt(name, cfg.ucf101_prompt_template) for _, name in classes}
    real = pd.DataFrame({
        "path": [listed_video(cfg.ucf101_videos, video.path, "evaluate.ucf101_lists") for video in videos], "shard_row": -1,
        "prompt": [prompts[video.class_name] for video in videos], "id": [video.path for video in videos],
    })
    count = cfg.num_videos or len(videos)
    generated = [prompts[classes[k % len(classes)][1]] for k in range(count)]  # classes in turn: balanced
    return Protocol("ucf101", "ucf101", f"testlist0{cfg.ucf101_split}", generated, real, {"prompt_template": cfg.ucf101_prompt_template})


def msrvtt_protocol(params: Params) -> Protocol:
    cfg = params.evaluate
    annotations = Path(cfg.msrvtt_annotations)
    if annotations.suffix == ".csv":
        videos, split = read_msrvtt_1ka(annotations), "1k-A"
    else:
        videos, split = read_msrvtt_test(annotations, cfg.seed), "test"
    if cfg.msrvtt_num_videos and cfg.msrvtt_num_videos < len(videos):
        picked = np.random.default_rng(cfg.seed).choice(len(videos), cfg.msrvtt_num_videos, replace=False)
        videos = [videos[k] for k in sorted(picked)]
    real = pd.DataFrame({
        "path": [listed_video(cfg.msrvtt_videos, f"{video.video_id}.mp4", "evaluate.msrvtt_annotations") for video in videos], "shard_row": -1,
        "prompt": [video.caption for video in videos], "id": [video.video_id for video in videos],
    })
    if len(real) > cfg.max_real:
        real = real.sample(cfg.max_real, random_state=cfg.seed).sort_index()
    return Protocol("msrvtt", "msrvtt", split, [video.caption for video in videos], real.reset_index(drop=True))


def listed_video(root: str, relative: str, listed_in: str) -> str:
    """A benchmark list's video under its videos folder; an entry leaving that folder (absolute, or
    by '..') is an error naming the list. Links are followed: a benchmark folder is often assembled
    from links to a shared copy, and its list, unlike a crawled CSV, names files the user put there."""
    try:
        return str(path_under(root, relative, follow_links=True))
    except VideoError as error:
        raise ValueError(f"{listed_in}: entry {error.detail}; benchmark lists name files inside their videos folder") from None


def stats_key(protocol: Protocol, ids: dict[str, str], s: Settings) -> dict[str, Any]:
    return {
        "dataset": protocol.dataset, "split": protocol.split, "real_videos": hashlib.sha256("\n".join(protocol.real["id"]).encode()).hexdigest(),
        "i3d": ids["i3d"], "clip": ids["clip"], "frames": s.frames, "fvd_frames": s.fvd_frames, "height": s.height, "width": s.width, "fps": s.fps,
    }


def stats_path(key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return EVAL_STATS / f"{key['dataset']}-{digest}.npz"


def load_real_stats(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    with np.load(path) as saved:
        return {"fvd": FeatureStats.from_arrays(saved), "clipsim_frames": saved["clipsim_frames"], "consistency_pairs": saved["consistency_pairs"], "skipped": int(saved["skipped"])}


def save_real_stats(path: Path, real: dict[str, Any], key: dict[str, Any]) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as file:
        np.savez(file, **real["fvd"].arrays(), clipsim_frames=real["clipsim_frames"], consistency_pairs=real["consistency_pairs"],
                 skipped=real["skipped"], key=json.dumps(key, sort_keys=True))


def reduce_rows(rows: pd.DataFrame) -> dict[str, Any]:
    """Per-video outputs -> FVD statistics, IS probabilities and per-video CLIP score arrays."""
    ok = rows[rows["status"] == "ok"].sort_values("index")
    stats = FeatureStats(I3D_FEATURES)
    if len(ok):
        stats.update(np.stack(ok["fvd_features"].to_numpy()))
    stack = lambda name: np.stack(ok[name].to_numpy()) if len(ok) else np.zeros((0, 1))  # noqa: E731
    return {"fvd": stats, "is_probabilities": stack("is_probabilities"), "clipsim_frames": stack("clipsim_frames"),
            "consistency_pairs": stack("consistency_pairs"), "skipped": int((rows["status"] != "ok").sum()),
            "skip_reasons": rows.loc[rows["status"] != "ok", "status"].head(3).tolist()}


def score(protocols: list[Protocol], s: Settings, ids: dict[str, str], samples: Path) -> dict[str, dict[str, Any]]:
    """Generate and score every protocol's videos in one pass over a Ray actor pool; the first
    `sample_count` generated videos of each protocol go to `samples` as MP4 + GIF."""
    rows, cached, keys = [], {}, {protocol.name: stats_key(protocol, ids, s) for protocol in protocols}
    for protocol in protocols:
        rows += [{"protocol": protocol.name, "kind": "generated", "index": k, "prompt": prompt, "seed": s.cfg.seed * 1_000_003 + k, "path": "", "shard_row": -1}
                 for k, prompt in enumerate(protocol.prompts)]
        cached[protocol.name] = load_real_stats(stats_path(keys[protocol.name]))
        if cached[protocol.name] is None:
            rows += [{"protocol": protocol.name, "kind": "real", "index": k, "prompt": row.prompt, "seed": 0, "path": row.path, "shard_row": int(row.shard_row)}
                     for k, row in enumerate(protocol.real.itertuples())]
    ensure_ray()
    gpus = int(ray.cluster_resources().get("GPU", 0)) if s.cfg.use_gpu else 0
    table = pd.DataFrame(rows)
    batches = [table.iloc[start : start + s.cfg.batch_size] for start in range(0, len(table), s.cfg.batch_size)]
    # One block per batch (no repartition: an all-to-all step would wait for CPUs the actors hold)
    dataset = ray.data.from_pandas(batches).map_batches(
        VideoScorer, batch_format="pandas", batch_size=None,
        compute=ray.data.ActorPoolStrategy(size=min(gpus or s.cfg.num_workers, len(batches))),
        num_gpus=1 if gpus else 0, num_cpus=1, fn_constructor_kwargs={"settings": s},
    )
    scored = dataset.to_pandas()
    results = {}
    for protocol in protocols:
        mine = scored[scored["protocol"] == protocol.name]
        for row in mine[mine["preview"].map(len) > 0].itertuples():
            stem = f"{protocol.name}_{row.index:03d}_" + re.sub(r"[^a-z0-9]+", "_", protocol.prompts[row.index].lower())[:48]
            write_preview(np.frombuffer(row.preview, dtype=np.uint8).reshape(s.frames, s.height, s.width, 3), samples, stem, PREVIEW_FPS)
        generated = reduce_rows(mine[mine["kind"] == "generated"])
        real = cached[protocol.name]
        if real is None:
            real = reduce_rows(mine[mine["kind"] == "real"])
            if real["fvd"].count >= 2:
                save_real_stats(stats_path(keys[protocol.name]), real, keys[protocol.name])
        probed = [json.loads(text) for text in mine[mine["kind"] == "generated"].sort_values("index")["probe"]] if protocol.name == "captions" else []
        results[protocol.name] = {"generated": generated, "real": real, "real_cached": cached[protocol.name] is not None, "probed": probed}
    return results


def protocol_metrics(protocol: Protocol, result: dict[str, Any], s: Settings, ids: dict[str, str], comparable: bool) -> dict[str, Any]:
    generated, real = result["generated"], result["real"]
    if real["fvd"].count < 2:
        raise ValueError(f"evaluate/{protocol.name}: {real['fvd'].count} usable real video(s) (skipped {real['skipped']}: {real.get('skip_reasons')}); FVD needs at least 2")
    if generated["skipped"]:
        raise RuntimeError(f"evaluate/{protocol.name}: {generated['skipped']} generated video(s) failed to score: {generated['skip_reasons']}")
    splits = min(s.cfg.is_splits, len(generated["is_probabilities"]))
    is_mean, is_std = inception_score(generated["is_probabilities"], splits)
    return {
        "fvd": round(stats_distance(real["fvd"], generated["fvd"]), 4),
        "is_mean": round(is_mean, 4), "is_std": round(is_std, 4),
        "clipsim": round(float(generated["clipsim_frames"].mean()), 5),
        "frame_consistency": round(float(generated["consistency_pairs"].mean()), 5),
        "real_clipsim": round(float(real["clipsim_frames"].mean()), 5),
        "real_frame_consistency": round(float(real["consistency_pairs"].mean()), 5),
        **(caption_following(protocol, result["probed"], protocol.real) if protocol.name == "captions" else {}),
        "comparable": comparable,
        "protocol": {
            "generated_videos": len(protocol.prompts), "real_videos": int(real["fvd"].count), "real_skipped": int(real["skipped"]),
            "real_stats_cached": result["real_cached"], "dataset": protocol.dataset, "split": protocol.split, "seed": s.cfg.seed,
            "frames": s.frames, "fvd_frames": s.fvd_frames, "is_frames": min(s.frames, C3D_FRAMES), "is_splits": splits,
            "resolution": f"{s.height}x{s.width}", "fps": s.fps, "sampler": "DDIM", "sampler_steps": s.steps,
            "cfg": s.guidance_scale, "weights": ids, **protocol.details,
        },
    }


def per_frame_table(result: dict[str, Any]) -> pd.DataFrame:
    """Per frame index: CLIPSIM and (from frame 1) consistency with the previous frame, generated vs real."""
    generated, real = result["generated"], result["real"]
    frames = generated["clipsim_frames"].shape[1]
    consistency = lambda pairs: [np.nan] + pairs.mean(axis=0).tolist()  # noqa: E731
    return pd.DataFrame({
        "frame": np.arange(frames), "clipsim": generated["clipsim_frames"].mean(axis=0), "clipsim_real": real["clipsim_frames"].mean(axis=0),
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


def check_inputs(params: Params, frames: int) -> None:
    cfg = params.evaluate
    require_weight_files(params, "evaluate")
    if cfg.c3d_weights and frames < C3D_FRAMES:
        raise ValueError(f"evaluate.c3d_weights: the UCF-101 C3D needs {C3D_FRAMES} frames, the clips have {frames} (decode.frames)")
    for folder, stage in ((UNET, "train_unet"), (DECODER, "train_decoder")):
        if not (folder / "model.safetensors").is_file():
            raise FileNotFoundError(f"{folder}/model.safetensors not found: run the {stage} stage first (versvideo stage {stage})")


def log_to_mlflow(report: dict[str, Any], params: Params, samples: Path) -> str:
    uri = tracking_uri()
    client = MlflowClient(uri)
    run_id = start_run(client, uri, f"evaluate-{params.preset}", lineage_tags("evaluate"))
    flat = flatten({"preset": params.preset, "evaluate": params_to_dict(params)["evaluate"]})
    log_params(client, run_id, flat)
    metrics = [Metric(f"{name}/{key}", float(value), 0, 0) for name, figures in report["protocols"].items()
               for key, value in figures.items() if isinstance(value, (int, float)) and not isinstance(value, bool)]
    client.log_batch(run_id, metrics=metrics)
    client.log_dict(run_id, report, "eval.json")
    for path in sorted(samples.iterdir()):
        client.log_artifact(run_id, str(path), "samples")
    client.set_terminated(run_id)
    return run_id


def evaluate(params: Params, clips: Path = CLIPS, latents: Path = LATENTS, unet: Path = UNET, decoder: Path = DECODER) -> dict[str, Any]:
    cfg = params.evaluate
    frames, height, width, fps = params.decode.frames, params.decode.height, params.decode.width, params.decode.fps
    check_inputs(params, frames)
    builders = {"heldout": lambda: heldout_protocol(params, clips), "captions": lambda: captions_protocol(params, clips), "ucf101": lambda: ucf101_protocol(params), "msrvtt": lambda: msrvtt_protocol(params)}
    protocols = [builders[name]() for name in cfg.protocol_list]
    encoders_random = bool(load_encoders_info(latents).get("random_init", True))
    comparable = not (cfg.missing_weights or encoders_random or params.preset == "smoke")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="versvideo-eval-") as samples:
        settings = Settings(
            frames=frames, height=height, width=width, fps=fps, fvd_frames=min(cfg.fvd_frames, frames), steps=cfg.steps,
            guidance_scale=cfg.guidance_scale, cfg=cfg, encoders=resolved_encoders(latents, params.cache_latents),
            unet=str(unet.resolve()), decoder=str(decoder.resolve()), latents=str(latents.resolve()),
        )
        ids = feature_network_ids(cfg)
        ids["unet"] = file_digest(unet / "model.safetensors")
        ids["decoder"] = file_digest(decoder / "model.safetensors")
        results = score(protocols, settings, ids, Path(samples))
        report = {
            "protocols": {protocol.name: protocol_metrics(protocol, results[protocol.name], settings, ids, comparable) for protocol in protocols},
            "seconds": round(time.perf_counter() - started, 1),
        }
        for protocol in protocols:
            table = per_frame_table(results[protocol.name])
            with atomic_path(PLOTS / f"{protocol.name}.csv") as tmp:
                table.to_csv(tmp, index=False)
            draw_per_frame(table, PLOTS / f"{protocol.name}.png", protocol.name)
        report["mlflow_run_id"] = log_to_mlflow(report, params, Path(samples))
    return report


def main(params: Params) -> None:
    report = evaluate(params)
    write_json(report, EVAL_REPORT)
    write_metrics(headline_metrics(report), EVAL_METRICS)
    for name, figures in report["protocols"].items():
        p = figures["protocol"]
        print(f"evaluate/{name}: FVD {figures['fvd']:.2f}  IS {figures['is_mean']:.3f} ± {figures['is_std']:.3f}  CLIPSIM {figures['clipsim']:.4f} "
              f"(real {figures['real_clipsim']:.4f})  frame consistency {figures['frame_consistency']:.4f} (real {figures['real_frame_consistency']:.4f})")
        print(f"  protocol: {p['generated_videos']} generated vs {p['real_videos']} real videos ({p['split']}), {p['frames']} frames "
              f"{p['resolution']} at {p['fps']} fps, DDIM {p['sampler_steps']} steps, CFG {p['cfg']}, seed {p['seed']}; comparable: {figures['comparable']}")
        if name == "captions":
            for group in ("training", "unseen", "real_clips"):
                label = {"training": f"{figures['videos_training']} training captions", "unseen": f"{figures['videos_unseen']} unseen combinations",
                         "real_clips": f"the {p['real_videos']} real clips (the probe)"}[group]
                print(f"  prompt following, {label}: " + ", ".join(f"{key} {figures[f'{key}_accuracy_{group}']:.0%} (chance {figures[f'{key}_chance']:.0%})" for key in ("color", "shape", "direction")))
    print(f"evaluate: {report['seconds']} s; {EVAL_REPORT}, {EVAL_METRICS}, {PLOTS}/, MLflow run {report['mlflow_run_id']}")


def headline_metrics(report: dict[str, Any]) -> dict[str, float | None]:
    """What `dvc metrics show` lists for evaluate: the held-out FVD and CLIPSIM and, on the demo
    world, prompt following on colour/shape/direction combinations no training video has."""
    protocols = report["protocols"]
    heldout, captions = protocols.get("heldout", {}), protocols.get("captions", {})
    return {"fvd": heldout.get("fvd"), "clipsim": heldout.get("clipsim"),
            "color_unseen": captions.get("color_accuracy_unseen"), "direction_unseen": captions.get("direction_accuracy_unseen")}

