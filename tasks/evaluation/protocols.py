"""The evaluate stage's protocols: for each, the prompts to generate (one per video, each with its
own seed), the real videos to compare with, and how both are viewed (frames, size, which frames
of a real video). tasks/evaluation/scoring.py generates and scores; this module only decides what.

Our own protocols follow the demo's clips:
    heldout       the videos train_unet held out; their captions are the prompts.
    captions      prompt following on the demo world (eval/caption_probe.py).
    ucf101        class prompts in turn against a seeded subset of a test list, read like training
                  clips (from frame 0 at the clips' fps); quick, not a published protocol.
    msrvtt        one seeded caption per test (or 1k-A) video, read the same way.
The reference protocols of eval/protocols.py (stylegan-v, ucf101-is10k, msrvtt-paper) fix
every choice as the published numbers made it, and record where a run departs from them.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from eval.caption_probe import DIRECTIONS, PALETTE, SHAPES, TEXTURES, parse_caption
from eval.datasets import CaptionedVideo, UCFVideo, class_prompt, files_digest, read_msrvtt_1ka, read_msrvtt_test, read_ucf101_split
from eval.protocols import REFERENCE_PROTOCOLS, ReferenceProtocol
from eval.ucf101_prompts import prompt_table_digest, table_prompt
from tasks.config.params import EvaluateParams, Params
from tasks.config.paths import CLIPS
from tasks.storage.clip_shards import shard_name, split_clips
from tasks.storage.shard_store import read_manifest, shard_location
from tasks.storage.video_io import VideoError, path_under

# Real videos read beyond a reference's count, so that discarded (too short, unreadable) ones are
# replaced by the next of the shuffle, as StyleGAN-V's dataset drops short videos before counting.
RESERVE_SHARE = 0.05


@dataclass(frozen=True)
class View:
    """How a protocol's videos are looked at; the same for its real and generated videos."""

    frames: int  # frames scored
    generate_frames: int  # frames generated (the first `frames` are scored)
    height: int  # scoring size: resize to cover, centre crop (generated videos too)
    width: int
    real_read: str  # shard: a clip of the clip shards; start: frame 0 at the clips' fps; window: `frames` native frames from a seeded offset
    fvd_frames: int  # the first frames the I3D sees


@dataclass
class Protocol:
    name: str
    dataset: str
    split: str
    prompts: list[str]  # one per generated video
    real: pd.DataFrame  # path, shard_row (-1: a video file), prompt, id
    view: View
    details: dict[str, Any] = field(default_factory=dict)  # protocol facts to record (list hashes, prompt table, ...)
    groups: list[str] = field(default_factory=list)  # captions: each prompt's group (training, unseen)
    reference: ReferenceProtocol | None = None
    real_limit: int | None = None  # score at most this many usable real videos (the rest are reserves)
    deviations: list[str] = field(default_factory=list)  # where a reference run departs from its definition

    @property
    def metrics(self) -> tuple[str, ...]:
        return self.reference.metrics if self.reference else ("fvd", "is", "clipsim", "frame_consistency")

    @property
    def covariance_ddof(self) -> int:
        return self.reference.covariance_ddof if self.reference else 1


def clips_view(params: Params, real_read: str) -> View:
    """Our own protocols look at videos as train_unet's clips are: decode.frames at decode's size."""
    d = params.decode
    return View(d.frames, d.frames, d.height, d.width, real_read, min(params.evaluate.fvd_frames, d.frames))


def heldout_protocol(params: Params, clips: Path = CLIPS) -> Protocol:
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
    manifest = read_manifest(clips)
    real = pd.DataFrame({
        "path": [shard_location(clips, shard_name(int(shard)), manifest) for shard in held["shard"]],
        "shard_row": held["shard_row"].astype(int), "prompt": captions, "id": held["clip_id"].astype(str),
    })
    split = f"train_unet held out (share {share}, seed {params.train_unet.seed}): {held['video_id'].nunique()} videos, {len(held)} clips"
    return Protocol("heldout", "clips", split, [captions[k % len(captions)] for k in range(count)], real, clips_view(params, "shard"))


def captions_protocol(params: Params, clips: Path = CLIPS) -> Protocol:
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
    return Protocol("captions", heldout.dataset, heldout.split, trained + novel, heldout.real, heldout.view,
                    {"training_captions": len(seen), "unseen_combinations": len(unseen)}, ["training"] * len(trained) + ["unseen"] * len(novel))


def listed_video(root: str, relative: str, listed_in: str) -> str:
    """A benchmark list's video under its videos folder; an entry leaving that folder (absolute, or
    by '..') is an error naming the list. Links are followed: a benchmark folder is often assembled
    from links to a shared copy, and its list, unlike a crawled CSV, names files the user put there."""
    try:
        return str(path_under(root, relative, follow_links=True))
    except VideoError as error:
        raise ValueError(f"{listed_in}: entry {error.detail}; benchmark lists name files inside their videos folder") from None


# --- UCF-101 -------------------------------------------------------------------------------------

def ucf101_list_files(cfg: EvaluateParams) -> list[Path]:
    lists = Path(cfg.ucf101_lists)
    return [lists / "classInd.txt"] + [lists / f"{subset}list0{cfg.ucf101_split}.txt" for subset in cfg.ucf101_subset_list]


def ucf101_videos(cfg: EvaluateParams) -> list[UCFVideo]:
    """The videos of the chosen lists (testlist0N, trainlist0N or both), in list order."""
    return [video for subset in cfg.ucf101_subset_list for video in read_ucf101_split(cfg.ucf101_lists, cfg.ucf101_split, subset)]


def ucf101_prompter(cfg: EvaluateParams) -> tuple[Any, dict[str, Any]]:
    """(class name -> prompt, what to record): the hand-written table, or the class-name template."""
    if cfg.ucf101_prompts == "table":
        return table_prompt, {"prompts": "eval/ucf101_prompts.py table", "prompt_table_sha256": prompt_table_digest()}
    return (lambda name: class_prompt(name, cfg.ucf101_prompt_template)), {"prompts": "class-name template", "prompt_template": cfg.ucf101_prompt_template}


def ucf101_split_name(cfg: EvaluateParams) -> str:
    return "+".join(f"{subset}list0{cfg.ucf101_split}" for subset in cfg.ucf101_subset_list)


def ucf101_real(cfg: EvaluateParams, videos: list[UCFVideo], prompt) -> pd.DataFrame:
    return pd.DataFrame({
        "path": [listed_video(cfg.ucf101_videos, video.path, "evaluate.ucf101_lists") for video in videos], "shard_row": -1,
        "prompt": [prompt(video.class_name) for video in videos], "id": [video.path for video in videos],
    })


def ucf101_protocol(params: Params) -> Protocol:
    cfg = params.evaluate
    videos = ucf101_videos(cfg)
    if len(videos) > cfg.max_real:
        picked = np.random.default_rng(cfg.seed).choice(len(videos), cfg.max_real, replace=False)
        videos = [videos[k] for k in sorted(picked)]
    prompt, prompt_details = ucf101_prompter(cfg)
    classes = sorted({(video.label, video.class_name) for video in videos})
    count = cfg.num_videos or len(videos)
    generated = [prompt(classes[k % len(classes)][1]) for k in range(count)]  # classes in turn: balanced
    details = {**prompt_details, "lists_sha256": files_digest(ucf101_list_files(cfg))}
    return Protocol("ucf101", "ucf101", ucf101_split_name(cfg), generated, ucf101_real(cfg, videos, prompt), clips_view(params, "start"), details)


# --- MSR-VTT -------------------------------------------------------------------------------------

def msrvtt_videos(cfg: EvaluateParams) -> tuple[list[CaptionedVideo], str]:
    annotations = Path(cfg.msrvtt_annotations)
    if annotations.suffix == ".csv":
        return read_msrvtt_1ka(annotations), "1k-A"
    return read_msrvtt_test(annotations, cfg.seed), "test"


def msrvtt_real(cfg: EvaluateParams, videos: list[CaptionedVideo]) -> pd.DataFrame:
    return pd.DataFrame({
        "path": [listed_video(cfg.msrvtt_videos, f"{video.video_id}.mp4", "evaluate.msrvtt_annotations") for video in videos], "shard_row": -1,
        "prompt": [video.caption for video in videos], "id": [video.video_id for video in videos],
    })


def msrvtt_protocol(params: Params) -> Protocol:
    cfg = params.evaluate
    videos, split = msrvtt_videos(cfg)
    if cfg.msrvtt_num_videos and cfg.msrvtt_num_videos < len(videos):
        picked = np.random.default_rng(cfg.seed).choice(len(videos), cfg.msrvtt_num_videos, replace=False)
        videos = [videos[k] for k in sorted(picked)]
    real = msrvtt_real(cfg, videos)
    if len(real) > cfg.max_real:
        real = real.sample(cfg.max_real, random_state=cfg.seed).sort_index()
    details = {"annotations_sha256": files_digest([cfg.msrvtt_annotations])}
    return Protocol("msrvtt", "msrvtt", split, [video.caption for video in videos], real.reset_index(drop=True), clips_view(params, "start"), details)


# --- Reference protocols ---------------------------------------------------------------------------

def reference_view(reference: ReferenceProtocol, params: Params) -> View:
    """The reference's frames and size. The model generates its own clip length when that is at
    least the reference's (the first frames are scored, as the paper does with VersVideo-H's 24),
    otherwise exactly the reference's frames."""
    frames = reference.frames
    return View(frames, max(frames, params.decode.frames), reference.height, reference.width, "window", frames)


def budget(reference: ReferenceProtocol, cfg: EvaluateParams, available: int, deviations: list[str]) -> tuple[int, int]:
    """(generated, real) counts: the reference's, capped by `reference_sample_limit` and by the
    videos there are; every cap is a recorded deviation."""
    generated, real = reference.generated_videos, reference.real_videos
    if cfg.reference_sample_limit and cfg.reference_sample_limit < max(generated, real):
        generated, real = min(generated, cfg.reference_sample_limit), min(real, cfg.reference_sample_limit)
        deviations.append(f"evaluate.reference_sample_limit {cfg.reference_sample_limit}: {generated} generated / {real} real videos "
                          f"instead of {reference.generated_videos} / {reference.real_videos}")
    if real > available:
        deviations.append(f"the lists name {available} videos, fewer than the {real} real videos the reference uses")
        real = available
    return generated, real


def shuffled(count: int, seed: int) -> np.ndarray:
    """The seeded order the real set is taken from (its first videos), independent of the budget."""
    return np.random.default_rng([seed, 0]).permutation(count)


def ucf101_reference(reference: ReferenceProtocol, params: Params) -> Protocol:
    """stylegan-v / ucf101-is10k: real set = the first N of a seeded shuffle of the chosen lists;
    generated class labels drawn uniformly over those lists' videos (their label distribution)."""
    cfg = params.evaluate
    videos = ucf101_videos(cfg)
    deviations: list[str] = []
    generated, real_count = budget(reference, cfg, len(videos), deviations)
    prompt, prompt_details = ucf101_prompter(cfg)
    labels = np.random.default_rng([cfg.seed, 1]).integers(len(videos), size=generated)
    prompts = [prompt(videos[k].class_name) for k in labels]
    real = pd.DataFrame(columns=["path", "shard_row", "prompt", "id"])
    if real_count:
        reserve = min(len(videos) - real_count, math.ceil(real_count * RESERVE_SHARE))
        order = shuffled(len(videos), cfg.seed)[: real_count + reserve]
        real = ucf101_real(cfg, [videos[k] for k in order], prompt)
    details = {**prompt_details, "lists_sha256": files_digest(ucf101_list_files(cfg)), "list_videos": len(videos),
               "generated_classes": len({videos[k].label for k in labels})}
    return Protocol(reference.name, "ucf101", ucf101_split_name(cfg), prompts, real, reference_view(reference, params), details,
                    reference=reference, real_limit=real_count, deviations=deviations)


def msrvtt_reference(reference: ReferenceProtocol, params: Params) -> Protocol:
    """msrvtt-paper: one seeded caption per test video as its prompt; the real set is the same test
    videos (those with at least 16 frames), in a seeded order."""
    cfg = params.evaluate
    videos, split = msrvtt_videos(cfg)
    deviations: list[str] = []
    if split != "test":
        deviations.append(f"{cfg.msrvtt_annotations}: the 1k-A split ({len(videos)} videos) instead of the 2990 test videos of test_videodatainfo.json")
    generated, real_count = budget(reference, cfg, len(videos), deviations)
    order = shuffled(len(videos), cfg.seed)
    prompts = [videos[k].caption for k in sorted(order[:generated])]
    reserve = min(len(videos) - real_count, math.ceil(real_count * RESERVE_SHARE))
    real = msrvtt_real(cfg, [videos[k] for k in order[: real_count + reserve]])
    details = {"annotations_sha256": files_digest([cfg.msrvtt_annotations]), "caption_draw": f"one of each video's captions, seeded by (seed {cfg.seed}, video id)"}
    return Protocol(reference.name, "msrvtt", split, prompts, real, reference_view(reference, params), details,
                    reference=reference, real_limit=real_count, deviations=deviations)


def build_protocols(params: Params, clips: Path = CLIPS) -> list[Protocol]:
    """evaluate.protocols, in order."""
    builders = {
        "heldout": lambda: heldout_protocol(params, clips), "captions": lambda: captions_protocol(params, clips),
        "ucf101": lambda: ucf101_protocol(params), "msrvtt": lambda: msrvtt_protocol(params),
    }
    for name, reference in REFERENCE_PROTOCOLS.items():
        builders[name] = (lambda ref=reference: (ucf101_reference if ref.dataset == "ucf101" else msrvtt_reference)(ref, params))
    return [builders[name]() for name in params.evaluate.protocol_list]
