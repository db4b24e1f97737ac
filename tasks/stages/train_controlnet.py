"""Stage `train_controlnet`: the paper's stage 2 (section 2.4, Figure 4). The trained UNet is frozen;
the shared ControlNet (a copy of the UNet's encoder and middle), the per-condition adapters (eq. 10)
and the style adapter train on the engine (tasks/training/engine.py) with the UNet's v-loss.

Per clip: a condition type drawn uniformly from `conditions`, its maps computed from the clip's own
frames on the fly (canny with OpenCV, HED with its network, the image condition from the first
frame; tasks/inference/conditions.py), so no condition cache goes stale when thresholds change. Dropout:
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

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from eval.caption_probe import centroid_error, probe
from eval.control import edge_correlation
from model.presets import get_preset
from tasks.config.params import Params, flatten, params_to_dict
from tasks.config.paths import CLIPS, CONTROLNET, CONTROLNET_METRICS, CONTROLNET_PLOTS, CONTROLNET_REPORT, DECODER, LATENTS, UNET
from tasks.inference.conditions import canny
from tasks.inference.encoders import resolved_encoders
from tasks.inference.generation import VideoGenerator
from tasks.operations.lineage import lineage_tags, tracking_uri
from tasks.storage.atomic import write_json, write_metrics
from tasks.storage.clip_shards import held_out_videos, read_clips
from tasks.storage.latent_shards import latent_clip_dataset, load_null_context, read_index
from tasks.storage.object_store import run_storage
from tasks.storage.weight_files import require_weight_files
from tasks.training.controlnet import ControlNetRecipe, generate_controlled
from tasks.training.curves import write_loss_curves
from tasks.training.launch import fit
from tasks.training.tracking import history_summary, resumable_run_name


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
    """Where canny-controlled videos put their shape, against where the control clip has it
    (matched) and where a clip of another video has it (mismatched: the same generated video);
    and uncontrolled videos (same prompts and seeds) against the control clip: mean centroid
    distances in pixels (the caption probe's tracks). The same three comparisons of edge maps
    (Pearson's r of blurred canny edges) follow as a second figure."""
    videos, controls = generate_controlled(generator, recipe, clips, captions)
    low, high = recipe.cfg.canny_low, recipe.cfg.canny_high
    generated_edges = [canny(video, low, high) for video in videos]
    matched = [edge_correlation(edges, control[..., 0]) for edges, control in zip(generated_edges, controls)]
    others = [canny(clip, low, high) for clip in other_clips]
    mismatched = [edge_correlation(edges, other) for edges, other in zip(generated_edges, others)]
    uncontrolled = generator(captions[: len(clips)], list(range(len(clips))), frames=clips.shape[1], height=clips.shape[2], width=clips.shape[3],
                             steps=recipe.cfg.sample_steps, guidance_scale=get_preset(recipe.preset).diffusion.guidance_scale)
    baseline = [edge_correlation(canny(video, low, high), control[..., 0]) for video, control in zip(uncontrolled, controls)]
    # Where the shape is: the caption probe's centroid track of each video (eval/caption_probe.py)
    size = clips.shape[2:4]
    tracks = {name: [probe(video).track for video in group] for name, group in (("generated", videos), ("uncontrolled", uncontrolled), ("control", clips), ("other", other_clips))}
    error = lambda name, reference: np.array([centroid_error(a, b, size) for a, b in zip(tracks[name], tracks[reference])])  # noqa: E731
    matched_px, mismatched_px, uncontrolled_px = error("generated", "control"), error("generated", "other"), error("uncontrolled", "control")
    return {
        "clips": len(clips),
        "centroid_error_matched_px": float(matched_px.mean()),
        "centroid_error_mismatched_px": float(mismatched_px.mean()),
        "centroid_error_uncontrolled_px": float(uncontrolled_px.mean()),
        "centroid_matched_below_mismatched_share": float(np.mean(matched_px < mismatched_px)),
        "canny_edge_correlation_matched": float(np.mean(matched)),
        "canny_edge_correlation_mismatched": float(np.mean(mismatched)),
        "canny_edge_correlation_uncontrolled": float(np.mean(baseline)),
        "matched_beats_mismatched_share": float(np.mean(np.array(matched) > np.array(mismatched))),
    }


def train_controlnet(params: Params, clips: Path = CLIPS, latents: Path = LATENTS, unet: Path = UNET, decoder: Path = DECODER,
                     output_dir: Path = CONTROLNET, runs: str | Path | None = None) -> dict[str, Any]:
    """Train on the cache + clips with the UNet in `unet` frozen; exports to output_dir; returns the figures."""
    require_weight_files(params, "train_controlnet")
    cfg = params.train_controlnet
    index = read_index(latents)
    held_out = held_out_videos(index, params.train_unet.held_out_share, params.train_unet.seed)
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
        recipe, cfg, {"train": latent_clip_dataset(latents, clips, cfg.seed, held_out)},
        run_name=resumable_run_name("train_controlnet", params.preset, params_to_dict(params)["train_controlnet"], latents / "index.parquet", latents / "encoders.json", unet / "model.safetensors"), storage=runs or run_storage(), output_dir=output_dir,
        params={**flat, "held_out_videos": len(held_out)}, tags=lineage_tags("train_controlnet"),
    )
    generator = VideoGenerator(unet, decoder, latents, encoders, controlnet_dir=output_dir)
    print(f"train_controlnet: checking the canny control on {len(held_clips)} held-out clips (own, another clip's and no control)", flush=True)
    check = control_check(generator, recipe, held_clips, held_rows["caption"].astype(str).tolist(), read_clips(clips, other_video_rows(held_rows, index)))
    check["held_out"] = bool(held_out)
    report = {
        "control_check": check, "steps": cfg.steps, "conditions": cfg.condition_list, "mlflow_run_id": result["mlflow_run_id"],
        "comparable": params.preset != "smoke" and not cfg.missing_weights, **history_summary(result["mlflow_run_id"]),
    }
    client = MlflowClient(tracking_uri())
    client.log_batch(result["mlflow_run_id"], metrics=[Metric(f"control/{key}", float(value), 0, cfg.steps) for key, value in check.items() if key != "held_out"])
    write_json(report, output_dir / "metrics.json")
    return report


def main(params: Params) -> None:
    report = train_controlnet(params)
    write_json(report, CONTROLNET_REPORT)
    check = report["control_check"]
    # how far the generated shape lands from the control clip's, with its control and without any
    write_metrics({"centroid_px": check["centroid_error_matched_px"], "uncontrolled_px": check["centroid_error_uncontrolled_px"]}, CONTROLNET_METRICS)
    write_loss_curves({"controlnet": report["mlflow_run_id"]}, CONTROLNET_PLOTS, "train_controlnet: v-prediction loss, UNet frozen")
    print(f"train_controlnet: {report['steps']} steps on {', '.join(report['conditions'])}; loss {report.get('loss_first_10pct', float('nan')):.4f} -> "
          f"{report.get('loss_last_10pct', float('nan')):.4f}; weights in {CONTROLNET}/")
    print(f"  canny control on {check['clips']} held-out clips: the shape lands {check['centroid_error_matched_px']:.1f} px from the control clip's "
          f"(another clip's: {check['centroid_error_mismatched_px']:.1f} px; uncontrolled: {check['centroid_error_uncontrolled_px']:.1f} px), closer to its own on "
          f"{check['centroid_matched_below_mismatched_share']:.0%} of clips; edge r {check['canny_edge_correlation_matched']:.3f} with its control vs "
          f"{check['canny_edge_correlation_mismatched']:.3f} with another clip's (uncontrolled {check['canny_edge_correlation_uncontrolled']:.3f})")
