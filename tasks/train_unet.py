"""Stage `train_unet`: the paper's stage 1, text-to-video training of the denoising UNet on the
latent cache, on the training engine (tasks/engine.py).

Per step (section 2, Table 4): v-prediction loss (model/diffusion.py) at a uniform timestep; the
caption's context replaced by the empty prompt's with p = text_dropout (classifier-free
guidance); on a seeded `image_share` of the steps, one frame per clip (joint image-video
training); after every optimizer step the experts of each MoE layer are pulled towards each
other's mean (eq. 7-8). The output, models/unet/, holds merged-expert inference weights
(section 2.2) + config.json + metrics.json.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from model.diffusion import Schedule, ddim_sample, drop_text, v_loss
from model.moe_attention import average_experts, merge_experts
from model.presets import get_preset
from model.unet import VersVideoUNet
from model.weights import file_digest
from tasks.atomic import save_safetensors, write_json
from tasks.clip_shards import split_clips
from tasks.engine import fit, history_summary
from tasks.lineage import lineage_tags
from tasks.latent_shards import latent_dataset, load_null_context, read_index
from tasks.params import CacheLatentsParams, Params, TrainUnetParams, flatten, params_to_dict
from tasks.previews import write_preview

LATENTS = Path("data/latents")
OUT_DIR = Path("models/unet")
RUNS = Path("models/runs")
SAMPLE_FPS = 8


@dataclass
class UNetRecipe:
    preset: str
    cfg: TrainUnetParams
    null_context: np.ndarray  # (77, width) float16: the empty prompt
    sample_captions: list[str]
    encoders: CacheLatentsParams  # to decode samples with the cache's VAE

    fsdp_blocks = ("ResBlock", "SpatialTemporalTransformer")  # a MEC residual block; a spatial or temporal transformer with its MoE

    @property
    def skips_parameters(self) -> bool:
        return self.cfg.image_share > 0  # image steps (t = 1) leave the temporal layers out

    def build(self) -> nn.Module:
        unet = dataclasses.replace(get_preset(self.preset).unet, gradient_checkpointing=self.cfg.gradient_checkpointing)
        return VersVideoUNet(unet)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], step: int, generator: torch.Generator) -> torch.Tensor:
        x0 = batch["latents"].float().permute(0, 2, 1, 3, 4)  # cache (b, t, c, h, w) -> (b, c, t, h, w)
        if self.image_step(step):  # one random frame per clip: an image batch (t = 1)
            frame = torch.randint(0, x0.shape[2], (x0.shape[0],), generator=generator, device=x0.device)
            x0 = x0[torch.arange(x0.shape[0], device=x0.device), :, frame][:, :, None]
        null = torch.from_numpy(self.null_context.astype(np.float32)).to(x0.device)
        context = drop_text(batch["context"].float(), null, self.cfg.text_dropout, generator)
        return v_loss(model, Schedule(get_preset(self.preset).diffusion), x0, context, generator)

    def image_step(self, step: int) -> bool:
        """Seeded by (seed, step) alone, so every worker trains the same kind of step (FSDP needs
        every rank to use the same parameters: an image step leaves the temporal layers out)."""
        return random.Random(f"{self.cfg.seed}/image/{step}").random() < self.cfg.image_share

    def parameter_groups(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        return {"unet": list(model.parameters())}

    def after_optimizer_step(self, model: nn.Module) -> None:
        average_experts(model, self.cfg.expert_exchange_rate)  # eq. 7-8

    def export(self, model: nn.Module, folder: Path) -> None:
        """Merged-expert inference weights (FFN_S = mean of the experts, section 2.2) + config."""
        merged = merge_experts(copy.deepcopy(model).cpu().eval())
        folder.mkdir(parents=True, exist_ok=True)
        save_safetensors({name: tensor.contiguous() for name, tensor in merged.state_dict().items()}, folder / "model.safetensors")
        write_json({"preset": self.preset, "unet": dataclasses.asdict(merged.config), "merged_experts": True}, folder / "config.json")

    @torch.no_grad()
    def samples(self, model: nn.Module, step: int, folder: Path) -> list[Path]:
        """DDIM samples for the first captions, decoded with the cache's VAE: MP4 + GIF each."""
        # imported here, on the one rank that samples: the encoders' libraries (diffusers,
        # open_clip) took 8 s of every training worker's start on 2 cores
        from model.image_vae import decode_latents, pixels_to_frames
        from tasks.cache_latents import encode_captions, load_text, load_vae

        preset = get_preset(self.preset)
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        text, tokenizer = load_text(self.encoders)
        captions = self.sample_captions[: self.cfg.sample_count]
        context = torch.from_numpy(encode_captions(text, tokenizer, captions).astype(np.float32)).to(device)
        null = torch.from_numpy(self.null_context.astype(np.float32)).to(device)
        channels, frames, height, width = 4, preset.frames, preset.height // 8, preset.width // 8
        noise = torch.randn((len(captions), channels, frames, height, width), generator=torch.Generator().manual_seed(self.cfg.seed)).to(device)
        latents = ddim_sample(model, Schedule(preset.diffusion), noise, context, null, steps=self.cfg.sample_steps, guidance_scale=preset.diffusion.guidance_scale)
        model.train(was_training)
        vae = load_vae(self.encoders)
        paths = []
        for k, (clip, caption) in enumerate(zip(latents.float().cpu(), captions)):
            video = pixels_to_frames(decode_latents(vae, clip.permute(1, 0, 2, 3), micro_batch=16))  # (t, h, w, 3)
            stem = f"sample{k}_" + "_".join(caption.split()[:6])
            paths += write_preview(video, folder, stem, SAMPLE_FPS)
        return paths


def held_out_videos(index, cfg: TrainUnetParams) -> frozenset[str]:
    """Video ids the UNet never trains on (evaluate's heldout protocol draws the same ones)."""
    if cfg.held_out_share == 0:
        return frozenset()
    return frozenset(split_clips(index, cfg.held_out_share, cfg.seed)[1]["video_id"].astype(str))


def default_run_name(params: Params, latents: Path) -> str:
    """train_unet-{preset}-{digest of the params and the cache}: rerunning after a crash resumes
    the same run; changed params or data start a new one (never resume someone else's weights)."""
    digest = hashlib.sha256(json.dumps(params_to_dict(params)["train_unet"], sort_keys=True).encode())
    digest.update(file_digest(latents / "index.parquet", latents / "encoders.json").encode())
    return f"train_unet-{params.preset}-{digest.hexdigest()[:10]}"


def train_unet(params: Params, latents: Path = LATENTS, output_dir: Path = OUT_DIR, runs: Path = RUNS, run_name: str | None = None) -> dict[str, Any]:
    """Train on the cache in `latents`; exports to output_dir; returns the run's summary figures."""
    from tasks.cache_latents import resolved_encoders  # see UNetRecipe.samples

    cfg = params.train_unet
    index = read_index(latents)
    held_out = held_out_videos(index, cfg)
    training = index[~index["video_id"].astype(str).isin(held_out)]
    recipe = UNetRecipe(
        preset=params.preset,
        cfg=cfg,
        null_context=load_null_context(latents),
        sample_captions=sorted(training["caption"].astype(str).unique())[: max(1, cfg.sample_count)],
        encoders=resolved_encoders(latents, params.cache_latents),
    )
    flat = flatten({"preset": params.preset, "train_unet": params_to_dict(params)["train_unet"]})
    result = fit(
        recipe, cfg, latent_dataset(latents, seed=cfg.seed, exclude_videos=held_out),
        run_name=run_name or default_run_name(params, latents),
        storage=runs, output_dir=output_dir, params=flat, tags=lineage_tags("train_unet"),
    )
    metrics = {**history_summary(result["mlflow_run_id"]), "steps": cfg.steps, "mlflow_run_id": result["mlflow_run_id"],
               "training_clips": len(training), "held_out_videos": len(held_out)}
    write_json(metrics, output_dir / "metrics.json")
    return metrics


def main(params: Params) -> None:
    metrics = train_unet(params)
    write_json(metrics, Path("metrics/train_unet.json"))
    print(f"train_unet: {metrics['steps']} steps; loss {metrics.get('loss_first_10pct', float('nan')):.4f} (first 10%) -> "
          f"{metrics.get('loss_last_10pct', float('nan')):.4f} (last 10%); data wait {metrics.get('mean_data_wait_share', 0):.1%} of step time; "
          f"MLflow run {metrics['mlflow_run_id']}; weights in {OUT_DIR}/")
