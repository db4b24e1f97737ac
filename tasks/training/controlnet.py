"""What one step of the paper's stage 2 is (section 2.4, Figure 4), for the training engine: the
UNet frozen, the shared video ControlNet, its per-condition adapters (eq. 10) and the style
adapter trained with the UNet's v-loss; a condition drawn per clip and computed from the clip's
own frames; per-clip, all-condition, style and text dropout; the export of what was trained."""

from __future__ import annotations

import contextlib
import dataclasses
import random
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from model.controlnet import CONDITIONS, ControlledUNet, StyleAdapter, VideoControlNet
from model.diffusion import Schedule, drop_text, v_loss
from model.presets import get_preset
from model.weights import file_digest
from tasks.config.params import PREVIEW_FPS, TrainControlnetParams
from tasks.inference.conditions import ConditionExtractor, load_style_encoder, style_embedding_dim, style_embeddings
from tasks.inference.generation import VideoGenerator
from tasks.inference.models import load_unet
from tasks.storage.atomic import save_safetensors, write_json
from tasks.storage.previews import write_preview


class ControlTraining(nn.Module):
    """What the engine trains: the controlled UNet, plus the frozen CLIP image tower for style."""

    def __init__(self, controlled: ControlledUNet, style_encoder: nn.Module) -> None:
        super().__init__()
        self.controlled, self.style_encoder = controlled, style_encoder.requires_grad_(False).eval()

    def forward(self, x, timesteps, context, condition, kind, style_frames):
        embedding = None if style_frames is None else style_embeddings(self.style_encoder, style_frames)
        return self.controlled(x, timesteps, context, condition, kind, embedding)


@dataclass
class ControlNetRecipe:
    preset: str
    cfg: TrainControlnetParams
    unet_dir: str  # absolute: the frozen UNet every worker loads
    null_context: np.ndarray  # (77, width) float16: the empty prompt
    allow_random: bool  # smoke: stand-in HED / CLIP when no weights are set
    sample_clips: np.ndarray  # (k, t, H, W, 3) held-out clips whose canny maps steer the samples
    sample_captions: list[str]
    generator_paths: dict[str, Any]  # decoder dir, latents dir, encoders: for samples
    skips_parameters: bool = True  # adapters of conditions not drawn in a step, the style adapter on style-free steps
    fsdp_blocks: tuple[str, ...] = ()  # never sharded: TrainControlnetParams refuses fsdp

    def streams(self) -> dict[str, tuple[int, float]]:
        return {"train": (self.cfg.batch_size, 1.0)}

    def build(self) -> nn.Module:
        unet, _ = load_unet(self.unet_dir)
        encoder = load_style_encoder(self.cfg.style_model, self.cfg.style_weights, self.cfg.seed, self.allow_random)
        config = get_preset(self.preset).controlnet
        style = StyleAdapter(style_embedding_dim(encoder), unet.config.context_dim, config.style_tokens)
        return ControlTraining(ControlledUNet(unet, VideoControlNet(unet, config), style), encoder)

    def extractor(self, device: torch.device) -> ConditionExtractor:
        if getattr(self, "_extractor", None) is None:  # built on the worker, once
            self._extractor = ConditionExtractor.from_config(extractor_config(self.cfg), self.cfg.seed, self.allow_random, str(device))
        return self._extractor

    def step_draw(self, name: str, step: int) -> float:
        """A number in [0, 1) seeded by (seed, name, step): every worker makes the same per-step choice."""
        return random.Random(f"{self.cfg.seed}/{name}/{step}").random()

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], step: int, generator: torch.Generator) -> torch.Tensor:
        cfg = self.cfg
        x0 = batch["latents"].float().permute(0, 2, 1, 3, 4)  # cache (b, t, c, h, w) -> (b, c, t, h, w)
        frames = batch["frames"]  # (b, t, H, W, 3) uint8
        batch_size, device = x0.shape[0], x0.device
        names = cfg.condition_list
        drawn = torch.randint(0, len(names), (batch_size,), generator=generator, device=device).tolist()
        maps = np.stack([self.extractor(device)(names[k], clip) for k, clip in zip(drawn, frames.cpu().numpy())])
        condition = torch.from_numpy(maps).to(device).permute(0, 4, 1, 2, 3).float() / 255.0  # (b, 3, t, H, W)
        kind = torch.tensor([CONDITIONS.index(names[k]) for k in drawn], device=device)
        keep = (torch.rand(batch_size, generator=generator, device=device) >= cfg.condition_dropout).float()
        nothing = self.step_draw("all_conditions", step) < cfg.all_condition_dropout
        condition = condition * (0.0 if nothing else keep[:, None, None, None, None])
        style_frames = None
        if not nothing and self.step_draw("style", step) >= cfg.style_dropout:
            pick = torch.randint(0, frames.shape[1], (batch_size,), generator=generator, device=device)
            style_frames = frames[torch.arange(batch_size, device=device), pick]  # (b, H, W, 3): a frame of the clip itself
        null = torch.from_numpy(self.null_context.astype(np.float32)).to(device)
        context = drop_text(batch["context"].float(), null, cfg.text_dropout, generator)

        def controlled(z, timesteps, text):
            return model(z, timesteps, text, condition, kind, style_frames)

        return v_loss(controlled, Schedule(get_preset(self.preset).diffusion), x0, context, generator, cfg.timestep_sampling)

    def parameter_groups(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        return {"controlnet": list(model.controlled.controlnet.parameters()), "style": list(model.controlled.style.parameters())}

    def after_optimizer_step(self, model: nn.Module) -> None:
        pass

    def export(self, model: nn.Module, folder: Path) -> None:
        save_controlnet(model, folder, self)

    @torch.no_grad()
    def samples(self, model: nn.Module, step: int, folder: Path) -> list[Path]:
        """Held-out clips' canny maps -> controlled videos, side by side: control | generated."""
        with _exported(model, self) as exported:
            generator = VideoGenerator(self.unet_dir, self.generator_paths["decoder"], self.generator_paths["latents"],
                                       self.generator_paths["encoders"], device=str(next(model.parameters()).device), controlnet_dir=exported)
            videos, controls = generate_controlled(generator, self, self.sample_clips[: self.cfg.sample_count], self.sample_captions)
        paths = []
        for k, (video, control) in enumerate(zip(videos, controls)):
            paths += write_preview(np.concatenate([control, video], axis=2), folder, f"canny_control_vs_generated_{k}", PREVIEW_FPS)
        return paths


@contextlib.contextmanager
def _exported(model: nn.Module, recipe: ControlNetRecipe) -> Iterator[str]:
    """A temporary models/controlnet-like folder of the model being trained (samples load it as generate does)."""
    with tempfile.TemporaryDirectory() as folder:
        save_controlnet(model, Path(folder), recipe)
        yield folder


def save_controlnet(model: ControlTraining, folder: Path, recipe: ControlNetRecipe) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    controlled = model.controlled
    state = {f"controlnet.{k}": v for k, v in controlled.controlnet.state_dict().items()}
    state.update({f"style.{k}": v for k, v in controlled.style.state_dict().items()})
    save_safetensors({name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}, folder / "model.safetensors")
    cfg = recipe.cfg
    write_json({
        "preset": recipe.preset,
        "seed": cfg.seed,  # seeds the smoke preset's random HED and CLIP stand-ins: generate rebuilds the same ones
        "controlnet": dataclasses.asdict(controlled.controlnet.config),
        "conditions": CONDITIONS,
        "trained_conditions": cfg.condition_list,
        "unet_sha256": file_digest(Path(recipe.unet_dir) / "model.safetensors"),
        "style": {"model": cfg.style_model if cfg.style_weights else "tiny-random", "weights": str(Path(cfg.style_weights).resolve()) if cfg.style_weights else "",
                  "weights_sha256": file_digest(cfg.style_weights) if cfg.style_weights else "", "embed_dim": controlled.style.proj.in_features},
        "extractors": extractor_config(cfg),
    }, folder / "config.json")


def extractor_config(cfg: TrainControlnetParams) -> dict[str, Any]:
    """How the condition maps are made (config.json's "extractors"): generate makes them the same way."""
    def resolved(path: str) -> str:
        return str(Path(path).resolve()) if path else ""

    return {"canny_low": cfg.canny_low, "canny_high": cfg.canny_high, "image_mode": cfg.image_mode, "depth_resolution": cfg.depth_resolution,
            "hed_weights": resolved(cfg.hed_weights), "midas_weights": resolved(cfg.midas_weights)}


def generate_controlled(generator: VideoGenerator, recipe: ControlNetRecipe, clips: np.ndarray, captions: list[str],
                        control_source: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Canny-controlled videos of `captions` (one per clip), steered by the canny maps of
    `control_source` (default: the clips themselves); returns (videos, control maps), uint8."""
    source = clips if control_source is None else control_source
    extractor = ConditionExtractor.from_config(extractor_config(recipe.cfg))
    controls = np.stack([extractor("canny", clip) for clip in source])
    _, frames, height, width, _ = clips.shape
    videos = generator(captions[: len(clips)], list(range(len(clips))), frames=frames, height=height, width=width,
                       steps=recipe.cfg.sample_steps, guidance_scale=get_preset(recipe.preset).diffusion.guidance_scale,
                       control=controls, control_type="canny")
    return videos, controls
