"""cache_latents on clips decoded from the real fixture videos: values, resume after the flow running it
is killed, reader."""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import ray
import torch
import yaml
from diffusers import AutoencoderKL
from safetensors.torch import save_file

from eval.caption_probe import CHANCE, agreement, probe
from model.image_vae import build_tiny_image_vae, decode_latents, encode_posterior, frames_to_pixels, load_image_vae, pixels_to_frames
from model.text_encoder import TINY_TEXT_CONFIG, build_text_encoder, tokenizer_for
from tasks.config.params import CacheLatentsParams, DecodeParams, Params, load_params, require_pretrained_weights
from tasks.inference.encoders import clip_noise_seed
from tasks.preprocessing.smoke_vae import fit_smoke_vae
from tasks.preprocessing.synthetic import render
from tasks.stages.cache_latents import main as cache_latents_stage
from tasks.storage.clip_shards import shard_name as clip_shard_name
from tasks.storage.latent_shards import latent_dataset, read_latent_shard, shard_name

REPO = Path(__file__).resolve().parents[2]


def test_cached_latents_are_the_vaes_encoding_of_each_clip(clips_dir, cached):
    index, status, out, cfg = cached
    assert list(status["status"]) == ["encoded"] * 3 and status["clips"].sum() == len(index)

    vae = build_tiny_image_vae(seed=cfg.seed)
    text = build_text_encoder(TINY_TEXT_CONFIG, seed=cfg.seed)
    tokenizer = tokenizer_for("ViT-L-14")
    for shard, rows in index.groupby("shard"):
        rows = rows.sort_values("shard_row")
        cache = read_latent_shard(out / shard_name(shard), ("clip_id", "latents", "context"))
        assert list(cache["clip_id"]) == list(rows["clip_id"])  # one row per clip, in order
        assert cache["latents"].shape == (len(rows), 8, 4, 64 // 8, 64 // 8) and cache["latents"].dtype == np.float16
        clips = np.load(clips_dir / clip_shard_name(shard))
        for k, (clip, clip_id) in enumerate(zip(clips, rows["clip_id"])):
            # encode directly: z = mean + std * eps, eps from the clip's own seed (LDM's posterior sample)
            mean, std = encode_posterior(vae, frames_to_pixels(clip), micro_batch=8)
            eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(clip_noise_seed(cfg.seed, clip_id)))
            direct = mean + std * eps
            latents = torch.from_numpy(cache["latents"][k].astype(np.float32))
            torch.testing.assert_close(latents, direct, rtol=2e-3, atol=2e-3)  # fp16 storage
            assert not torch.allclose(latents, mean, atol=1e-2)  # a sample, not the mean
            # decoding the cached latent gives what decode(encode(clip)) gives, to a grey level
            from_cache = decode_latents(vae, latents, micro_batch=8)
            from_direct = decode_latents(vae, direct, micro_batch=8)
            assert (from_cache - from_direct).abs().max() * 127.5 < 1.0
        with torch.no_grad():
            expected_context = text(tokenizer(list(rows["caption"])))
        torch.testing.assert_close(torch.from_numpy(cache["context"].astype(np.float32)), expected_context, rtol=2e-3, atol=2e-3)


def test_reader_streams_every_cached_clip_once_per_epoch_in_shuffled_order(cached):
    _, _, out, _ = cached
    expected = np.concatenate([read_latent_shard(out / shard_name(s))["latents"] for s in range(3)])
    batches = list(latent_dataset(out, seed=1).iter_torch_batches(batch_size=4, local_shuffle_buffer_size=4, local_shuffle_seed=0))
    latents = torch.cat([b["latents"] for b in batches])
    assert latents.shape == (6, 8, 4, 8, 8) and latents.dtype == torch.float16
    assert [tuple(b["context"].shape[1:]) for b in batches] == [(77, 64)] * len(batches)
    assert sorted(latents.float().flatten(1).sum(1).tolist()) == pytest.approx(sorted(expected.astype(np.float32).reshape(6, -1).sum(1).tolist()), rel=1e-4)


def test_random_init_is_smoke_only():
    require_pretrained_weights(Params(preset="smoke"), "cache_latents")
    with pytest.raises(FileNotFoundError, match="^cache_latents.vae_weights, cache_latents.text_weights: required for preset L"):
        require_pretrained_weights(Params(preset="L"), "cache_latents")
    with pytest.raises(FileNotFoundError, match="^cache_latents.text_weights: required for preset H"):
        require_pretrained_weights(Params(preset="H", cache_latents=replace(CacheLatentsParams(), vae_weights="vae.ckpt")), "cache_latents")


@pytest.fixture(scope="module")
def slow_vae_folder(tmp_path_factory):
    """A KL-f8 VAE at half SD's width (random weights) in the diffusers folder layout: the real
    loading code, and slow enough on one CPU core (~0.4 s a clip) that a kill lands between shards."""
    folder = tmp_path_factory.mktemp("vae")
    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(64, 128, 256, 256), layers_per_block=2, latent_channels=4)
    (folder / "config.json").write_text(json.dumps(dict(vae.config)))
    save_file({k: v.half().contiguous() for k, v in vae.state_dict().items()}, str(folder / "diffusion_pytorch_model.safetensors"))
    return folder


def workspace(root: Path, clips_dir: Path, vae: Path) -> Path:
    shutil.copytree(clips_dir, root / "data" / "clips")
    params = {"preset": "smoke", "cache_latents": {"vae_weights": str(vae), "num_workers": 1}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def pipeline_workspace(root: Path, clips_dir: Path, vae: Path) -> Path:
    """A project the Prefect flow can run cache_latents in: the code, dvc.yaml, git and DVC."""
    workspace(root, clips_dir, vae)
    params = yaml.safe_load((REPO / "params.yaml").read_text())  # dvc.yaml reads keys of every section
    params["cache_latents"].update(vae_weights=str(vae), num_workers=1)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for name in ("dvc.yaml", "tasks", "model", "eval", "flows"):
        source = REPO / name
        (shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__")) if source.is_dir() else shutil.copy(source, root / name))
    for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(command, cwd=root, check=True)
    return root


def flow_command():
    return [sys.executable, "-m", "flows.cli", "pipeline", "--stages", "cache_latents"]


def stage_env():
    """This environment with `versvideo` on PATH (for dvc's cmd) and none of the outer shell's
    RAY_ADDRESS or PREFECT_API_URL: each test says which Ray and Prefect a stage or flow uses."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PREFECT_API_URL")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return {**env, "PYTHONPATH": str(REPO)}


def kill_tree(process: subprocess.Popen) -> None:
    """A crash: the flow and everything under it (dvc, the stage) die at once; Ray then ends the
    stage's job on the cluster (its encoder actor with it)."""
    driver = psutil.Process(process.pid)
    tree = [driver, *driver.children(recursive=True)]
    for member in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    psutil.wait_procs(tree, timeout=30)
    process.wait()


def test_killed_flow_keeps_the_previous_cache_and_resumes_without_recomputing_finished_shards(
        clips_dir, slow_vae_folder, tmp_path, monkeypatch, ray_session, prefect_api):
    """Issues 9 and 24: a cache exists; the inputs change (another posterior seed) and the flow
    rebuilding it is killed midway. The previous cache is still there byte for byte (readers
    never see a mix); the rerun keeps the shards the killed run finished and ends byte-identical
    to an uninterrupted run. The flow reports to a Prefect server and its stage works on this
    session's Ray, as on a cluster."""
    killed = pipeline_workspace(tmp_path / "killed", clips_dir, slow_vae_folder)
    latents = killed / "data" / "latents"
    monkeypatch.chdir(killed)
    set_cache_seed(killed, 1)
    cache_latents_stage(load_params("params.yaml"))  # the previous cache
    previous = file_bytes(latents)
    assert len(previous) == 6 + 3  # and the image stream's two shards + index under images/

    set_cache_seed(killed, 0)
    env = {**stage_env(), **prefect_api, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    log = tmp_path / "killed.log"  # a file, not a pipe: a full pipe would stall the flow
    process = subprocess.Popen(flow_command(), cwd=killed, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not list(killed.glob("data/.tmp-*-latents/latents-*.parquet")):
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "no shard finished within 300 s"
        time.sleep(0.05)
    kill_tree(process)
    [staging] = killed.glob("data/.tmp-*-latents")
    finished = {path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in staging.glob("latents-*.parquet")}
    assert 1 <= len(finished) < 3, f"kill landed {'after' if finished else 'before'} the work: {sorted(finished)}"
    assert file_bytes(latents) == previous  # the previous cache, whole

    rerun = subprocess.run(flow_command(), cwd=killed, env=env, capture_output=True, text=True)  # the same flow again
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-3000:]
    for name, identity in finished.items():  # finished shards were kept, not rewritten
        path = latents / name
        assert (path.stat().st_ino, path.stat().st_mtime_ns) == identity
    report = json.loads((killed / "reports" / "cache_latents.json").read_text())
    assert (report["shards_skipped"], report["shards_encoded"]) == (len(finished), 3 - len(finished))
    assert not list(killed.glob("data/.tmp-*")) and not list(latents.glob(".tmp-*"))
    assert "cache_latents" in yaml.safe_load((killed / "dvc.lock").read_text())["stages"]

    clean = workspace(tmp_path / "clean", clips_dir, slow_vae_folder)
    monkeypatch.chdir(clean)  # the uninterrupted run: the same stage, in this process's Ray
    cache_latents_stage(load_params("params.yaml"))
    names = sorted(file_bytes(clean / "data" / "latents"))
    assert names == ["encoders.json", "images/index.parquet", "images/latents-00000.parquet", "images/latents-00001.parquet", "index.parquet",
                     "latents-00000.parquet", "latents-00001.parquet", "latents-00002.parquet", "null_context.npy"]
    for name in names:  # byte for byte
        assert (latents / name).read_bytes() == (clean / "data" / "latents" / name).read_bytes(), name
    assert all((latents / name).read_bytes() != previous[name] for name in names if name.startswith("latents-"))  # the seed changed them all
    report = json.loads((clean / "reports" / "cache_latents.json").read_text())
    assert report["random_init"] is True and report["comparable"] is False and report["latent_shape"] == [8, 4, 8, 8]
    assert report["images"] == 4 and read_latent_shard(latents / "images" / "latents-00000.parquet")["latents"].shape == (2, 1, 4, 8, 8)

    monkeypatch.chdir(killed)  # a rerun with unchanged inputs links every shard of the cache in place
    inodes = {path.name: path.stat().st_ino for path in latents.glob("latents-*.parquet")}
    cache_latents_stage(load_params("params.yaml"))
    assert {path.name: path.stat().st_ino for path in latents.glob("latents-*.parquet")} == inodes
    assert json.loads((killed / "reports" / "cache_latents.json").read_text())["shards_skipped"] == 3


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def set_cache_seed(root: Path, seed: int) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["cache_latents"]["seed"] = seed
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_smoke_vae_fit_is_byte_identical_run_to_run_and_loads(clips_dir, tmp_path):
    """The smoke stand-in VAE: same clips, steps and seed give the same files (so the cache's
    fingerprints and bytes repeat), and the folder loads as a diffusers VAE."""
    cfg = CacheLatentsParams(smoke_vae_fit_steps=3)
    index = pd.read_parquet(clips_dir / "index.parquet")
    first = fit_smoke_vae(index, clips_dir, tmp_path / "a", cfg)
    second = subprocess.run(
        [sys.executable, "-c", f"import pandas as pd; from pathlib import Path; from tasks.preprocessing.smoke_vae import fit_smoke_vae; from tasks.config.params import CacheLatentsParams; "
         f"fit_smoke_vae(pd.read_parquet('{clips_dir / 'index.parquet'}'), Path('{clips_dir}'), Path('{tmp_path / 'b'}'), CacheLatentsParams(smoke_vae_fit_steps=3))"],
        env={**stage_env(), "PYTHONHASHSEED": "7"}, capture_output=True, text=True,
    )  # another process, another hash seed
    assert second.returncode == 0, second.stderr[-2000:]
    for name in ("config.json", "diffusion_pytorch_model.safetensors", "fit.json"):
        assert (first / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    fitted = load_image_vae(first, "x")
    assert not torch.equal(fitted.encoder.conv_in.weight, build_tiny_image_vae(seed=0).encoder.conv_in.weight)  # it trained
    # LDM's rule: the scale factor makes the cached latents unit-variance (SD's 0.18215 is SD's own)
    frames = np.concatenate([np.load(path) for path in sorted(clips_dir.glob("clips-*.npy"))]).reshape(-1, 64, 64, 3)
    mean, _ = encode_posterior(fitted, frames_to_pixels(frames), micro_batch=16)
    assert float(mean.std()) == pytest.approx(1.0, abs=0.15)

    # a rebuild of the cache takes the previous fit as it is (linked, not refitted) when nothing it
    # was fitted from changed, and refits when something did
    kept = fit_smoke_vae(index, clips_dir, tmp_path / "staging", cfg, previous=first)
    assert (kept / "diffusion_pytorch_model.safetensors").stat().st_ino == (first / "diffusion_pytorch_model.safetensors").stat().st_ino
    refitted = fit_smoke_vae(index, clips_dir, tmp_path / "other", replace(cfg, seed=1), previous=first)
    assert (refitted / "diffusion_pytorch_model.safetensors").read_bytes() != (first / "diffusion_pytorch_model.safetensors").read_bytes()


def test_the_fitted_smoke_vae_gives_back_the_demo_shapes_colour_and_motion(tmp_path):
    """What the smoke VAE is fitted for: the demo's clips decode from their latents with the
    moving shape's colour and direction intact (the caption probe reads them back), so the UNet's
    samples can be checked against their prompts at all. Fitted as cache_latents does, for the
    default steps, on clips of the demo world at the decoded size; probed on clips it was not
    fitted on. The tiny VAE unfitted reads no colour at all."""
    clips_dir = tmp_path / "clips"
    clips_dir.mkdir()
    frames, height, width = DecodeParams().frames, DecodeParams().height, DecodeParams().width

    def demo_clips(first: int, count: int) -> tuple[np.ndarray, list[str]]:
        drawn = [render(height, width, frames, np.random.default_rng([0, k]), static=False, cut_at=None) for k in range(first, first + count)]
        return np.stack([clip for clip, _ in drawn]), [caption for _, caption in drawn]

    fitted_on, _ = demo_clips(0, 64)
    np.save(clips_dir / clip_shard_name(0), fitted_on)
    folder = fit_smoke_vae(pd.DataFrame({"shard": [0]}), clips_dir, tmp_path / "vae", CacheLatentsParams())
    unseen, captions = demo_clips(1000, 24)

    def read_back(vae: AutoencoderKL) -> dict[str, float]:
        with torch.no_grad():
            decoded = [pixels_to_frames(decode_latents(vae, encode_posterior(vae, frames_to_pixels(clip), micro_batch=16)[0], micro_batch=16)) for clip in unseen]
        return agreement([probe(video) for video in decoded], captions)

    fitted = read_back(load_image_vae(folder, "x"))
    assert fitted["color"] >= 0.9 and fitted["direction"] >= 0.9, fitted
    assert read_back(build_tiny_image_vae(seed=0))["color"] <= CHANCE["color"]
