"""Stage `evaluate`: the trained UNet (models/unet), decoded by the TCM-VAE (models/decoder), scored
under evaluate.protocols (tasks/evaluation/scoring.py: FVD, IS, CLIPSIM, frame consistency, and
prompt following on the demo world; tasks/evaluation/protocols.py: what each protocol generates
and compares with). evaluate.decoder_table's protocol is also scored with every other decoder on
the same latents (Table 3's generation columns).

Outputs: reports/eval.json (every number beside its protocol), metrics/eval.json (the headline
numbers, for DVC), plots/eval/PROTOCOL.csv and .png (per-frame CLIPSIM and consistency,
generated vs real), data/eval_stats/ (the real videos' cached statistics) and an MLflow run with
the same figures and MP4/GIF samples.
"""

from __future__ import annotations

from typing import Any

from tasks.config.params import Params
from tasks.config.paths import EVAL_METRICS, EVAL_REPORT, PLOTS
from tasks.evaluation.scoring import evaluate
from tasks.storage.atomic import write_json, write_metrics


def main(params: Params) -> None:
    report = evaluate(params)
    write_json(report, EVAL_REPORT)
    write_metrics(headline_metrics(report), EVAL_METRICS)
    for name, figures in report["protocols"].items():
        p = figures["protocol"]
        print(f"evaluate/{name}: " + "  ".join(summary_parts(figures)))
        print(f"  protocol: {p['generated_videos']} generated vs {p['real_videos']} real videos ({p['split']}), {p['frames']} frames "
              f"{p['resolution']}, DDIM {p['sampler_steps']} steps, CFG {p['cfg']}, seed {p['seed']}; comparable: {figures['comparable']}")
        if "reference" in p:
            print(f"  reference: {p['reference']['reproduces']}; " + ("followed" if p["follows_reference"] else "deviations: " + "; ".join(p["deviations"])))
        if name == "captions":
            for group in ("training", "unseen", "real_clips"):
                label = {"training": f"{figures['videos_training']} training captions", "unseen": f"{figures['videos_unseen']} unseen combinations",
                         "real_clips": f"the {p['real_videos']} real clips (the probe)"}[group]
                print(f"  prompt following, {label}: " + ", ".join(f"{key} {figures[f'{key}_accuracy_{group}']:.0%} (chance {figures[f'{key}_chance']:.0%})" for key in ("color", "shape", "direction")))
    if "decoder_table" in report:
        table = report["decoder_table"]
        print(f"evaluate/{table['protocol']} by decoder (Table 3; {table['same_latents']}):")
        for name, figures in table["decoders"].items():
            print(f"  {name:<24} " + "  ".join(summary_parts(figures)))
        for pair, figures in table["differences"].items():
            print(f"  {pair:<34} " + "  ".join(f"{key} {f['mean']:+.4f} [{f['low']:+.4f}, {f['high']:+.4f}] {f['verdict']}" for key, f in figures.items()))
    print(f"evaluate: {report['seconds']} s; {EVAL_REPORT}, {EVAL_METRICS}, {PLOTS}/, MLflow run {report['mlflow_run_id']}")


def summary_parts(figures: dict[str, Any]) -> list[str]:
    """The metrics a protocol reported, for one console line."""
    parts = []
    if "fvd" in figures:
        parts.append(f"FVD {figures['fvd']:.2f}")
    if "is_mean" in figures:
        parts.append(f"IS {figures['is_mean']:.3f} ± {figures['is_std']:.3f}")
    if "clipsim" in figures:
        parts.append(f"CLIPSIM {figures['clipsim']:.4f}" + (f" (real {figures['real_clipsim']:.4f})" if "real_clipsim" in figures else ""))
    if "frame_consistency" in figures:
        parts.append(f"frame consistency {figures['frame_consistency']:.4f} (real {figures['real_frame_consistency']:.4f})")
    return parts


def headline_metrics(report: dict[str, Any]) -> dict[str, float | None]:
    """What `dvc metrics show` lists for evaluate: the held-out FVD and CLIPSIM and, on the demo
    world, prompt following on colour/shape/direction combinations no training video has."""
    protocols = report["protocols"]
    heldout, captions = protocols.get("heldout", {}), protocols.get("captions", {})
    return {"fvd": heldout.get("fvd"), "clipsim": heldout.get("clipsim"),
            "color_unseen": captions.get("color_accuracy_unseen"), "direction_unseen": captions.get("direction_accuracy_unseen")}

