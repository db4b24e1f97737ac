"""The trained models as one MLflow model: a pyfunc that turns prompts into videos.

The pipeline logs it after evaluation (tasks/operations/promotion.py) with everything generation
reads inside it: the merged-expert UNet, the decoder, the ControlNet, the latent cache's
encoders.json and empty-prompt context, and the text encoder's weight file when the preset loads
one (the smoke preset's tiny text tower is rebuilt from its seed). So

    videos = mlflow.pyfunc.load_model("models:/versvideo@champion").predict(
        pd.DataFrame({"prompt": ["a red circle moves left on a striped background"], "seed": [0]}))

needs nothing from the project's disk. Input: `prompt` (string), optional `seed` (default: the
row's position) and `steps` (default: the preset's sampler). Output: (n, frames, height, width, 3)
uint8, the shape the UNet was trained on, one video per row; a row's video depends on its prompt,
seed and steps only.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import tempfile
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema, TensorSpec

from tasks.config.params import CacheLatentsParams
from tasks.inference.generation import VideoGenerator
from tasks.inference.models import trained_clip_shape

REPO = Path(__file__).resolve().parents[2]
CACHE_FILES = ("encoders.json", "null_context.npy")  # what generation reads from data/latents/
# load-time options (mlflow.pyfunc.load_model(uri, model_config={...}) may set only keys logged here)
LOAD_OPTIONS = {"controlnet": False, "device": ""}  # also load the ControlNet; "" = cuda when available


class VideoModel(mlflow.pyfunc.PythonModel):
    """Text-to-video generation as an MLflow pyfunc. Loaded with model_config `controlnet: true`
    it also loads the ControlNet (`versvideo generate --model` does, to steer)."""

    def load_context(self, context) -> None:
        artifacts = context.artifacts
        encoders = json.loads((Path(artifacts["cache"]) / "encoders.json").read_text())
        text_weights = artifacts.get("text_encoder", "")  # none: the smoke preset's tiny tower, rebuilt from the seed
        text_model = encoders["text_encoder"]["model"] if text_weights else CacheLatentsParams().text_model
        text_params = CacheLatentsParams(text_model=text_model, text_weights=text_weights, seed=encoders["seed"])
        config = {**LOAD_OPTIONS, **(context.model_config or {})}
        controlnet = artifacts.get("controlnet") if config.get("controlnet") else None
        self.generator = VideoGenerator(artifacts["unet"], artifacts["decoder"], artifacts["cache"], text_params,
                                        device=config.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"), controlnet_dir=controlnet)
        self.clip_shape = trained_clip_shape(artifacts["unet"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        frames, height, width = self.clip_shape
        diffusion = self.generator.preset.diffusion
        videos = []
        for position, row in enumerate(model_input.to_dict("records")):
            seed = position if pd.isna(row.get("seed", np.nan)) else int(row["seed"])
            steps = diffusion.sampling_steps if pd.isna(row.get("steps", np.nan)) else int(row["steps"])
            if steps < 1:
                raise ValueError(f"row {position}: steps {steps} must be at least 1")
            videos.append(self.generator([str(row["prompt"])], [seed], frames=frames, height=height, width=width, steps=steps,
                                         guidance_scale=diffusion.guidance_scale)[0])
        return np.stack(videos) if videos else np.zeros((0, frames, height, width, 3), np.uint8)


def save_video_model(path: Path, folders: dict[str, Path], cache: Path, text_weights: str = "") -> None:
    """Write the pyfunc model to `path` (a new folder): `folders` holds unet, decoder and, when
    trained, controlnet; `cache` the latent cache folder; `text_weights` the text encoder's file
    ("" for the smoke preset's seeded stand-in)."""
    frames, height, width = trained_clip_shape(folders["unet"])
    with tempfile.TemporaryDirectory() as staging:
        cache_copy = Path(staging) / "cache"
        cache_copy.mkdir()
        for name in CACHE_FILES:
            shutil.copy(cache / name, cache_copy / name)
        artifacts = {name: str(folder) for name, folder in folders.items() if (Path(folder) / "config.json").is_file()}
        artifacts["cache"] = str(cache_copy)
        if text_weights:
            artifacts["text_encoder"] = text_weights
        code_paths = []
        for package in ("model", "tasks"):  # the code that unpickles and runs the model, without bytecode caches
            shutil.copytree(REPO / package, Path(staging) / "code" / package, ignore=shutil.ignore_patterns("__pycache__"))
            code_paths.append(str(Path(staging) / "code" / package))
        signature = ModelSignature(
            inputs=Schema([ColSpec("string", "prompt"), ColSpec("long", "seed", required=False), ColSpec("long", "steps", required=False)]),
            outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, frames, height, width, 3))]),
        )
        mlflow.pyfunc.save_model(str(path), python_model=VideoModel(), artifacts=artifacts, signature=signature,
                                 code_paths=code_paths, pip_requirements=pinned_requirements(), model_config=LOAD_OPTIONS)


def pinned_requirements() -> list[str]:
    """The project's dependencies at the versions installed here (the environment the model was
    logged from; the lock file pins the same)."""
    pinned = []
    for requirement in importlib.metadata.requires("versvideo") or []:
        name = re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0)
        extras = re.search(r"\[[^\]]+\]", requirement)
        pinned.append(f"{name}{extras.group(0) if extras else ''}=={importlib.metadata.version(name)}")
    return pinned
