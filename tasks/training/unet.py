"""What one step of the paper's stage 1 is (section 2, Table 4), for the training engine: the
v-prediction loss at a uniform timestep with text dropout, on the video clips and, beside them in
every micro-step, on the image-text pairs as one-frame clips (joint image-video training, section
3.1: with t = 1 the temporal layers are skipped, so images train the spatial layers only), the
experts pulled together after every optimizer step (eq. 7-8), samples decoded with the cache's
VAE, and the merged-expert export (section 2.2); and `train_unet`, one run of that recipe on a
latent cache (the train_unet stage's, and each row of the ablation stage's)."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from eval.caption_probe import SWAPS, swap_attribute
from eval.reconstruction import paired_difference
from model.diffusion import Schedule, ddim_sample, drop_text, draw_timesteps, v_errors, v_loss
from model.mec import MECPaths
from model.moe_attention import average_experts, merge_experts
from model.presets import DiffusionConfig, UNetConfig, get_preset
from model.unet import VersVideoUNet
from tasks.config.params import PREVIEW_FPS, CacheLatentsParams, Params, TrainUnetParams, flatten, params_to_dict
from tasks.config.paths import IMAGE_LATENTS, LATENTS, UNET
from tasks.operations.lineage import lineage_tags
from tasks.storage.atomic import save_safetensors, write_json
from tasks.storage.clip_shards import held_out_videos
from tasks.storage.latent_shards import latent_dataset, load_null_context, read_index, read_latent_shard, shard_locations
from tasks.storage.object_store import run_storage
from tasks.storage.previews import write_preview
from tasks.training.launch import fit
from tasks.training.tracking import history_summary, log_figures, resumable_run_name


@dataclass
class UNetRecipe:
    preset: str
    cfg: TrainUnetParams
    null_context: np.ndarray  # (77, width) float16: the empty prompt
    sample_captions: list[str]
    encoders: CacheLatentsParams  # to decode samples with the cache's VAE
    clip_shape: tuple[int, int, int]  # (frames, height, width) of the training clips: samples and the export's config

    fsdp_blocks = ("ResBlock", "SpatialTemporalTransformer")  # a MEC residual block; a spatial or temporal transformer with its MoE

    # the images' backward (t = 1, no temporal layers) runs under no_sync; the videos' synced one uses every parameter
    skips_parameters = False

    def streams(self) -> dict[str, tuple[int, float]]:
        """Images first, videos last (their backward syncs): each weighs its share of the loss."""
        if not self.cfg.image_share:
            return {"train": (self.cfg.batch_size, 1.0)}
        return {"images": (self.cfg.image_batch_size, self.cfg.image_share), "train": (self.cfg.batch_size, 1 - self.cfg.image_share)}

    def build(self) -> nn.Module:
        return VersVideoUNet(self.unet_config)

    @property
    def unet_config(self) -> UNetConfig:
        """The preset's UNet with the ablation params (MEC paths, expert counts) of this run."""
        return dataclasses.replace(
            get_preset(self.preset).unet, gradient_checkpointing=self.cfg.gradient_checkpointing, mec_paths=MECPaths.from_names(self.cfg.mec_paths),
            spatial_experts=self.cfg.spatial_experts, temporal_experts=self.cfg.temporal_experts,
        )

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], step: int, generator: torch.Generator) -> torch.Tensor:
        """The v-loss of a batch of clips, or of images: the cache's (b, t, c, h, w) with t = 1."""
        x0 = batch["latents"].float().permute(0, 2, 1, 3, 4)  # cache (b, t, c, h, w) -> (b, c, t, h, w)
        null = torch.from_numpy(self.null_context.astype(np.float32)).to(x0.device)
        context = drop_text(batch["context"].float(), null, self.cfg.text_dropout, generator)
        return v_loss(model, Schedule(get_preset(self.preset).diffusion), x0, context, generator, self.cfg.timestep_sampling)

    def parameter_groups(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        return {"unet": list(model.parameters())}

    def after_optimizer_step(self, model: nn.Module) -> None:
        average_experts(model, self.cfg.expert_exchange_rate)  # eq. 7-8

    def export(self, model: nn.Module, folder: Path) -> None:
        """Merged-expert inference weights (FFN_S = mean of the experts, section 2.2) + config."""
        merged = merge_experts(copy.deepcopy(model).cpu().eval())
        folder.mkdir(parents=True, exist_ok=True)
        save_safetensors({name: tensor.contiguous() for name, tensor in merged.state_dict().items()}, folder / "model.safetensors")
        frames, height, width = self.clip_shape
        write_json({"preset": self.preset, "unet": dataclasses.asdict(merged.config), "merged_experts": True,
                    "clip": {"frames": frames, "height": height, "width": width}, "global_batch": self.cfg.global_batch}, folder / "config.json")

    @torch.no_grad()
    def samples(self, model: nn.Module, step: int, folder: Path) -> list[Path]:
        """DDIM samples for the first captions, decoded with the cache's VAE: MP4 + GIF each."""
        # imported here, on the one rank that samples: the encoders' libraries (diffusers,
        # open_clip) took 8 s of every training worker's start on 2 cores
        from model.image_vae import decode_latents, pixels_to_frames
        from tasks.inference.encoders import encode_captions, load_text, load_vae

        preset = get_preset(self.preset)
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        text, tokenizer = load_text(self.encoders)
        captions = self.sample_captions[: self.cfg.sample_count]
        context = torch.from_numpy(encode_captions(text, tokenizer, captions).astype(np.float32)).to(device)
        null = torch.from_numpy(self.null_context.astype(np.float32)).to(device)
        frames, height, width = self.clip_shape[0], self.clip_shape[1] // 8, self.clip_shape[2] // 8
        channels = preset.unet.in_channels
        noise = torch.randn((len(captions), channels, frames, height, width), generator=torch.Generator().manual_seed(self.cfg.seed)).to(device)
        latents = ddim_sample(model, Schedule(preset.diffusion), noise, context, null, steps=self.cfg.sample_steps, guidance_scale=preset.diffusion.guidance_scale)
        model.train(was_training)
        vae = load_vae(self.encoders)
        paths = []
        for k, (clip, caption) in enumerate(zip(latents.float().cpu(), captions)):
            video = pixels_to_frames(decode_latents(vae, clip.permute(1, 0, 2, 3), micro_batch=16))  # (t, h, w, 3)
            stem = f"sample{k}_" + "_".join(caption.split()[:6])
            paths += write_preview(video, folder, stem, PREVIEW_FPS)
        return paths


def train_unet(params: Params, latents: Path = LATENTS, output_dir: Path = UNET, runs: str | Path | None = None, run_name: str | None = None,
               variant: str = "") -> dict[str, Any]:
    """Train on the cache in `latents`; exports to output_dir; returns the run's summary figures.
    The run is named for its params and inputs (and `variant`, such as an ablation row), so a
    rerun after a crash resumes it."""
    from tasks.inference.encoders import resolved_encoders  # see UNetRecipe.samples

    cfg = params.train_unet
    index = read_index(latents)
    held_out = held_out_videos(index, cfg.held_out_share, cfg.seed)
    training = index[~index["video_id"].astype(str).isin(held_out)]
    recipe = UNetRecipe(
        preset=params.preset,
        cfg=cfg,
        null_context=load_null_context(latents),
        sample_captions=sorted(training["caption"].astype(str).unique())[: max(1, cfg.sample_count)],
        encoders=resolved_encoders(latents, params.cache_latents),
        clip_shape=(params.decode.frames, params.decode.height, params.decode.width),
    )
    datasets = {"train": latent_dataset(latents, seed=cfg.seed, exclude_videos=held_out)}
    images = latents / IMAGE_LATENTS.name
    image_count = 0
    if cfg.image_share:
        image_count = len(read_index(images)) if (images / "index.parquet").exists() else 0
        if image_count < cfg.image_batch_size * cfg.num_workers:
            raise ValueError(f"{images}: {image_count} cached image(s), fewer than image_batch_size x num_workers = {cfg.image_batch_size * cfg.num_workers}: "
                             "point data.images at image-text shards and rerun filter, decode and cache_latents, or set train_unet.image_share 0 and image_batch_size 0")
        datasets["images"] = latent_dataset(images, seed=cfg.seed)
    flat = flatten({"preset": params.preset, "train_unet": params_to_dict(params)["train_unet"]})
    result = fit(
        recipe, cfg, datasets,
        run_name=run_name or resumable_run_name("train_unet", params.preset, params_to_dict(params)["train_unet"], latents / "index.parquet", latents / "encoders.json",
                                                *([images / "index.parquet"] if cfg.image_share else []), variant=variant),
        storage=runs or run_storage(), output_dir=output_dir, params=flat, tags=lineage_tags("train_unet"),
    )
    metrics = {**history_summary(result["mlflow_run_id"]), "steps": cfg.steps, "mlflow_run_id": result["mlflow_run_id"],
               "training_clips": len(training), "training_images": image_count, "held_out_videos": len(held_out)}
    if held_out and demo_world(index["caption"]):
        from tasks.inference.models import load_unet  # here, not at the top: Ray's training workers import this module

        unet, _ = load_unet(output_dir)
        reading = caption_reading(unet, get_preset(params.preset).diffusion, latents, index[index["video_id"].astype(str).isin(held_out)], recipe.encoders, cfg.seed)
        metrics["caption_reading"] = reading
        log_figures(result["mlflow_run_id"], {f"caption_reading/{word}/{key}": figures[key] for word, figures in reading.items()
                                              for key in ("loss_true", "loss_swapped", "relative", "gap_low", "gap_high")}, cfg.steps)
    write_json(metrics, output_dir / "metrics.json")
    return metrics


# Timesteps where a clip's layout and motion are decided (LDM schedule: alpha_bar below 0.05): a
# caption word the model reads changes its prediction most there.
LAYOUT_TIMESTEPS = (700, 1000)


def demo_world(captions: pd.Series) -> bool:
    try:
        for caption in captions.astype(str):
            swap_attribute(caption, "color")
    except ValueError:
        return False
    return True


@torch.no_grad()
def caption_reading(model: nn.Module, diffusion: DiffusionConfig, latents: Path, rows: pd.DataFrame, encoders: CacheLatentsParams, seed: int,
                    draws: int = 4, batch_size: int = 16) -> dict[str, dict[str, Any]]:
    """Which words of its caption the UNet reads, on the clips in `rows` (held out): the v-loss
    with one word swapped (SWAPS: another colour, shape, the opposite direction) minus the loss
    with the true caption, paired (the same clips, noise and timesteps) at LAYOUT_TIMESTEPS,
    with a 95 % interval over videos resampled. A model that ignores the word scores exactly 0;
    `reads` only where the whole interval is above 0. `relative` is the gap over the true loss."""
    from tasks.inference.encoders import encode_captions, load_text

    parts = [read_latent_shard(location, ("latents", "caption", "clip_id", "video_id")) for location in shard_locations(latents, sorted(rows["shard"].unique()))]
    wanted = set(rows["clip_id"].astype(str))
    keep = [np.isin(part["clip_id"].astype(str), list(wanted)) for part in parts]
    clips = torch.from_numpy(np.concatenate([part["latents"][k] for part, k in zip(parts, keep)]).astype(np.float32)).permute(0, 2, 1, 3, 4)
    captions = [str(c) for part, k in zip(parts, keep) for c in part["caption"][k]]
    videos = np.array([str(v) for part, k in zip(parts, keep) for v in part["video_id"][k]])
    text, tokenizer = load_text(encoders)
    schedule = Schedule(diffusion)
    device = next(model.parameters()).device
    model.eval()

    # one set of seeded draws per clip, shared by every wording of its caption: the pairing
    low, high = LAYOUT_TIMESTEPS
    generators = [torch.Generator().manual_seed(seed * 1000 + draw) for draw in range(draws)]
    noise_and_timesteps = [(torch.randn(clips.shape, generator=g), low + draw_timesteps(len(clips), high - low, "uniform", g)) for g in generators]

    def losses(indices: list[int], wording: list[str]) -> np.ndarray:
        """(len(indices),) loss per clip under `wording`, averaged over the draws."""
        context = torch.from_numpy(encode_captions(text, tokenizer, wording).astype(np.float32)).to(device)
        total = np.zeros(len(indices))
        for noise, timesteps in noise_and_timesteps:
            for start in range(0, len(indices), batch_size):
                part, rows = slice(start, start + batch_size), indices[start:start + batch_size]
                total[part] += v_errors(model, schedule, clips[rows].to(device), context[part], noise[rows].to(device), timesteps[rows].to(device)).cpu().numpy()
        return total / draws

    every_clip = list(range(len(captions)))
    true_all = losses(every_clip, captions)  # once: each word's comparison takes its clips' share
    report = {}
    for attribute in SWAPS:
        swapped = [swap_attribute(caption, attribute) for caption in captions]
        indices = [k for k, caption in enumerate(swapped) if caption is not None]
        if len(indices) < 2:
            continue
        true = true_all[indices]
        other = losses(indices, [swapped[k] for k in indices])
        gap = paired_difference(other, true, videos[indices], seed=seed)
        report[attribute] = {"loss_true": float(true.mean()), "loss_swapped": float(other.mean()), "gap": gap["mean"], "gap_low": gap["low"],
                             "gap_high": gap["high"], "relative": gap["mean"] / float(true.mean()), "reads": gap["verdict"] == "better",
                             "clips": len(indices)}
    return report


def swap_gap_name(word: str) -> str:
    """The figure under which a word's relative gap is reported (metrics/train_unet.json, ablation rows)."""
    return f"{word}_swap_loss_gap"


def swap_gap_figures(reading: dict[str, dict[str, Any]]) -> dict[str, float]:
    """caption_reading's relative gaps as flat figures (0: the word is ignored)."""
    return {swap_gap_name(word): figures["relative"] for word, figures in reading.items()}
