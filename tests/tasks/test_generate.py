"""`versvideo generate` on tiny smoke models: MP4 + GIF that decord reads back with the requested
frames and size, determinism for a seed, control and style changing the video, the registered
MLflow pyfunc model generating the same videos, and clear errors for bad inputs."""

import json
import shutil
import struct
import zlib
from pathlib import Path

import decord
import numpy as np
import pytest
import torch
from PIL import Image

from flows.cli import main as cli
from model.controlnet import ControlledUNet, StyleAdapter, VideoControlNet
from model.presets import get_preset
from tasks.config.params import CacheLatentsParams, Params, TrainControlnetParams, clip_shape
from tasks.inference.conditions import load_style_encoder
from tasks.inference.encoders import encode_captions, encoder_info, load_text
from tasks.inference.generate import GenerateRequest, generate
from tasks.inference.generation import VideoGenerator
from tasks.inference.models import load_unet
from tasks.training.controlnet import ControlNetRecipe, ControlTraining, save_controlnet
from tests.conftest import write_tiny_models

VIDEO = "h264_340x256_28fps.mp4"


def perturbed(module: torch.nn.Module, scale: float) -> torch.nn.Module:
    """Move the zero-initialised layers off zero, as training would, so control and style act."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(scale * torch.randn_like(parameter))
    return module


@pytest.fixture(scope="module")
def project(tmp_path_factory, fixture_videos):
    root = tmp_path_factory.mktemp("generate")
    latents = root / "data" / "latents"
    latents.mkdir(parents=True)
    (latents / "encoders.json").write_text(json.dumps(encoder_info(CacheLatentsParams())))
    text, tokenizer = load_text(CacheLatentsParams())
    np.save(latents / "null_context.npy", encode_captions(text, tokenizer, [""])[0])
    write_tiny_models(root, scale=0.02)
    frozen, _ = load_unet(root / "models" / "unet")
    cfg = TrainControlnetParams(conditions="canny,depth,image", depth_resolution=64)
    encoder = load_style_encoder(cfg.style_model, "", 0, allow_random=True)
    controlled = ControlledUNet(frozen, perturbed(VideoControlNet(frozen, get_preset("smoke").controlnet), 0.05),
                                perturbed(StyleAdapter(64, frozen.config.context_dim, 4), 0.5))
    recipe = ControlNetRecipe("smoke", cfg, str(root / "models" / "unet"), np.zeros(1), True, np.zeros(1), [], {})
    save_controlnet(ControlTraining(controlled, encoder), root / "models" / "controlnet", recipe)
    for name, colour in (("red", (220, 30, 30)), ("blue", (20, 40, 230))):
        image = np.zeros((48, 48, 3), np.uint8)
        image[:, :24] = colour
        Image.fromarray(image).save(root / f"{name}.png")
    return root


def request(project: Path, **overrides) -> GenerateRequest:
    base = dict(prompts=["a red ball rolls"], out=project / "out" / "video.mp4", frames=8, height=64, width=64, steps=3, device="cpu",
                folders={name: project / "models" / name for name in ("unet", "decoder", "controlnet")}, latents=project / "data" / "latents")
    return GenerateRequest(**{**base, **overrides})


@pytest.mark.parametrize("control", ["canny", "depth"])
def test_controlled_mp4_reads_back_with_the_requested_frames_and_size(project, monkeypatch, fixture_videos, control):
    monkeypatch.chdir(project)
    paths = generate(request(project, control=control, control_path=str(fixture_videos / VIDEO), frames=6, height=64, width=96), Params())
    assert paths == [project / "out" / "video.mp4"]
    reader = decord.VideoReader(str(paths[0]))
    assert len(reader) == 6 and reader[0].shape == (64, 96, 3)
    assert Image.open(paths[0].with_suffix(".gif")).n_frames == 6
    assert not list((project / "out").glob(".generate-*"))  # the staging folder is gone


def test_a_seed_gives_the_same_video_and_control_and_style_change_it(project, fixture_videos):
    from tasks.inference.conditions import ConditionExtractor, ConditionSettings, style_embeddings
    from tasks.inference.generate import control_frames, read_image

    generator = VideoGenerator(project / "models" / "unet", project / "models" / "decoder", project / "data" / "latents", CacheLatentsParams(),
                               controlnet_dir=project / "models" / "controlnet")
    settings = dict(frames=8, height=64, width=64, steps=3, guidance_scale=7.5)
    canny = ConditionExtractor(ConditionSettings())("canny", control_frames(str(fixture_videos / VIDEO), 8, 8.0, 64, 64))[None]
    other = ConditionExtractor(ConditionSettings())("canny", control_frames(str(fixture_videos / "pancake_426x240_30fps.mkv"), 8, 8.0, 64, 64))[None]
    first = generator(["a red ball"], [3], control=canny, control_type="canny", **settings)
    assert np.array_equal(first, generator(["a red ball"], [3], control=canny, control_type="canny", **settings))
    assert not np.array_equal(first, generator(["a red ball"], [3], control=other, control_type="canny", **settings))
    plain = generator(["a red ball"], [3], **settings)
    assert not np.array_equal(first, plain)
    assert np.array_equal(plain, generator(["a red ball"], [3], control=canny, control_type="canny", control_scale=0.0, **settings))
    encoder = load_style_encoder("ViT-B-32", "", 0, allow_random=True)
    red, blue = (style_embeddings(encoder, read_image(project / f"{name}.png", 224, 224)[None]) for name in ("red", "blue"))
    assert not np.array_equal(generator(["a red ball"], [3], style_embedding=red, **settings), generator(["a red ball"], [3], style_embedding=blue, **settings))


def test_prompts_file_batches_and_style_through_the_command_line(project, monkeypatch, fixture_videos, capsys):
    monkeypatch.chdir(project)
    (project / "prompts.txt").write_text("a red ball rolls\n\na blue cube slides\n")
    (project / "params.yaml").write_text("preset: smoke\n")
    code = cli(["generate", "--prompts-file", "prompts.txt", "--out", "many/clip.mp4", "--steps", "2", "--batch-size", "2",
                "--style", "red.png", "--control", "image", "--control-video", "blue.png", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    assert sorted(path.name for path in (project / "many").iterdir()) == ["clip_000.gif", "clip_000.mp4", "clip_001.gif", "clip_001.mp4"]
    assert len(decord.VideoReader(str(project / "many" / "clip_001.mp4"))) == clip_shape("smoke")[0]


@pytest.mark.parametrize("argv, message", [
    (["--control", "canny", "--control-video", "missing.mp4"], "--control-video missing.mp4: not found"),
    (["--control", "sketch", "--control-video", "red.png"], "unknown condition 'sketch'"),
    (["--control", "canny"], "needs --control-video"),
    (["--control", "canny", "--control-video", "short.mov"], "fewer than 8 frames"),
    (["--style", "nope.png"], "--style nope.png: not found"),
    (["--control", "hed", "--control-video", "red.png"], "trained on canny, depth, image only"),
    (["--out", "video.avi"], "ending in .mp4"),
    (["--steps", "0"], "--steps must be positive"),
    # each of these used to fail only after generating (or, --cfg nan, exit 0 with a black video)
    (["--out", "folder.mp4"], "--out folder.mp4: is a folder"),
    (["--out", "red.png/video.mp4"], "cannot write under"),
    (["--fps", "0"], "--fps 0.0: must be a number from 1 to 240"),
    (["--cfg", "nan"], "--cfg nan: must be a finite number >= 0"),
    (["--style", "huge.png"], "--style huge.png: "),
])
def test_bad_inputs_give_clear_errors_and_write_nothing(project, monkeypatch, fixture_videos, capsys, argv, message):
    monkeypatch.chdir(project)
    (project / "params.yaml").write_text("preset: smoke\n")
    if not (project / "short.mov").exists():
        (project / "short.mov").symlink_to(fixture_videos / "rotated90_3frames.mov")
        (project / "folder.mp4").mkdir()
        write_png_header(project / "huge.png", 20000, 20000)
    out = ["--out", "bad/video.mp4"] if "--out" not in argv else []
    assert cli(["generate", "--prompt", "a ball", *out, "--device", "cpu", *argv]) == 1
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error
    assert not (project / "bad").exists() and not list((project / "folder.mp4").iterdir())


def write_png_header(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height pixels (its image data is empty): what a reader
    sees before decoding, without allocating the 1.2 GB such an image would take."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_a_corrupt_weight_file_is_named_before_any_model_loads(project, monkeypatch, capsys):
    """A truncated model.safetensors used to surface as a raw SafetensorError from the loader."""
    monkeypatch.chdir(project)
    (project / "params.yaml").write_text("preset: smoke\n")
    broken = project / "broken_unet"
    shutil.copytree(project / "models/unet", broken, dirs_exist_ok=True)
    weights = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    assert cli(["generate", "--prompt", "a ball", "--out", "bad/video.mp4", "--unet", "broken_unet", "--device", "cpu"]) == 1
    assert "broken_unet/model.safetensors: truncated" in capsys.readouterr().err
    (broken / "model.safetensors").write_text("<html>404 Not Found</html>")
    assert cli(["generate", "--prompt", "a ball", "--out", "bad/video.mp4", "--unet", "broken_unet", "--device", "cpu"]) == 1
    assert "broken_unet/model.safetensors: not a safetensors file" in capsys.readouterr().err
    assert not (project / "bad").exists()


def test_the_registered_pyfunc_model_generates_what_the_local_models_do(project, monkeypatch, tmp_path, mlflow_api, prefect_api):
    """The pipeline's register task on a real MLflow server (artifacts uploaded through its proxy),
    then `mlflow.pyfunc.load_model("models:/NAME@champion")` with the project's models moved away:
    the registered model carries everything it needs, checks its input against its signature, and
    generates exactly what the local folders generate for the same prompts and seeds; `generate
    --model` steers it with the registered ControlNet."""
    import mlflow.pyfunc
    import pandas as pd
    from mlflow import MlflowClient
    from prefect import flow
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.pipeline import register_model
    from tasks.operations.lineage import start_run

    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_api["MLFLOW_TRACKING_URI"])
    (project / "params.yaml").write_text("preset: smoke\n")
    client = MlflowClient(mlflow_api["MLFLOW_TRACKING_URI"])
    run_id = start_run(client, mlflow_api["MLFLOW_TRACKING_URI"], "evaluate", {})
    (project / "reports").mkdir(exist_ok=True)
    (project / "reports" / "eval.json").write_text(json.dumps({"mlflow_run_id": run_id, "protocols": {"heldout": {"fvd": 10.0}}}))

    @flow
    def register():
        return register_model("heldout/fvd", True, "generate-test")

    with temporary_settings({PREFECT_API_URL: prefect_api["PREFECT_API_URL"]}):
        decision = register()
    assert decision == {"model": "generate-test", "version": "1", "promoted": True, "reason": decision["reason"]}

    prompts = pd.DataFrame({"prompt": ["a red ball rolls", "a red ball rolls"], "seed": [3, 4], "steps": [3, 3]})
    (project / "models").rename(project / "models-away")
    try:
        model = mlflow.pyfunc.load_model("models:/generate-test@champion")  # the registry MLFLOW_TRACKING_URI names
        videos = model.predict(prompts)
        with pytest.raises(Exception, match="prompt"):
            model.predict(pd.DataFrame({"seed": [1]}))  # the signature requires a prompt
    finally:
        (project / "models-away").rename(project / "models")
    assert [spec.name for spec in model.metadata.signature.inputs.inputs] == ["prompt", "seed", "steps"]
    assert videos.shape == (2, 8, 64, 64, 3) and videos.dtype == np.uint8 and not np.array_equal(videos[0], videos[1])
    local = VideoGenerator(project / "models" / "unet", project / "models" / "decoder", project / "data" / "latents", CacheLatentsParams())
    for video, seed in zip(videos, (3, 4)):  # one at a time, as the model does (a batch may round differently)
        expected = local(["a red ball rolls"], [seed], frames=8, height=64, width=64, steps=3, guidance_scale=local.preset.diffusion.guidance_scale)
        assert np.array_equal(video, expected[0])

    registered = generate(request(project, model="models:/generate-test@champion", control="image", control_path="red.png", out=tmp_path / "a.mp4"), Params())
    local_file = generate(request(project, control="image", control_path="red.png", out=tmp_path / "b.mp4"), Params())
    assert registered[0].read_bytes() == local_file[0].read_bytes()  # the same weights and seed: the same file
    with pytest.raises(ValueError, match="not found in the MLflow registry"):
        generate(request(project, model="models:/nothing@champion", out=tmp_path / "d.mp4"), Params())
