"""The `versvideo` command line. It parses arguments and dispatches; no ML logic lives here.

    versvideo init --preset {smoke,L,H}                        write that preset's values into params.yaml
    versvideo stage NAME [--params FILE] [-S key=value ...]   one DVC stage, in the current directory
    versvideo pipeline [--stages a,b] [--force c] [-S k=v]     the Prefect flow over all (or some) DVC stages;
                                                               registers the model when evaluate ran
    versvideo serve --cron "0 3 * * *" [--new-csv PATH]        a scheduled retrain-and-promote deployment
    versvideo generate --prompt TEXT --out PATH.mp4 [...]      videos from text (+ control video/image, style image)
    versvideo doctor [--preset L]                              params, weight files, services and devices, checked
    versvideo model-summary --preset {smoke,L,H} [--json]     parameter counts
    versvideo bench NAME [--json]                              a benchmark; JSON figures on the last line
    versvideo ablation [--force] [-S ablation.steps=N ...]     Tables 2 and 5: train and score each ablation row
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import sys
from pathlib import Path

from tasks.config.params import PRESETS, PREVIEW_FPS, ParamsError, load_params, set_values, write_preset
from tasks.config.paths import CONTROLNET, DECODER, LATENTS, UNET
from tasks.operations.stage_lock import StageBusy, stage_lock

# Stage name (as in dvc.yaml and params.yaml) -> module with main(params).
STAGES = {
    "prepare": "tasks.stages.prepare",
    "filter": "tasks.stages.filter",
    "decode": "tasks.stages.decode",
    "cache_latents": "tasks.stages.cache_latents",
    "train_unet": "tasks.stages.train_unet",
    "train_decoder": "tasks.stages.train_decoder",
    "train_controlnet": "tasks.stages.train_controlnet",
    "evaluate": "tasks.stages.evaluate",
    "ablation": "tasks.stages.ablation",  # ablation/dvc.yaml's, not dvc.yaml's: `versvideo ablation`
}
# Benchmark name -> module with run(args) -> dict of figures.
BENCHMARKS = {
    "decode": "tasks.benchmarks.decode",
    "unet": "tasks.benchmarks.unet",
    "cache": "tasks.benchmarks.cache",
    "train": "tasks.benchmarks.train",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="versvideo", description="VersVideo text-to-video pipeline")
    parser.add_argument("--version", action="version", version=f"versvideo {importlib.metadata.version('versvideo')}")
    commands = parser.add_subparsers(dest="command", required=True)

    stage = commands.add_parser("stage", help="run one pipeline stage in the current directory (dvc.yaml calls this)")
    stage.add_argument("name", choices=sorted(STAGES))
    stage.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    stage.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a param, e.g. -S decode.frames=16 (repeatable)")

    init = commands.add_parser("init", help="write a preset's values into params.yaml (so DVC sees what a run uses)")
    init.add_argument("--preset", required=True, choices=list(PRESETS))
    init.add_argument("--params", default="params.yaml", help="params file to rewrite (default: params.yaml)")

    doctor = commands.add_parser("doctor", help="check params, weight files, services and devices without running a stage")
    doctor.add_argument("--preset", choices=list(PRESETS), help="check as `versvideo init --preset NAME` would set params.yaml")
    doctor.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")

    pipeline = commands.add_parser("pipeline", help="run or resume the pipeline as a Prefect flow (ephemeral, or PREFECT_API_URL)")
    pipeline.add_argument("--stages", default="", help="comma-separated stage names (default: all, in dvc.yaml's order)")
    pipeline.add_argument("--force", default="", help="comma-separated stages to run even when DVC finds them up to date (their input changed outside DVC)")
    pipeline.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="write a param into params.yaml before the run, as `dvc exp run -S` does, e.g. -S train_unet.steps=300 (repeatable)")
    add_promotion_arguments(pipeline)

    serve = commands.add_parser("serve", help="serve the retrain flow as a Prefect deployment on a cron schedule")
    serve.add_argument("--cron", required=True, help='cron schedule, e.g. "0 3 * * *" (03:00 every day)')
    serve.add_argument("--new-csv", default="", help="WebVid CSV whose new rows each run appends to prepare.webvid_csv")
    add_promotion_arguments(serve)

    generate = commands.add_parser("generate", help="make videos from prompts, optionally steered by a control video or image and a style image")
    generate.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    generate.add_argument("--prompts-file", default="", help="a text file with one prompt per line")
    generate.add_argument("--out", required=True, help="output PATH.mp4 (a GIF preview beside it; PATH_000.mp4 ... for several prompts)")
    generate.add_argument("--control", default="", help="visual condition type: canny, hed, depth or image")
    generate.add_argument("--control-video", default="", help="the control source: a video (its first --frames frames at --fps) or an image")
    generate.add_argument("--style", default="", help="a style image (CLIP image embedding -> style tokens)")
    generate.add_argument("--control-scale", type=float, default=1.0, help="multiplies the ControlNet's residuals (0 = no control)")
    generate.add_argument("--frames", type=int, help="frames (default: the model preset's)")
    generate.add_argument("--height", type=int, help="height in pixels (default: the preset's)")
    generate.add_argument("--width", type=int, help="width in pixels (default: the preset's)")
    generate.add_argument("--fps", type=float, default=float(PREVIEW_FPS), help=f"frame rate of the output and of the control video's sampling (default {PREVIEW_FPS}, the training samples')")
    generate.add_argument("--steps", type=int, help="DDIM steps (default: the model preset's sampler, Table 4)")
    generate.add_argument("--cfg", type=float, help="classifier-free guidance scale (default: the model preset's, Table 4)")
    generate.add_argument("--seed", type=int, default=0, help="prompt k uses seed + k")
    generate.add_argument("--batch-size", type=int, default=1, help="videos per sampling batch")
    generate.add_argument("--model", default="", help="an MLflow registered model, models:/NAME@ALIAS (default: the local models/ folders)")
    generate.add_argument("--unet", default=str(UNET))
    generate.add_argument("--decoder", default=str(DECODER))
    generate.add_argument("--controlnet", default=str(CONTROLNET))
    generate.add_argument("--latents", default=str(LATENTS), help="the latent cache whose empty prompt and encoders the UNet was trained with")
    generate.add_argument("--params", default="params.yaml", help="params file: its cache_latents section names the text encoder")
    generate.add_argument("--device", default="", help="cpu or cuda (default: cuda when available)")

    summary = commands.add_parser("model-summary", help="parameter counts of a preset's models")
    summary.add_argument("--preset", choices=["smoke", "L", "H"], default="L")
    summary.add_argument("--json", action="store_true", help="print JSON")

    ablation = commands.add_parser("ablation", help="Tables 2 and 5: train every ablation row, score it, table in metrics/ablation.json (DVC)")
    ablation.add_argument("--force", action="store_true", help="rerun the ablation stage even when DVC finds it up to date")
    ablation.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="set a param in params.yaml first (DVC records it), e.g. -S ablation.steps=1000 (repeatable)")

    bench = commands.add_parser("bench", help="run a benchmark against its baseline")
    bench.add_argument("name", choices=sorted(BENCHMARKS))
    bench.add_argument("--json", action="store_true", help="print the figures as JSON on the last line")
    bench.add_argument("--repeats", type=int, default=3, help="timed repetitions (the best is reported)")
    bench.add_argument("--videos", help="folder of videos for the decode benchmark (default: ../shared/fixtures/videos)")
    return parser


def add_promotion_arguments(command: argparse.ArgumentParser) -> None:
    """How a freshly evaluated model is registered and whether it becomes the champion."""
    command.add_argument("--metric", default="heldout/fvd", help="PROTOCOL/KEY of reports/eval.json that decides promotion")
    command.add_argument("--higher-is-better", action="store_true", help="the metric improves upward (e.g. clipsim); default: lower is better (fvd)")
    command.add_argument("--model-name", default="versvideo", help="MLflow registered model whose champion alias moves")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "stage":
            params = load_params(args.params, args.overrides)
            with stage_lock(args.name):  # a second run of this stage here fails at once, naming the first
                importlib.import_module(STAGES[args.name]).main(params)
        elif args.command == "init":
            changed = write_preset(Path(args.params), args.preset)
            print(f"{args.params}: preset {args.preset}; {len(changed)} value(s) rewritten" + (f": {', '.join(changed)}" if changed else ""))
        elif args.command == "doctor":
            from flows.doctor import doctor

            return 0 if doctor(Path(args.params), args.preset) else 1
        elif args.command == "pipeline":
            from flows.pipeline import StageFailed, dvc_stages, pipeline

            chosen, forced = ([name for name in text.split(",") if name] for text in (args.stages, args.force))
            unknown = sorted(set(chosen + forced) - set(dvc_stages()))
            if unknown:  # before the flow starts a Prefect server
                raise ValueError(f"unknown stage(s) {', '.join(unknown)}; dvc.yaml has {', '.join(dvc_stages())}")
            if args.overrides:  # into params.yaml, so DVC sees and records them
                print(f"params.yaml: set {', '.join(set_values(Path('params.yaml'), args.overrides))}")
            try:
                results = pipeline(stages=chosen or None, force=forced or None, metric=args.metric, lower_is_better=not args.higher_is_better,
                                   model_name=args.model_name)
            except StageFailed as error:
                print(f"versvideo: {error}", file=sys.stderr)
                return 1
            for result in results:
                print(f"  {result['stage']:<14} {'ran' if result['ran'] else 'up to date':<11} {result['seconds']:8.1f} s")
            for promotion in (result["promotion"] for result in results if "promotion" in result):
                print(f"registered {promotion['model']} version {promotion['version']}: {promotion['reason']}")
        elif args.command == "ablation":
            from flows.pipeline import reproduce_ablation

            if args.overrides:  # into params.yaml, so DVC sees and records them
                print(f"params.yaml: set {', '.join(set_values(Path('params.yaml'), args.overrides))}")
            return reproduce_ablation(force=args.force)
        elif args.command == "serve":
            from flows.retrain import retrain

            retrain.serve(name="versvideo-retrain", cron=args.cron, parameters={
                "new_csv": args.new_csv, "metric": args.metric, "lower_is_better": not args.higher_is_better, "model_name": args.model_name})
        elif args.command == "generate":
            from tasks.inference.generate import GenerateRequest, generate, read_prompts

            for name in ("steps", "batch_size", "frames", "height", "width"):
                if getattr(args, name) is not None and getattr(args, name) <= 0:
                    raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
            request = GenerateRequest(
                prompts=read_prompts(args.prompt, args.prompts_file), out=Path(args.out), control=args.control, control_path=args.control_video,
                style=args.style, control_scale=args.control_scale, frames=args.frames, height=args.height, width=args.width, fps=args.fps,
                steps=args.steps, cfg=args.cfg, seed=args.seed, batch_size=args.batch_size, model=args.model,
                folders={"unet": Path(args.unet), "decoder": Path(args.decoder), "controlnet": Path(args.controlnet)},
                latents=Path(args.latents), device=args.device,
            )
            for path in generate(request, load_params(args.params)):
                print(f"wrote {path} and {path.with_suffix('.gif')}")
        elif args.command == "model-summary":
            from model.summary import model_summary

            figures = model_summary(args.preset)
            print(json.dumps(figures, indent=None if args.json else 2))
        elif args.command == "bench":
            figures = importlib.import_module(BENCHMARKS[args.name]).run(args)
            if args.json:
                print(json.dumps(figures, sort_keys=True))
            else:
                for key, value in figures.items():
                    print(f"{key}: {value}")
    except ParamsError as error:
        print(f"versvideo: bad params: {error}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, StageBusy) as error:
        print(f"versvideo: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
