"""params.yaml -> typed, frozen dataclasses.

Resolution order for every value: the dataclass default, then the preset's defaults
(`PRESET_DEFAULTS`), then params.yaml, then `-S key=value` overrides from the command line.
`versvideo init --preset NAME` (write_preset) writes that preset's values into params.yaml as
concrete numbers, so DVC sees what a run uses; a key set to `null` still takes its value from the
preset.
An unknown key, a value of the wrong type or an out-of-range value is an error that names
the key (`filter.min_motoin: unknown key (did you mean 'min_motion'?)`). Every number must be finite
and, except where a section's check says otherwise, >= 0; a YAML error or a key written twice in
one mapping names the file and line.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

PRESETS = ("smoke", "L", "H")
PREVIEW_FPS = 8  # frame rate of every sample MP4/GIF the stages log and of `generate`'s output (the clips' decode.fps default)
PROGRESS_SECONDS = 30.0  # long stages print a progress line at least this often (training: rank 0's, echoed by the driver)
MAX_FRAME_SIDE = 4096  # pixels: beyond 4K a frame size is a typo (8 bytes of float per pixel would not fit a GPU)
MAX_FPS = 240.0  # frames per second: the fastest cameras WebVid-style footage comes from
SIGNED_KEYS = frozenset({"filter.clip_min_score"})  # the only numbers that may be negative (a cosine similarity)


class ParamsError(ValueError):
    """A bad params.yaml or override; the message names the key and says what to do."""


@dataclass(frozen=True)
class DataParams:
    csv: str = "data/raw/webvid.csv"  # WebVid-format CSV: videoid,contentUrl,duration,page_dir,name
    videos_root: str = "data/raw/videos"  # a row's file is {videos_root}/{page_dir}/{videoid}.mp4
    # image-text pairs for joint training (LAION's role in the paper): img2dataset WebDataset .tar
    # shards and/or Parquet tables pointing at images (tasks/storage/image_text.py); "" = none
    images: str = "data/raw/images"


@dataclass(frozen=True)
class PrepareParams:
    source: str = "synthetic"  # synthetic: the embedded default set | webvid: a user's CSV + videos
    webvid_csv: str = ""  # source=webvid: the user's CSV (videos under data.videos_root)
    num_videos: int = 256  # synthetic set size
    num_images: int = 256  # synthetic image-text set size (written to data.images)
    seconds: float = 1.0  # synthetic video length: one 8-frame clip at 8 fps, the shape crossing the frame
    fps: int = 24
    width: int = 112
    height: int = 80
    seed: int = 0

    def __post_init__(self) -> None:
        _check_choice("prepare.source", self.source, ("synthetic", "webvid"))
        if self.source == "webvid" and not self.webvid_csv:
            raise ParamsError("prepare.webvid_csv: required when prepare.source is 'webvid' (path to your WebVid CSV)")
        _check_positive("prepare.num_videos", self.num_videos)
        _check_positive("prepare.num_images", self.num_images)
        _check_positive("prepare.seconds", self.seconds)
        _check_positive("prepare.fps", self.fps)
        _check_at_most("prepare.fps", self.fps, MAX_FPS)
        for key in ("width", "height"):
            value = getattr(self, key)
            if value < 16 or value % 2:
                raise ParamsError(f"prepare.{key}: {value} must be an even number >= 16 (H.264 needs even sizes)")
            _check_at_most(f"prepare.{key}", value, MAX_FRAME_SIDE)


@dataclass(frozen=True)
class FilterParams:
    num_workers: int = 2  # Ray Data tasks probing videos in parallel
    min_short_side: int = 64  # pixels; smaller sources would be upscaled
    max_aspect_ratio: float = 2.4  # long side / short side
    min_fps: float = 5.0
    max_fps: float = 61.0
    min_caption_words: int = 3
    analysis_short_side: int = 64  # frames are decoded this small for motion / cut scores
    max_analysis_frames: int = 96  # at the clip stride, from the start of the video
    min_motion: float = 0.002  # mean |frame_t+1 - frame_t| on [0,1] grey frames; below = static
    scene_cut_threshold: float = 0.45  # half L1 distance of successive grey histograms, in [0,1]
    scene_cut_adaptive_ratio: float = 4.0  # also a cut: >= this times the local median distance...
    scene_cut_min_distance: float = 0.15  # ...and at least this large (0 ratio = off)
    scene_cut_policy: str = "longest_segment"  # reject | longest_segment
    clip_min_score: float = 0.0  # with clip_weights set: reject below this CLIP text-frame similarity
    clip_model: str = "ViT-B-32"  # open_clip model name, or a path to an open_clip config JSON
    clip_weights: str = ""  # local open_clip checkpoint (.safetensors or .pt state dict); "" = no CLIP scoring

    def __post_init__(self) -> None:
        _check_choice("filter.scene_cut_policy", self.scene_cut_policy, ("reject", "longest_segment"))
        _check_positive("filter.num_workers", self.num_workers)
        _check_positive("filter.max_analysis_frames", self.max_analysis_frames)
        if self.max_aspect_ratio < 1:
            raise ParamsError(f"filter.max_aspect_ratio: {self.max_aspect_ratio} must be >= 1 (long side / short side)")
        if not 0 < self.scene_cut_threshold <= 1:
            raise ParamsError(f"filter.scene_cut_threshold: {self.scene_cut_threshold} must be in (0, 1]")
        _check_positive("filter.min_fps", self.min_fps)
        _check_at_most("filter.max_fps", self.max_fps, MAX_FPS)
        if self.min_fps > self.max_fps:
            raise ParamsError(f"filter.min_fps: {self.min_fps} is above filter.max_fps ({self.max_fps}); every video would be rejected")
        for key in ("min_short_side", "analysis_short_side"):
            _check_positive(f"filter.{key}", getattr(self, key))
            _check_at_most(f"filter.{key}", getattr(self, key), MAX_FRAME_SIDE)
        if not -1 <= self.clip_min_score <= 1:
            raise ParamsError(f"filter.clip_min_score: {self.clip_min_score} must be in [-1, 1] (a cosine similarity)")
        if self.clip_min_score > 0 and not self.clip_weights:
            raise ParamsError(
                "filter.clip_weights: required when filter.clip_min_score > 0 "
                "(path to a local open_clip checkpoint; nothing is downloaded)"
            )


@dataclass(frozen=True)
class DecodeParams:
    frames: int = 8  # frames per clip (16 for L, 24 for H)
    height: int = 64
    width: int = 64
    fps: float = 8.0  # target frame rate; the source stride is round(source_fps / fps)
    clips_per_video: int = 2  # at most; fewer when the clean segment is short
    clips_per_shard: int = 256
    num_workers: int = 2

    def __post_init__(self) -> None:
        for key in ("frames", "height", "width", "fps", "clips_per_video", "clips_per_shard", "num_workers"):
            _check_positive(f"decode.{key}", getattr(self, key))
        if self.height % 8 or self.width % 8:
            raise ParamsError(f"decode.height/width: {self.height}x{self.width} must be multiples of 8 (VAE factor)")
        for key in ("height", "width"):
            _check_at_most(f"decode.{key}", getattr(self, key), MAX_FRAME_SIDE)
        _check_at_most("decode.fps", self.fps, MAX_FPS)


@dataclass(frozen=True)
class CacheLatentsParams:
    vae_weights: str = ""  # SD VAE: diffusers folder or original .ckpt/.safetensors; "" = tiny random VAE (smoke only)
    text_model: str = "ViT-L-14"  # open_clip text tower (name or config JSON); ViT-L-14-quickgelu for OpenAI weights
    text_weights: str = ""  # local open_clip checkpoint; "" = tiny random text tower (smoke only)
    sample_posterior: bool = True  # cache z ~ q(z|x) with seeded per-clip noise (LDM's training input) or its mean
    seed: int = 0
    micro_batch_frames: int = 32  # frames per VAE forward: bounds activation memory
    smoke_vae_fit_steps: int = 800  # without vae_weights (smoke): fit the tiny VAE on the clips this long first; 0 = leave it random
    num_workers: int = 2  # CPU encoder actors; with GPUs in the cluster, one actor per GPU instead

    def __post_init__(self) -> None:
        _check_positive("cache_latents.micro_batch_frames", self.micro_batch_frames)
        _check_positive("cache_latents.num_workers", self.num_workers)
        if self.smoke_vae_fit_steps < 0:
            raise ParamsError(f"cache_latents.smoke_vae_fit_steps: {self.smoke_vae_fit_steps} must be >= 0")

    @property
    def missing_weights(self) -> list[str]:
        """The weight settings left empty: each gets a random stand-in (smoke only)."""
        return [f"cache_latents.{key}" for key in ("vae_weights", "text_weights") if not getattr(self, key)]


STRATEGIES = ("ddp", "fsdp")  # the training engine's data parallelism: replicated or sharded model
PLACEMENTS = ("pack", "spread", "strict_pack", "strict_spread")  # Ray's placement strategies, lower-cased


@dataclass(frozen=True)
class TrainingParams:
    """What the training engine (tasks/training/engine.py) reads; each training stage's section extends it.
    Defaults are the smoke preset's."""

    SECTION: ClassVar[str] = "training"
    # why this model cannot train sharded ("" = it can): under FSDP no rank holds whole weights
    # outside the forward pass, and every rank must use the same parameters in every step
    NO_FSDP: ClassVar[str] = ""
    steps: int = 300  # optimizer steps
    batch_size: int = 4  # clips per worker per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 2e-4
    warmup_steps: int = 20
    weight_decay: float = 0.01
    grad_clip: float = 1.0  # max global grad norm
    ema_decay: float = 0.0  # 0 = no EMA; e.g. 0.9999 for long runs (the exported weights are then the EMA's)
    checkpoint_every: int = 100
    keep_checkpoints: int = 3  # the newest this many checkpoints of a run stay on disk (the one a resume needs always does)
    sample_every: int = 150  # samples (MP4 + GIF) logged to MLflow every this many steps; 0 = at the end only
    max_bad_steps: int = 5  # abort after this many non-finite losses in a row
    shuffle_buffer: int = 64  # clips in each worker's local shuffle buffer
    num_workers: int = 1
    use_gpu: bool = False
    # ddp: every worker holds the whole model; fsdp: weights, gradients and optimizer state sharded
    # across the workers (torch's FSDP2), for models whose training state outgrows one GPU
    strategy: str = "ddp"
    # how Ray places the workers on the cluster's nodes (its placement strategies): pack fills a
    # node before using the next (all-reduce stays inside a node); spread puts them on different
    # nodes where it can; the strict forms fail rather than do otherwise
    placement: str = "pack"
    max_failures: int = 3  # worker-group restarts from the latest checkpoint before giving up
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "grad_accum", "lr", "grad_clip", "checkpoint_every", "keep_checkpoints", "num_workers", "max_bad_steps", "shuffle_buffer"):
            _check_positive(f"{self.SECTION}.{key}", getattr(self, key))
        _check_choice(f"{self.SECTION}.strategy", self.strategy, STRATEGIES)
        _check_choice(f"{self.SECTION}.placement", self.placement, PLACEMENTS)
        if self.strategy == "fsdp" and self.NO_FSDP:
            raise ParamsError(f"{self.SECTION}.strategy: fsdp is not supported here ({self.NO_FSDP}); use ddp")
        if not 0 <= self.ema_decay < 1:
            raise ParamsError(f"{self.SECTION}.ema_decay: {self.ema_decay} must be in [0, 1)")

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step over all workers: Table 4's "batch size per GPU x # GPUs"
        when batch_size x grad_accum is the per-GPU batch."""
        return self.batch_size * self.grad_accum * self.num_workers


@dataclass(frozen=True)
class TrainUnetParams(TrainingParams):
    SECTION: ClassVar[str] = "train_unet"
    steps: int = 1500  # smoke (fixed-lane demo set): the prompt's colour in 79 % of samples after 1000 steps, 92 % after 1500
    batch_size: int = 6  # video clips per worker and micro-step
    lr: float = 1e-3  # L/H: 5e-5 (the paper's); the smoke UNet is tiny and trains for minutes
    checkpoint_every: int = 500
    sample_every: int = 750
    text_dropout: float = 0.1  # the empty prompt instead of the caption (classifier-free guidance)
    # Joint image-video training (section 3.1): the paper gives image-text pairs 1/4 of the GPUs.
    # Every worker instead takes image_batch_size images (t = 1) beside its batch_size clips in
    # every micro-step and weighs their loss image_share against 1 - image_share: the averaged
    # gradient is the paper's for any num_workers, and every rank uses every parameter (FSDP).
    # Smoke's 6 + 2 is a quarter of each batch; L's 3 + 1 x 4 micro-steps is Table 4's 16 per GPU
    image_share: float = 0.25
    image_batch_size: int = 2  # images per worker and micro-step; preset: 2 (smoke), 1 (L, H)
    # uniform (the paper's), or cubic: most steps at high noise, where a video's colours and layout are
    # decided. Smoke, 1500 steps: the prompt's colour in 75 % of samples with cubic, 62 % with uniform,
    # but the ControlNet trained on the cubic UNet steered worse (14 px from its control against 10)
    timestep_sampling: str = "uniform"
    expert_exchange_rate: float = 0.001  # lambda of eq. 7-8, applied after every optimizer step
    # the ablations of Tables 2 and 5: which MEC paths are on ("" = plain 2-D convolutions) and
    # how many experts each MoE-STA layer has (1 = a plain FFN); the export records them, so
    # generate and evaluate load the architecture that was trained
    mec_paths: str = "2d+1d,ste,ce,me"
    spatial_experts: int = 4  # L, H: 32 (Table 4)
    temporal_experts: int = 2  # L, H: 4
    gradient_checkpointing: bool = False
    sample_count: int = 2
    sample_steps: int = 20  # DDIM steps for those samples
    held_out_share: float = 0.1  # share of videos (seeded by video id) never trained on: evaluate's heldout protocol; 0 = none

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("sample_count", "sample_steps"):
            _check_positive(f"train_unet.{key}", getattr(self, key))
        for key in ("text_dropout", "image_share", "expert_exchange_rate", "held_out_share"):
            if not 0 <= getattr(self, key) < 1:
                raise ParamsError(f"train_unet.{key}: {getattr(self, key)} must be in [0, 1)")
        if self.image_batch_size < 0 or (self.image_share > 0) != (self.image_batch_size > 0):
            raise ParamsError(f"train_unet.image_share {self.image_share} and image_batch_size {self.image_batch_size}: images are trained "
                              "with both above 0, or not at all with both 0")
        _check_choice("train_unet.timestep_sampling", self.timestep_sampling, TIMESTEP_SAMPLINGS)
        for key in ("spatial_experts", "temporal_experts"):
            _check_positive(f"train_unet.{key}", getattr(self, key))
        unknown = sorted(set(_names(self.mec_paths)) - set(MEC_PATHS))
        if unknown:
            raise ParamsError(f"train_unet.mec_paths: unknown path(s) {', '.join(unknown)}; list some of {','.join(MEC_PATHS)} ('' = no MEC)")

    @property
    def global_batch(self) -> int:
        """Videos and images per optimizer step over all workers (Table 4's batch size x # GPUs)."""
        return (self.batch_size + self.image_batch_size) * self.grad_accum * self.num_workers


@dataclass(frozen=True)
class TrainDecoderParams(TrainingParams):
    SECTION: ClassVar[str] = "train_decoder"
    NO_FSDP: ClassVar[str] = "the GAN loss calls the discriminator on detached weights and differentiates through the decoder's last layer; the decoder fits one GPU"
    steps: int = 100
    batch_size: int = 2
    lr: float = 1e-4
    sample_every: int = 0
    temporal_compensation: bool = True  # the TCMs (eq. 13)
    refinement: bool = True  # the refinement UNet (eq. 12, Figure 10)
    refine_channels: int = 16  # L/H: 64
    perceptual_weight: float = 1.0
    lpips_vgg_weights: str = ""  # torchvision's vgg16-397923af.pth; "" = random VGG16 without linear layers (smoke only)
    lpips_linear_weights: str = ""  # the lpips package's weights/v0.1/vgg.pth
    perceptual_frames: int = 2  # frames per clip given to LPIPS (a seeded draw); 0 = all
    disc_start: int = 40  # optimizer step at which the adversarial loss switches on
    disc_weight: float = 0.5
    disc_channels: int = 16  # L/H: 64
    disc_layers: int = 3
    consistency_weight: float = 1e-4  # lambda of eq. 9
    compare_image_decoder: bool = True  # also fine-tune the plain image decoder as long, for a fair Table 3
    compare_without_refinement: bool = True  # also fine-tune the TCM-VAE without R (the TCMs alone): what R adds
    # Table 3's other video decoders, fine-tuned beside the TCM-VAE with the same loss, data and steps:
    # conv3d (the image decoder's 3x3 convs inflated to 3x3x3), videoldm (temporal blocks after each
    # decoder block, Blattmann et al. 2023); "" = none. Off in smoke: two more fits (~6 of the demo's
    # minutes) that 100 steps of a tiny decoder cannot tell apart from the others
    video_baselines: str = ""
    held_out_share: float = 0.1  # share of videos (seeded by video id) kept out of training for the comparison
    eval_clips: int = 64  # at most this many held-out clips in the comparison

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("refine_channels", "disc_channels", "disc_layers", "eval_clips"):
            _check_positive(f"train_decoder.{key}", getattr(self, key))
        if not 0 < self.held_out_share < 1:
            raise ParamsError(f"train_decoder.held_out_share: {self.held_out_share} must be in (0, 1)")
        if self.perceptual_frames < 0 or self.disc_start < 0:
            raise ParamsError("train_decoder.perceptual_frames and disc_start must be >= 0")
        _check_names("train_decoder.video_baselines", self.video_baselines, VIDEO_BASELINES, "a decoder")

    @property
    def video_baseline_list(self) -> list[str]:
        return _names(self.video_baselines)

    @property
    def missing_weights(self) -> list[str]:
        """The LPIPS weight settings left empty: a random VGG16 stands in (smoke only)."""
        return [f"train_decoder.{key}" for key in ("lpips_vgg_weights", "lpips_linear_weights") if not getattr(self, key)]


CONTROL_CONDITIONS = ("canny", "hed", "depth", "image")  # model.controlnet.CONDITIONS, spelled here to keep torch out of params (a test pins them equal)
IMAGE_MODES = ("repeat", "first_frame")  # the image condition: the reference frame repeated, or on frame 0 only
VIDEO_BASELINES = ("conv3d", "videoldm")  # model.tcm_vae.VIDEO_LAYERS less "", spelled here to keep torch out of params (a test pins them equal)
MEC_PATHS = ("2d+1d", "ste", "ce", "me")  # model.mec.MECPaths.NAMES, spelled here to keep torch out of params (a test pins them equal)
TIMESTEP_SAMPLINGS = ("uniform", "cubic")  # model.diffusion.TIMESTEP_SAMPLINGS, spelled here to keep torch out of params (a test pins them equal)


@dataclass(frozen=True)
class TrainControlnetParams(TrainingParams):
    """The paper's stage 2 (section 2.4): the UNet frozen, the ControlNet, adapters and style adapter trained."""

    SECTION: ClassVar[str] = "train_controlnet"
    NO_FSDP: ClassVar[str] = "each rank draws its own condition per clip, so ranks train different adapters in a step; the frozen UNet needs no optimizer state"
    # smoke: on 16 held-out clips the shape landed 16 px from its control after 300 steps and 10 px
    # after 800 (uncontrolled: 21 px)
    steps: int = 800
    batch_size: int = 4
    lr: float = 1e-3  # L/H: 1e-5 (ControlNet's); 2e-4 learnt the canny control 2-3x slower in 400-step smoke runs
    sample_every: int = 0
    # comma-separated, one drawn per clip (uniformly). Smoke: canny alone, as its 300 steps are too
    # few to share (canny's edge agreement needed ~900 steps when split); L/H: canny,hed,depth,image
    conditions: str = "canny"
    condition_dropout: float = 0.1  # per clip: its condition map replaced by an empty one
    all_condition_dropout: float = 0.05  # per step: every clip's condition map empty and no style (text only)
    style_dropout: float = 0.5  # per step: no style tokens (style is optional at generation)
    text_dropout: float = 0.5  # the empty prompt (ControlNet drops 50 % so the conditions are learnt)
    # training timesteps: uniform (ControlNet's; L/H), or cubic, most at high noise (T2I-Adapter's): on
    # the fixed-lane demo set 400 cubic steps put the shape 7.8 px from its control, where 300 uniform
    # ones left it at 17.7 px (uncontrolled: 18.7 px)
    timestep_sampling: str = "cubic"
    canny_low: int = 100
    canny_high: int = 200
    image_mode: str = "repeat"  # the image condition: the first frame repeated, or on frame 0 only (first_frame)
    hed_weights: str = ""  # network-bsds500.pth or ControlNetHED.pth; "" = seeded random HED (smoke only)
    midas_weights: str = ""  # dpt_hybrid-midas-501f0c75.pt; "" = seeded random DPT-Hybrid (smoke only)
    depth_resolution: int = 384  # the depth annotator's input short side (ControlNet's), a multiple of 64
    style_model: str = "ViT-L-14"  # open_clip model whose frozen image tower embeds style images
    style_weights: str = ""  # local open_clip checkpoint; "" = tiny random CLIP (smoke only)
    sample_count: int = 2
    sample_steps: int = 20
    eval_clips: int = 16  # held-out clips whose canny control is checked after training (one clip = 6 % of the share)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in self.condition_list:
            _check_choice("train_controlnet.conditions", name, CONTROL_CONDITIONS)
        if not self.condition_list:
            raise ParamsError("train_controlnet.conditions: name at least one of " + ", ".join(CONTROL_CONDITIONS))
        for key in ("condition_dropout", "all_condition_dropout", "style_dropout", "text_dropout"):
            if not 0 <= getattr(self, key) < 1:
                raise ParamsError(f"train_controlnet.{key}: {getattr(self, key)} must be in [0, 1)")
        for key in ("sample_count", "sample_steps", "eval_clips"):
            _check_positive(f"train_controlnet.{key}", getattr(self, key))
        _check_choice("train_controlnet.image_mode", self.image_mode, IMAGE_MODES)
        _check_choice("train_controlnet.timestep_sampling", self.timestep_sampling, TIMESTEP_SAMPLINGS)
        if not 0 <= self.canny_low <= self.canny_high:
            raise ParamsError(f"train_controlnet.canny_low/canny_high: {self.canny_low}/{self.canny_high}; need 0 <= low <= high")
        if self.depth_resolution < 64 or self.depth_resolution % 64:
            raise ParamsError(f"train_controlnet.depth_resolution: {self.depth_resolution}; need a positive multiple of 64 (ControlNet's annotator: 384)")

    @property
    def condition_list(self) -> list[str]:
        return _names(self.conditions)

    @property
    def missing_weights(self) -> list[str]:
        """The weight settings left empty that this run needs: each gets a random stand-in (smoke only)."""
        needed = {"style_weights": True, "hed_weights": "hed" in self.condition_list, "midas_weights": "depth" in self.condition_list}
        return [f"train_controlnet.{key}" for key, used in needed.items() if used and not getattr(self, key)]


PROTOCOLS = ("heldout", "captions", "ucf101", "msrvtt", "stylegan-v", "ucf101-is10k", "msrvtt-paper")  # the last three: eval/protocols.py
UCF101_SUBSETS = ("test", "train", "train,test")
UCF101_PROMPTS = ("table", "template")


@dataclass(frozen=True)
class EvaluateParams:
    protocols: str = "heldout,captions"  # comma-separated: heldout (the data's held-out videos), captions (prompt following, demo world), ucf101, msrvtt; reference protocols stylegan-v, ucf101-is10k, msrvtt-paper
    caption_prompts: int = 24  # captions protocol: at most this many training captions and as many unseen combinations (seeded)
    num_videos: int = 16  # generated videos per protocol (heldout, ucf101); L/H: 2048 (StyleGAN-V's fvd2048)
    max_real: int = 2048  # real videos behind the FVD statistics (a seeded subset when there are more)
    steps: int = 20  # DDIM steps; L/H: 30 (Table 4)
    guidance_scale: float = 3.0  # classifier-free guidance; L/H: 7.5 (Table 4). The smoke UNet's colours overshoot at 7.5
    fvd_frames: int = 16  # frames the I3D sees (the first ones; fewer when clips are shorter)
    is_splits: int = 10
    i3d_weights: str = ""  # StyleGAN-V's i3d_torchscript.pt; "" = seeded random stand-in (smoke only)
    c3d_weights: str = ""  # StyleGAN-V's c3d_ucf101.pt; "" = seeded random stand-in (smoke only)
    clip_model: str = "ViT-B-32"  # CLIPSIM / frame consistency: open_clip name or config JSON path
    clip_weights: str = ""  # local open_clip checkpoint; "" = tiny random CLIP (smoke only)
    ucf101_lists: str = ""  # ucfTrainTestlist/ (classInd.txt, trainlist0N.txt, testlist0N.txt)
    ucf101_videos: str = ""  # UCF-101 video root: {Class}/v_{Class}_gNN_cNN.avi
    ucf101_split: int = 1
    ucf101_subset: str = "test"  # which lists of the split: test, train, or train,test
    ucf101_prompts: str = "table"  # table: eval/ucf101_prompts.py's sentences; template: ucf101_prompt_template over the class name
    ucf101_prompt_template: str = "a person {action}"  # {action}: 'applying eye makeup'; also {words}, {name}
    msrvtt_annotations: str = ""  # test_videodatainfo.json (all 2990 test videos) or MSRVTT_JSFUSION_test.csv (1k-A)
    msrvtt_videos: str = ""  # folder of {video_id}.mp4
    msrvtt_num_videos: int = 0  # 0 = one per video of the split (2990 test, or 1000 for 1k-A); else a seeded subset
    reference_sample_limit: int = 0  # 0: the reference protocols' own counts (2048, 10000, 2990); else a cap, recorded as a deviation
    decoder_table: str = "heldout"  # Table 3's generation columns: this protocol's latents also decoded by the other decoders (when it is evaluated); "" = off
    batch_size: int = 4  # videos per generation batch
    sample_count: int = 4  # generated videos per protocol saved as MP4/GIF to MLflow
    num_workers: int = 2  # Ray actors that generate and score (one per GPU when use_gpu)
    use_gpu: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        for name in self.protocol_list:
            _check_choice("evaluate.protocols", name, PROTOCOLS)
        if not self.protocol_list:
            raise ParamsError(f"evaluate.protocols: empty; choose from {', '.join(PROTOCOLS)}")
        if self.decoder_table:  # a protocol's name; the table is made when that protocol is among those evaluated
            _check_choice("evaluate.decoder_table", self.decoder_table, PROTOCOLS)
        for key in ("max_real", "steps", "fvd_frames", "is_splits", "batch_size", "num_workers", "caption_prompts"):
            _check_positive(f"evaluate.{key}", getattr(self, key))
        for key in ("num_videos", "msrvtt_num_videos", "sample_count", "reference_sample_limit"):
            if getattr(self, key) < 0:
                raise ParamsError(f"evaluate.{key}: {getattr(self, key)} must be >= 0")
        _check_choice("evaluate.ucf101_split", self.ucf101_split, (1, 2, 3))
        _check_choice("evaluate.ucf101_subset", self.ucf101_subset, UCF101_SUBSETS)
        _check_choice("evaluate.ucf101_prompts", self.ucf101_prompts, UCF101_PROMPTS)
        for name in self.protocol_list:
            needs = {"ucf101": ("ucf101_lists", "ucf101_videos"), "stylegan-v": ("ucf101_lists", "ucf101_videos"), "ucf101-is10k": ("ucf101_lists",),
                     "msrvtt": ("msrvtt_annotations", "msrvtt_videos"), "msrvtt-paper": ("msrvtt_annotations", "msrvtt_videos")}.get(name, ())
            missing = [f"evaluate.{key}" for key in needs if not getattr(self, key)]
            if missing:
                raise ParamsError(f"{' and '.join(missing)}: required for the {name} protocol (a local {'MSR-VTT' if 'msrvtt' in name else 'UCF-101'} copy; see the README's evaluation section)")

    @property
    def ucf101_subset_list(self) -> list[str]:
        return self.ucf101_subset.split(",")

    @property
    def protocol_list(self) -> list[str]:
        return _names(self.protocols)

    @property
    def missing_weights(self) -> list[str]:
        """The feature-network weight settings left empty: seeded random stand-ins (smoke only)."""
        return [f"evaluate.{key}" for key in ("i3d_weights", "c3d_weights", "clip_weights") if not getattr(self, key)]


# The UNet ablations of Tables 2 and 5 as train_unet overrides (the `ablation` stage trains each).
# Table 5 turns one MEC path off at a time (MoE-STA on); Table 2 compares MEC and MoE-STA alone
# and together against a baseline with neither (plain 2-D convolutions, one FFN per layer).
ABLATION_ROWS: dict[str, dict[str, Any]] = {
    "full": {},  # both tables' last row: all four MEC paths, MoE-STA
    "no_2d1d": {"mec_paths": "ste,ce,me"},  # no "+": row names are MLflow metric prefixes
    "no_ste": {"mec_paths": "2d+1d,ce,me"},
    "no_ce": {"mec_paths": "2d+1d,ste,me"},
    "no_me": {"mec_paths": "2d+1d,ste,ce"},
    "no_moe": {"spatial_experts": 1, "temporal_experts": 1},  # Table 2's "+ MEC"
    "no_mec": {"mec_paths": ""},  # Table 2's "+ MoE-STA"
    "baseline": {"mec_paths": "", "spatial_experts": 1, "temporal_experts": 1},  # Table 2's baseline
}


@dataclass(frozen=True)
class AblationParams:
    """The `ablation` stage (ablation/dvc.yaml, `versvideo ablation`): every row trains
    train_unet's recipe with the row's changes for `steps` steps per seed, then evaluate's
    protocols score it with the trained decoder."""

    rows: str = "full,no_2d1d,no_ste,no_ce,no_me,no_moe,no_mec,baseline"  # comma-separated names of ABLATION_ROWS
    steps: int = 300  # optimizer steps per row and seed (the same for every row); L/H: train_unet's 100000
    seeds: str = "0"  # comma-separated train_unet seeds per row: two or more give each figure's run-to-run spread

    def __post_init__(self) -> None:
        _check_names("ablation.rows", self.rows, tuple(ABLATION_ROWS), "a row")
        if not self.row_list:
            raise ParamsError(f"ablation.rows: empty; choose from {', '.join(ABLATION_ROWS)}")
        _check_positive("ablation.steps", self.steps)
        if not re.fullmatch(r"\s*\d+\s*(,\s*\d+\s*)*", self.seeds):
            raise ParamsError(f"ablation.seeds: {self.seeds!r} must be comma-separated non-negative integers, such as 0 or 0,1")
        if len(set(self.seed_list)) != len(self.seed_list):
            raise ParamsError(f"ablation.seeds: {self.seeds!r} names a seed twice")

    @property
    def row_list(self) -> list[str]:
        return _names(self.rows)

    @property
    def seed_list(self) -> list[int]:
        return [int(seed) for seed in self.seeds.split(",")]


@dataclass(frozen=True)
class Params:
    preset: str = "smoke"
    data: DataParams = field(default_factory=DataParams)
    prepare: PrepareParams = field(default_factory=PrepareParams)
    filter: FilterParams = field(default_factory=FilterParams)
    decode: DecodeParams = field(default_factory=DecodeParams)
    cache_latents: CacheLatentsParams = field(default_factory=CacheLatentsParams)
    train_unet: TrainUnetParams = field(default_factory=TrainUnetParams)
    train_decoder: TrainDecoderParams = field(default_factory=TrainDecoderParams)
    train_controlnet: TrainControlnetParams = field(default_factory=TrainControlnetParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    ablation: AblationParams = field(default_factory=AblationParams)

    def __post_init__(self) -> None:
        _check_choice("preset", self.preset, PRESETS)
        if self.train_unet.image_share > 0 and not self.data.images:
            raise ParamsError("train_unet.image_share: joint image-video training needs an image-text set; set data.images "
                              "(img2dataset WebDataset shards or a Parquet), or train_unet.image_share 0 and image_batch_size 0")


# TCM-VAE decoder fine-tuning at scale (the paper trains it on 100k videos; LDM's KL-f8 recipe for the GAN).
DECODER_AT_SCALE = {
    "steps": 50_000, "batch_size": 1, "lr": 5e-5, "warmup_steps": 500, "checkpoint_every": 1000, "sample_every": 5000,
    "refine_channels": 64, "perceptual_frames": 0, "disc_start": 10_000, "disc_channels": 64, "use_gpu": True, "num_workers": 8,
    "video_baselines": "conv3d,videoldm",
}

# ControlNet's recipe at scale (lr 1e-5, the UNet frozen); the paper trains stage 2 on WebVid-10M.
CONTROLNET_AT_SCALE = {
    "steps": 50_000, "batch_size": 1, "lr": 1e-5, "warmup_steps": 500, "checkpoint_every": 1000, "sample_every": 5000,
    "conditions": "canny,hed,depth,image", "eval_clips": 64, "use_gpu": True, "num_workers": 8, "timestep_sampling": "uniform",
}

# StyleGAN-V's fvd2048_16f protocol and the paper's sampler (Table 4: 30 DDIM steps, CFG 7.5).
EVALUATE_AT_SCALE = {"num_videos": 2048, "steps": 30, "guidance_scale": 7.5, "batch_size": 8, "use_gpu": True, "num_workers": 8}

# What each preset changes from the dataclass defaults (the defaults are the smoke preset).
# L and H follow the paper's Table 4: 16x256x256 and 24x320x576 (h x w) clips.
PRESET_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "smoke": {"decode": {"clips_per_shard": 64}},
    "L": {
        "filter": {"min_short_side": 256},
        "decode": {"frames": 16, "height": 256, "width": 256, "clips_per_shard": 64},
        # Table 4: 16 per GPU on 16 GPUs, a global batch of 256: 3 clips + 1 image a micro-step, 4 micro-steps
        "train_unet": {"steps": 100_000, "spatial_experts": 32, "temporal_experts": 4, "batch_size": 3, "image_batch_size": 1, "grad_accum": 4, "lr": 5e-5, "warmup_steps": 1000, "ema_decay": 0.9999, "checkpoint_every": 1000, "sample_every": 5000, "use_gpu": True, "num_workers": 16},
        "train_decoder": DECODER_AT_SCALE,
        "train_controlnet": CONTROLNET_AT_SCALE,
        "evaluate": EVALUATE_AT_SCALE,
        "ablation": {"steps": 100_000},
    },
    "H": {
        "filter": {"min_short_side": 320},
        "decode": {"frames": 24, "height": 320, "width": 576, "clips_per_shard": 16},
        # Table 4: 2 per GPU on 32 GPUs, a global batch of 64: 1 clip + 1 image a step (the images weigh 1/4)
        "train_unet": {"steps": 100_000, "spatial_experts": 32, "temporal_experts": 4, "batch_size": 1, "image_batch_size": 1, "grad_accum": 1, "lr": 5e-5, "warmup_steps": 1000, "ema_decay": 0.9999, "checkpoint_every": 1000, "sample_every": 5000, "use_gpu": True, "num_workers": 32, "gradient_checkpointing": True, "strategy": "fsdp"},
        "train_decoder": DECODER_AT_SCALE,
        "train_controlnet": CONTROLNET_AT_SCALE,
        "evaluate": EVALUATE_AT_SCALE,
        "ablation": {"steps": 100_000},
    },
}


def clip_shape(preset: str) -> tuple[int, int, int]:
    """(frames, height, width) of the preset's training clips: its decode defaults (Table 4 for L/H)."""
    decode = DecodeParams(**PRESET_DEFAULTS[preset].get("decode", {}))
    return decode.frames, decode.height, decode.width


def require_pretrained_weights(params: Params, section: str) -> None:
    """The weights policy (DESIGN.md): only the smoke preset may run a stage with random stand-ins
    for the pretrained networks its `section` names (`missing_weights`); L and H need every file."""
    missing = getattr(params, section).missing_weights
    if params.preset != "smoke" and missing:
        raise FileNotFoundError(f"{', '.join(missing)}: required for preset {params.preset} (a local weight file; only the smoke preset may use random stand-ins)")


def load_params(path: str | Path = "params.yaml", overrides: list[str] | tuple[str, ...] = ()) -> Params:
    """Read params.yaml, apply the preset and `key=value` overrides, and type-check everything."""
    path = Path(path)
    raw = read_yaml_mapping(path)
    for item in overrides:
        _apply_override(raw, item)
    try:
        preset = raw.get("preset", Params.preset)
        _check_choice("preset", preset, PRESETS)
        written_for = values_written_for(path)
        if written_for not in (None, preset):
            raise ParamsError(f"preset: {preset}, but the preset-decided values in the file are {written_for}'s (its '{VALUES_MARK}' line); "
                              f"run `versvideo init --preset {preset}` to write {preset}'s values, or delete that line to keep these")
        merged: dict[str, Any] = {section: dict(values) for section, values in PRESET_DEFAULTS[preset].items()}
        for key, value in raw.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **{name: v for name, v in value.items() if v is not None}}
            else:
                merged[key] = value
        return _build(Params, merged, prefix="")
    except ParamsError as error:
        raise ParamsError(f"{path}: {error}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key written twice in one mapping is an error: PyYAML silently keeps
    the last value, so a second `lr:` further down a section would override the first unnoticed."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ParamsError(f"line {line}: key {key!r} appears twice in one section (first on line {seen[key]}); keep one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """The params file as a mapping; every way it can be unreadable is a ParamsError naming the file (and line)."""
    if not path.exists():
        raise ParamsError(f"{path}: params file not found (run from the project root or pass --params FILE)")
    if not path.is_file():
        raise ParamsError(f"{path}: is not a file (pass --params with a YAML file)")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except (OSError, UnicodeDecodeError) as error:
        raise ParamsError(f"{path}: cannot be read ({error})") from None
    except ParamsError as error:
        raise ParamsError(f"{path}: {error}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}:" if mark else ""
        raise ParamsError(f"{path}:{where} not valid YAML ({getattr(error, 'problem', None) or error})") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    return raw


def preset_values(preset: str) -> dict[str, dict[str, Any]]:
    """Every key some preset decides, with `preset`'s value: section -> key -> value."""
    _check_choice("preset", preset, PRESETS)
    defaults = params_to_dict(Params())  # the dataclasses' defaults: the smoke preset's values
    decided = {(section, key) for values in PRESET_DEFAULTS.values() for section, keys in values.items() for key in keys}
    chosen: dict[str, dict[str, Any]] = {}
    for section, key in sorted(decided):
        chosen.setdefault(section, {})[key] = PRESET_DEFAULTS[preset].get(section, {}).get(key, defaults[section][key])
    return chosen


COMMENT_COLUMN = 34  # where params.yaml's comments on section keys start (0-based)
VALUES_MARK = "# preset values:"  # params.yaml's line saying which preset its preset-decided values are (written by write_preset)


def values_written_for(path: Path) -> str | None:
    """The preset whose values `write_preset` wrote into the file, or None (no such line)."""
    mark = re.search(rf"^{VALUES_MARK}\s*(\w+)", path.read_text(), flags=re.MULTILINE)
    return mark.group(1) if mark else None


def write_preset(path: Path, preset: str) -> list[str]:
    """Rewrite the params file for `preset`: `preset:` set, and every key a preset decides (or left
    `null`) set to that preset's concrete value, so DVC sees the values a run uses (`dvc params
    diff`, `dvc exp show`). Comments, order and every other value stay as they are; the keys whose
    value changed are returned as section.key."""
    read_yaml_mapping(path)  # a missing or broken file is refused before anything is rewritten
    values, defaults = preset_values(preset), params_to_dict(Params())

    def preset_value(section: str | None, key: str, current: str) -> Any:
        if section is None:
            return preset if key == "preset" else KEEP
        if section in defaults and key in defaults[section] and (key in values.get(section, {}) or current in ("null", "~", "")):
            return values.get(section, {}).get(key, defaults[section][key])
        return KEEP

    mark = f"{VALUES_MARK} {preset} (`versvideo init --preset NAME` rewrites them for another preset)"
    return _rewrite_values(path, preset_value, mark)


def set_values(path: Path, overrides: list[str]) -> list[str]:
    """Write `section.key=value` overrides into the params file in place (as `dvc exp run -S`
    does, so DVC records them), after checking the result loads; returns the keys changed."""
    typed = params_to_dict(load_params(path, overrides))  # every override valid (or a ParamsError naming it), as its key's type
    wanted: dict[tuple[str, str], Any] = {}
    for item in overrides:
        key = item.partition("=")[0]
        if "." not in key:
            raise ParamsError(f"-S {item!r}: set the preset with `versvideo init --preset NAME`, which also writes its values")
        section, _, leaf = key.partition(".")
        wanted[(section, leaf)] = typed[section][leaf]
    raw = read_yaml_mapping(path)
    missing = [f"{section}.{key}" for section, key in wanted if not (isinstance(raw.get(section), dict) and key in raw[section])]
    if missing:
        raise ParamsError(f"{path}: {', '.join(missing)} not written in the file; add the key to its section first")
    _rewrite_values(path, lambda section, key, current: wanted.get((section, key), KEEP))
    return sorted(f"{section}.{key}" for section, key in wanted)


KEEP = object()  # _rewrite_values: leave this line as it is


def _rewrite_values(path: Path, choose: Callable[[str | None, str, str], Any], mark: str | None = None) -> list[str]:
    """Rewrite `key: value` lines of the params file in place, keeping order and comments:
    choose(section or None at the top level, key, current value text) returns the new value or
    KEEP. `mark` replaces (or is put above) the VALUES_MARK line. Returns the keys whose text changed."""
    text = path.read_text()
    if mark and re.search(rf"^{VALUES_MARK}", text, flags=re.MULTILINE) is None:
        text = mark + "\n" + text
    lines, changed, section = [], [], None
    for line in text.splitlines():
        if mark and line.startswith(VALUES_MARK):
            lines.append(mark)
            continue
        entry = re.match(r"^(?P<indent> *)(?P<key>\w+):\s*(?P<value>[^#]*?)\s*(?P<comment>#.*)?$", line)
        if entry and not entry["indent"]:
            section = entry["key"]
        if not entry or entry["indent"] not in ("", "  "):
            lines.append(line)
            continue
        top = not entry["indent"]
        value = choose(None if top else section, entry["key"], entry["value"])
        if value is KEEP:
            lines.append(line)
            continue
        new = yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()
        if new != entry["value"]:
            changed.append(entry["key"] if top else f"{section}.{entry['key']}")
        rewritten = f"{entry['indent']}{entry['key']}: {new}"
        if entry["comment"]:  # comments in params.yaml's column, or one space after a longer value
            rewritten = rewritten.ljust(COMMENT_COLUMN - 1) + " " + entry["comment"]
        lines.append(rewritten)
    temporary = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    temporary.write_text("\n".join(lines) + "\n")
    os.replace(temporary, path)
    return changed


def params_to_dict(params: Params) -> dict[str, Any]:
    return dataclasses.asdict(params)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'decode': {'frames': 8}} -> {'decode.frames': 8} (for MLflow params and reports)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ParamsError(f"-S {item!r}: expected key=value, e.g. -S decode.frames=16")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        raise ParamsError(f"-S {item!r}: the value is not valid YAML; quote it, e.g. -S {key}='\"{text}\"'") from None
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ParamsError(f"-S {item!r}: {part!r} is not a section")
    node[leaf] = value


def _build(cls: type, values: Any, prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ParamsError(f"{prefix.rstrip('.') or 'params'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known keys: {', '.join(names)})"
            raise ParamsError(f"{prefix}{key}: unknown key{hint}")
    kwargs = {}
    for name in names:
        if values.get(name) is None:  # absent or null: the preset / default decides
            continue
        kind, value, key = hints[name], values[name], f"{prefix}{name}"
        if dataclasses.is_dataclass(kind):
            kwargs[name] = _build(kind, value, prefix=f"{key}.")
        else:
            kwargs[name] = _coerce(kind, value, key)
    return cls(**kwargs)


def _coerce(kind: Any, value: Any, key: str) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ParamsError(f"{key}: expected {kind.__name__}, got {value!r} ({type(value).__name__})")
    if kind in (int, float):
        if not math.isfinite(value):
            raise ParamsError(f"{key}: {value!r} must be a finite number")
        if value < 0 and key not in SIGNED_KEYS:
            raise ParamsError(f"{key}: {value!r} must be >= 0")
    return value


def _names(text: str) -> list[str]:
    """A comma-separated params value -> its names, blanks dropped ("a, b," -> ["a", "b"])."""
    return [name.strip() for name in text.split(",") if name.strip()]


def _check_names(key: str, text: str, choices: tuple[str, ...], noun: str) -> None:
    """Every name of a comma-separated value is one of `choices`, and none comes twice."""
    names = _names(text)
    for name in names:
        _check_choice(key, name, choices)
    if len(set(names)) != len(names):
        raise ParamsError(f"{key}: {text!r} names {noun} twice")


def _check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ParamsError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")


def _check_positive(key: str, value: float) -> None:
    if not value > 0:
        raise ParamsError(f"{key}: {value!r} must be > 0")


def _check_at_most(key: str, value: float, limit: float) -> None:
    if value > limit:
        raise ParamsError(f"{key}: {value!r} must be <= {limit:g}")
