"""Stage `train_controlnet`: the paper's stage 2 (section 2.4, Figure 4). The trained UNet is frozen;
the shared ControlNet (a copy of the UNet's encoder and middle), the per-condition adapters (eq. 10)
and the style adapter train on the engine (tasks/engine.py) with the UNet's v-loss.

Per clip: a condition type drawn uniformly from `conditions`, its maps computed from the clip's own
frames on the fly (canny with OpenCV, HED with its network, the image condition from the first
frame; tasks/conditions.py), so no condition cache goes stale when thresholds change. Dropout:
per clip an empty condition map (`condition_dropout`), per step no visual condition and no style
(`all_condition_dropout`), per step no style (`style_dropout`), per clip the empty prompt
(`text_dropout`). The style image is one frame of the clip itself (IP-Adapter's recipe).

Training reads the latent cache (latents + text context) and, row for row, the decode stage's clip
shards (the pixels the conditions come from): latent shard k holds clip shard k's clips in order.
Videos train_unet held out stay out, so evaluate's heldout protocol is still unseen.

Output models/controlnet/: ControlNet + style adapter weights (model.safetensors), config.json
(the UNet weights' sha256 it was trained on), metrics.json with the control check: on held-out
clips, canny-controlled videos' edges against their control's edges and against another clip's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import random
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray
import torch
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from torch import nn

from eval.control import edge_correlation
from model.controlnet import CONDITIONS, ControlledUNet, StyleAdapter, VideoControlNet
from model.diffusion import Schedule, drop_text, v_loss
from model.presets import get_preset
from model.weights import file_digest
from tasks.atomic import save_safetensors, write_json
from tasks.cache_latents import resolved_encoders
from tasks.clip_shards import read_clips
from tasks.conditions import ConditionExtractor, canny, load_style_encoder, style_embedding_dim, style_embeddings
from tasks.decode import shard_name as clip_shard_name
from tasks.engine import fit, history_summary
from tasks.generation import VideoGenerator, load_unet
from tasks.latent_shards import load_null_context, read_index, read_latent_shard, shard_name
from tasks.lineage import lineage_tags, tracking_uri
from tasks.params import Params, TrainControlnetParams, flatten, params_to_dict
from tasks.previews import write_preview
from tasks.ray_runtime import ensure_ray
from tasks.train_unet import held_out_videos

CLIPS = Path("data/clips")
LATENTS = Path("data/latents")
UNET = Path("models/unet")
DECODER = Path("models/decoder")
OUT_DIR = Path("models/controlnet")
RUNS = Path("models/runs")
METRICS = Path("metrics/controlnet.json")
SAMPLE_FPS = 8


def _read_shard_pair(batch: dict[str, np.ndarray], exclude_videos: frozenset[str]) -> dict[str, np.ndarray]:
    latents = read_latent_shard(batch["latents_path"][0], ("latents", "context", "video_id", "clip_id"))
    frames = np.asarray(np.load(batch["clips_path"][0], mmap_mode="r")[np.asarray(batch["rows"][0], dtype=np.int64)])
    if len(frames) != len(latents["latents"]):
        raise ValueError(f"{batch['latents_path'][0]} has {len(latents['latents'])} clips but {batch['clips_path'][0]} rows give {len(frames)}: rerun cache_latents")
    keep = ~np.isin(latents["video_id"], list(exclude_videos))
    return {"latents": latents["latents"][keep], "context": latents["context"][keep], "frames": frames[keep]}


def control_dataset(latents_dir: Path, clips_dir: Path, seed: int, exclude_videos: frozenset[str]) -> ray.data.Dataset:
    """Rows of `latents` (t, 4, h, w), `context` (77, d) and `frames` (t, H, W, 3) uint8 of the same
    clip: one read task per shard pair, shards in a seeded order."""
    ensure_ray()  # before the dataset exists (see ensure_ray)
    index = read_index(latents_dir)
    items = []
    for shard, rows in index.groupby("shard", sort=True):
        items.append({
            "latents_path": str((latents_dir / shard_name(int(shard))).resolve()),
            "clips_path": str((clips_dir / clip_shard_name(int(shard))).resolve()),
            "rows": rows.sort_values("shard_row")["shard_row"].astype(int).tolist(),  # the latent shard's row order
        })
    items = [items[k] for k in np.random.default_rng(seed).permutation(len(items))]
    return ray.data.from_items(items).map_batches(_read_shard_pair, batch_size=1, batch_format="numpy", fn_kwargs={"exclude_videos": frozenset(exclude_videos)})


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

        return v_loss(controlled, Schedule(get_preset(self.preset).diffusion), x0, context, generator)

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
            paths += write_preview(np.concatenate([control, video], axis=2), folder, f"canny_control_vs_generated_{k}", SAMPLE_FPS)
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


def other_video_rows(rows: pd.DataFrame, index: pd.DataFrame) -> pd.DataFrame:
    """For each row, a clip of another video (the k-th such clip, cyclically; the held-out ones in
    `rows` first): the mismatched control of the check."""
    pool = pd.concat([rows, index[~index["clip_id"].isin(rows["clip_id"])].sort_values("clip_id")])
    picks = []
    for k, video in enumerate(rows["video_id"]):
        candidates = pool[pool["video_id"] != video]
        if candidates.empty:
            raise ValueError("the control check needs clips of at least two videos; cache more videos")
        picks.append(candidates.iloc[k % len(candidates)])
    return pd.DataFrame(picks).reset_index(drop=True)


def control_check(generator: VideoGenerator, recipe: ControlNetRecipe, clips: np.ndarray, captions: list[str], other_clips: np.ndarray) -> dict[str, Any]:
    """Edges of canny-controlled videos against their control's edges (matched) and against a
    clip of another video (mismatched: the same generated video, that video's edges); and of
    uncontrolled videos (same prompts and seeds) against the control's edges."""
    videos, controls = generate_controlled(generator, recipe, clips, captions)
    low, high = recipe.cfg.canny_low, recipe.cfg.canny_high
    generated_edges = [canny(video, low, high) for video in videos]
    matched = [edge_correlation(edges, control[..., 0]) for edges, control in zip(generated_edges, controls)]
    others = [canny(clip, low, high) for clip in other_clips]
    mismatched = [edge_correlation(edges, other) for edges, other in zip(generated_edges, others)]
    uncontrolled = generator(captions[: len(clips)], list(range(len(clips))), frames=clips.shape[1], height=clips.shape[2], width=clips.shape[3],
                             steps=recipe.cfg.sample_steps, guidance_scale=get_preset(recipe.preset).diffusion.guidance_scale)
    baseline = [edge_correlation(canny(video, low, high), control[..., 0]) for video, control in zip(uncontrolled, controls)]
    return {
        "clips": len(clips),
        "canny_edge_correlation_matched": float(np.mean(matched)),
        "canny_edge_correlation_mismatched": float(np.mean(mismatched)),
        "canny_edge_correlation_uncontrolled": float(np.mean(baseline)),
        "matched_beats_mismatched_share": float(np.mean(np.array(matched) > np.array(mismatched))),
    }


def default_run_name(params: Params, latents: Path, unet: Path) -> str:
    digest = hashlib.sha256(json.dumps(params_to_dict(params)["train_controlnet"], sort_keys=True).encode())
    digest.update(file_digest(latents / "index.parquet", latents / "encoders.json", unet / "model.safetensors").encode())
    return f"train_controlnet-{params.preset}-{digest.hexdigest()[:10]}"


def check_weights_given(params: Params) -> None:
    cfg = params.train_controlnet
    if params.preset != "smoke" and cfg.random_init:
        raise FileNotFoundError(f"{', '.join(cfg.missing_weights)}: required for preset {params.preset} (a local weight file; only the smoke preset may use random stand-ins)")


def train_controlnet(params: Params, clips: Path = CLIPS, latents: Path = LATENTS, unet: Path = UNET, decoder: Path = DECODER,
                     output_dir: Path = OUT_DIR, runs: Path = RUNS) -> dict[str, Any]:
    """Train on the cache + clips with the UNet in `unet` frozen; exports to output_dir; returns the figures."""
    check_weights_given(params)
    cfg = params.train_controlnet
    index = read_index(latents)
    held_out = held_out_videos(index, params.train_unet)
    held_rows = index[index["video_id"].astype(str).isin(held_out)].sort_values("clip_id")
    if held_rows.empty:  # train_unet.held_out_share = 0: check on training clips (said in the report)
        held_rows = index.sort_values("clip_id")
    held_rows = held_rows.iloc[: cfg.eval_clips].reset_index(drop=True)
    held_clips = read_clips(clips, held_rows)
    encoders = resolved_encoders(latents, params.cache_latents)
    recipe = ControlNetRecipe(
        preset=params.preset, cfg=cfg, unet_dir=str(unet.resolve()), null_context=load_null_context(latents),
        allow_random=params.preset == "smoke", sample_clips=held_clips, sample_captions=held_rows["caption"].astype(str).tolist(),
        generator_paths={"decoder": str(decoder.resolve()), "latents": str(latents.resolve()), "encoders": encoders},
    )
    flat = flatten({"preset": params.preset, "train_controlnet": params_to_dict(params)["train_controlnet"]})
    result = fit(
        recipe, cfg, control_dataset(latents, clips, cfg.seed, held_out),
        run_name=default_run_name(params, latents, unet), storage=runs, output_dir=output_dir,
        params={**flat, "held_out_videos": len(held_out)}, tags=lineage_tags("train_controlnet"),
    )
    generator = VideoGenerator(unet, decoder, latents, encoders, controlnet_dir=output_dir)
    check = control_check(generator, recipe, held_clips, held_rows["caption"].astype(str).tolist(), read_clips(clips, other_video_rows(held_rows, index)))
    check["held_out"] = bool(held_out)
    report = {
        "control_check": check, "steps": cfg.steps, "conditions": cfg.condition_list, "mlflow_run_id": result["mlflow_run_id"],
        "comparable": params.preset != "smoke" and not cfg.random_init, **history_summary(result["mlflow_run_id"]),
    }
    client = MlflowClient(tracking_uri())
    client.log_batch(result["mlflow_run_id"], metrics=[Metric(f"control/{key}", float(value), 0, cfg.steps) for key, value in check.items() if key != "held_out"])
    write_json(report, output_dir / "metrics.json")
    return report


def main(params: Params) -> None:
    report = train_controlnet(params)
    write_json(report, METRICS)
    check = report["control_check"]
    print(f"train_controlnet: {report['steps']} steps on {', '.join(report['conditions'])}; loss {report.get('loss_first_10pct', float('nan')):.4f} -> "
          f"{report.get('loss_last_10pct', float('nan')):.4f}; canny control on {check['clips']} held-out clips: edge r {check['canny_edge_correlation_matched']:.3f} "
          f"with its control vs {check['canny_edge_correlation_mismatched']:.3f} with another clip's (uncontrolled {check['canny_edge_correlation_uncontrolled']:.3f}); "
          f"weights in {OUT_DIR}/")
