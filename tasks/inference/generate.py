"""`versvideo generate`: videos from prompts, optionally steered by a visual condition (a control
video or image) and a style image, with the pipeline's trained models.

Weights come from local folders (models/unet, models/decoder, models/controlnet by default), with
the latent cache's text encoder and empty prompt (params.yaml's cache_latents section,
data/latents/), as the UNet was trained with them; or from an MLflow registered model
(`models:/NAME@ALIAS`), the pyfunc video model that carries all of these inside.

Each prompt k gets seed `seed + k`, so a video depends on its prompt and seed only (not on the batch
it shares); outputs are written under a temporary name and renamed: PATH.mp4 and PATH.gif for one
prompt, PATH_000.mp4 ... for several.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from tasks.config.params import MAX_FPS, PREVIEW_FPS, Params
from tasks.config.paths import CONTROLNET, DECODER, LATENTS, UNET
from tasks.inference.conditions import ConditionExtractor, condition_index, load_style_encoder, style_embeddings
from tasks.inference.generation import VideoGenerator, read_video_clip
from tasks.inference.models import trained_clip_shape
from tasks.operations.lineage import tracking_uri
from tasks.storage.previews import write_preview
from tasks.storage.video_io import VideoError, center_crop, cover_size, resize_frames
from tasks.storage.weight_files import check_weight_file

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclass
class GenerateRequest:
    prompts: list[str]
    out: Path
    control: str = ""  # condition name, or "" for none
    control_path: str = ""  # a video, or an image (repeated over the frames)
    style: str = ""  # style image path
    control_scale: float = 1.0
    frames: int | None = None  # None: the preset's
    height: int | None = None
    width: int | None = None
    fps: float = PREVIEW_FPS
    steps: int | None = None  # None: the UNet preset's sampler (Table 4: 30 DDIM steps)
    cfg: float | None = None  # None: the preset's guidance scale (L/H: Table 4's 7.5; smoke: 3)
    seed: int = 0
    batch_size: int = 1
    model: str = ""  # models:/NAME@ALIAS, or "" for the local folders below
    folders: dict[str, Path] = field(default_factory=lambda: {"unet": UNET, "decoder": DECODER, "controlnet": CONTROLNET})
    latents: Path = LATENTS
    device: str = ""  # "" = cuda when available


def read_prompts(prompts: list[str], prompts_file: str) -> list[str]:
    """--prompt values, then the non-empty lines of --prompts-file."""
    found = list(prompts)
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"--prompts-file {path}: not found")
        found += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not found:
        raise ValueError("no prompt: give --prompt TEXT (repeatable) or --prompts-file FILE (one prompt per line)")
    return found


def registered_generator(uri: str, device: str, controlnet: bool) -> tuple[VideoGenerator, tuple[int, int, int]]:
    """models:/NAME@ALIAS (or models:/NAME/VERSION) -> (the generator inside that registered pyfunc
    video model (tasks/inference/video_model.py), the clip shape its UNet was trained on), its
    files downloaded from the registry. No global MLflow state is set (mlflow.set_tracking_uri
    would outlive this call and redirect every later MlflowClient() of the process)."""
    import mlflow.artifacts
    import mlflow.pyfunc
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name, _, alias = uri.removeprefix("models:/").partition("@")
    client = MlflowClient(tracking_uri())
    try:
        if alias:
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, _, number = name.partition("/")
            version = client.get_model_version(name, number)
    except MlflowException as error:
        raise ValueError(f"--model {uri}: not found in the MLflow registry at {tracking_uri()} ({error.message})") from None
    with tempfile.TemporaryDirectory() as folder:  # the weights are in memory once loaded
        local = mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=folder, tracking_uri=tracking_uri())
        model = mlflow.pyfunc.load_model(local, model_config={"controlnet": controlnet, "device": device}).unwrap_python_model()
    return model.generator, model.clip_shape


def read_image(path: Path, height: int, width: int) -> np.ndarray:
    """An image file -> (height, width, 3) uint8, resized to cover and centre-cropped."""
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))[None]
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"{path}: not a readable image ({error})") from None
    cover_height, cover_width = cover_size(pixels.shape[1], pixels.shape[2], height, width)
    return center_crop(resize_frames(pixels, cover_height, cover_width), height, width)[0]


def control_frames(path: str, frames: int, fps: float, height: int, width: int) -> np.ndarray:
    """The control source as (frames, height, width, 3) uint8: a video's first `frames` frames at
    `fps`, or an image repeated."""
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"--control-video {source}: not found")
    if source.suffix.lower() in IMAGE_EXTENSIONS:
        return np.repeat(read_image(source, height, width)[None], frames, axis=0)
    try:
        return read_video_clip(source, frames, fps, height, width)
    except VideoError as error:
        hint = " (use a longer video, fewer --frames or a lower --fps)" if error.reason == "too_short" else ""
        raise ValueError(f"--control-video {error.detail}{hint}") from None


def output_paths(out: Path, count: int) -> list[Path]:
    if out.suffix.lower() != ".mp4":
        raise ValueError(f"--out {out}: give a path ending in .mp4 (a GIF preview is written beside it)")
    return [out] if count == 1 else [out.with_name(f"{out.stem}_{k:03d}.mp4") for k in range(count)]


MAX_IMAGE_SIDE = 8192  # pixels: larger style or control images are refused before decoding


def check_request(request: GenerateRequest) -> list[Path]:
    """What can be checked about a request without a model (numbers, output paths, image sizes),
    checked before any model is loaded, so a mistake costs no generation; returns the output paths."""
    if not (math.isfinite(request.fps) and 1 <= request.fps <= MAX_FPS):  # the MP4 is written at round(fps)
        raise ValueError(f"--fps {request.fps}: must be a number from 1 to {MAX_FPS:g}")
    for flag, value in (("--cfg", request.cfg), ("--control-scale", request.control_scale)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{flag} {value}: must be a finite number >= 0")
    outputs = output_paths(request.out, len(request.prompts))
    for path in outputs:
        if path.is_dir():
            raise ValueError(f"--out {path}: is a folder; give a file path ending in .mp4")
        ancestor = next(folder for folder in (path.parent.absolute(), *path.parent.absolute().parents) if folder.exists())
        if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
            raise ValueError(f"--out {path}: cannot write under {ancestor} (not a writable folder)")
    for path, flag in ((request.control_path, "--control-video"), (request.style, "--style")):
        if path and Path(path).suffix.lower() in IMAGE_EXTENSIONS:
            check_image_size(Path(path), flag)
    return outputs


def check_image_size(path: Path, flag: str) -> None:
    """Reads the image header only: a 20000 x 20000 image is refused before it is decoded."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"{flag} {path}: not a readable image ({error})") from None
    if max(width, height) > MAX_IMAGE_SIDE:
        raise ValueError(f"{flag} {path}: {width}x{height} pixels; give an image at most {MAX_IMAGE_SIDE} pixels on a side (it is resized to the video anyway)")


def generate(request: GenerateRequest, params: Params) -> list[Path]:
    """Make one video per prompt; returns the MP4 paths (each with a .gif beside it)."""
    if request.control and not request.control_path:
        raise ValueError(f"--control {request.control} needs --control-video PATH (a video or an image)")
    if request.control_path and not request.control:
        raise ValueError("--control-video needs --control TYPE (canny, hed, depth or image)")
    if request.control:
        condition_index(request.control)  # unknown or unavailable conditions fail before any loading
    for path, flag in ((request.control_path, "--control-video"), (request.style, "--style")):
        if path and not Path(path).is_file():
            raise FileNotFoundError(f"{flag} {path}: not found")
    outputs = check_request(request)
    steered = bool(request.control or request.style)
    device = request.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if request.model:
        generator, trained = registered_generator(request.model, device, controlnet=steered)
        if steered and generator.controlled is None:
            raise FileNotFoundError(f"--control/--style need a trained ControlNet: {request.model} was registered without one")
    else:
        folders = request.folders
        if steered and not (Path(folders["controlnet"]) / "config.json").is_file():
            raise FileNotFoundError(f"--control/--style need a trained ControlNet: {folders['controlnet']} has none (run versvideo stage train_controlnet)")
        for part in ("unet", "decoder", *(["controlnet"] if steered else [])):
            if (Path(folders[part]) / "config.json").is_file():  # a trained folder: its weights must be whole
                check_weight_file(Path(folders[part]) / "model.safetensors", f"--{part} {folders[part]}")
        generator = VideoGenerator(folders["unet"], folders["decoder"], request.latents, params.cache_latents, device=device,
                                   controlnet_dir=folders["controlnet"] if steered else None)
        trained = None
    preset = generator.preset
    frames, height, width = request.frames, request.height, request.width
    if None in (frames, height, width):  # the UNet's training clips fill in what the request leaves out
        trained = trained or trained_clip_shape(request.folders["unet"])
        frames, height, width = (given or default for given, default in zip((frames, height, width), trained))
    generator.check_size(height, width)
    steps = request.steps or preset.diffusion.sampling_steps
    guidance_scale = preset.diffusion.guidance_scale if request.cfg is None else request.cfg

    control = None
    if request.control:
        trained = generator.controlnet_config["trained_conditions"]
        if request.control not in trained:
            raise ValueError(f"--control {request.control}: this ControlNet was trained on {', '.join(trained)} only, so its {request.control} adapter "
                             f"is untrained; use one of those, or retrain with train_controlnet.conditions including {request.control}")
        extractor = ConditionExtractor.from_config(generator.controlnet_config["extractors"], seed=generator.controlnet_config["seed"],
                                                   allow_random=preset.name == "smoke", device=device)
        control = extractor(request.control, control_frames(request.control_path, frames, request.fps, height, width))
    style = None
    if request.style:
        style_cfg = generator.controlnet_config["style"]
        encoder = load_style_encoder(style_cfg["model"], style_cfg["weights"], generator.controlnet_config["seed"], allow_random=style_cfg["model"] == "tiny-random")
        style = style_embeddings(encoder, read_image(Path(request.style), 224, 224)[None])

    progress = tqdm(total=len(request.prompts) * steps, desc="generate", unit="step")
    written = []
    for start in range(0, len(request.prompts), request.batch_size):
        prompts = request.prompts[start : start + request.batch_size]
        videos = generator(
            prompts, [request.seed + start + k for k in range(len(prompts))], frames=frames, height=height, width=width,
            steps=steps, guidance_scale=guidance_scale, control_scale=request.control_scale,
            control=None if control is None else np.repeat(control[None], len(prompts), axis=0), control_type=request.control or None,
            style_embedding=None if style is None else style.repeat(len(prompts), 1),
            callback=lambda index, latents, n=len(prompts): progress.update(n),
        )
        for video, path in zip(videos, outputs[start : start + len(prompts)]):
            written.append(write_atomically(video, path, round(request.fps)))
    progress.close()
    return written


def write_atomically(video: np.ndarray, path: Path, fps: int) -> Path:
    """PATH.mp4 and PATH.gif, each renamed into place only once complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".generate-") as staging:
        for written in write_preview(video, Path(staging), path.stem, fps):
            os.replace(written, path.parent / written.name)
    return path
