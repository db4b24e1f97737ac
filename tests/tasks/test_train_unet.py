"""train_unet on the engine: the step recipe, worker-kill resume, and 1 vs 2 workers."""

import contextlib
import hashlib
import json
import shutil
import threading
import time
from pathlib import Path

import boto3
import numpy as np
import pandas as pd
import psutil
import pytest
import ray
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from model.mec import MEC, MECPaths
from model.moe_attention import MoEFeedForward
from tasks.config.params import CacheLatentsParams, Params, TrainUnetParams
from tasks.inference.models import load_unet
from tasks.preprocessing.synthetic_latents import synthetic_cache
from tasks.storage.clip_shards import held_out_videos
from tasks.storage.latent_shards import latent_dataset, read_index, read_latent_shard, shard_fingerprint, shard_name, write_latent_shard
from tasks.training.unet import UNetRecipe, train_unet

FRAMES, SIZE, WIDTH = 8, 8, 64  # the smoke preset's latent clip and context width


@pytest.fixture(scope="module")
def latents_dir(tmp_path_factory):
    """A cache in the stage's format: blobs moving one latent cell per frame (learnable, with motion)."""
    return synthetic_cache(tmp_path_factory.mktemp("cache") / "latents", frames=FRAMES, size=SIZE, width=WIDTH)


def recipe(**train) -> UNetRecipe:
    return UNetRecipe("smoke", TrainUnetParams(**train), np.zeros((77, WIDTH), np.float16), ["a blob moves"], CacheLatentsParams(smoke_vae_fit_steps=0), (FRAMES, 8 * SIZE, 8 * SIZE))


@pytest.mark.parametrize("paths, spatial, temporal", [("ste,ce,me", 4, 2), ("2d+1d,ste,ce", 2, 2), ("", 1, 1)])
def test_an_ablation_trains_exports_and_loads_back_as_that_architecture(paths, spatial, temporal, tmp_path):
    """Tables 2 and 5 through params: the recipe builds the ablated UNet (the switched-off MEC
    paths and experts are absent, not idle), the export records it, and load_unet rebuilds
    exactly that network: the weights load strictly and give the trained model's output."""
    ablated = recipe(mec_paths=paths, spatial_experts=spatial, temporal_experts=temporal)
    torch.manual_seed(0)
    model = ablated.build().train()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    mecs = [module for module in model.modules() if isinstance(module, MEC)]
    assert all((mec.me is None) == ("me" not in paths) and (mec.temporal is None) == ("2d+1d" not in paths) for mec in mecs)
    moe_experts = sorted({module.num_experts for module in model.modules() if isinstance(module, MoEFeedForward)})
    assert moe_experts == sorted({spatial, temporal} - {1})
    full = recipe().build()
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in full.parameters())
    ablated.export(model, tmp_path)
    loaded, preset = load_unet(tmp_path)
    assert preset == "smoke" and loaded.config.mec_paths == MECPaths.from_names(paths)
    x, t, context = torch.randn(1, 4, FRAMES, SIZE, SIZE), torch.tensor([400]), torch.randn(1, 77, WIDTH)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, context), model.eval()(x, t, context), atol=1e-5, rtol=1e-4)


# what t = 1 skips (section 3.1: images train the spatial layers only): the temporal attention and
# its MoE, and every temporal path of the MEC convolutions (shift, excitations, the 1-D conv)
TEMPORAL_PARAMETERS = ("attn_temporal", "ff_temporal", "norm_temporal", "norm_ff_t", ".shift.", ".ste.", ".ce.", ".me.", ".temporal.")


@pytest.mark.parametrize("frames", [1, FRAMES])
def test_images_reach_only_the_spatial_parameters_and_clips_reach_all(frames):
    unet_recipe = recipe()
    torch.manual_seed(0)
    model = unet_recipe.build()
    with torch.no_grad():  # off the zero-initialised output layer, so gradients reach every layer
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    batch = {"latents": torch.randn(2, frames, 4, SIZE, SIZE), "context": torch.randn(2, 77, WIDTH)}
    unet_recipe.loss(model, batch, 0, torch.Generator().manual_seed(0)).backward()
    reached = {name for name, param in model.named_parameters() if param.grad is not None and bool(param.grad.abs().sum() > 0)}
    temporal = {name for name, _ in model.named_parameters() if any(part in name for part in TEMPORAL_PARAMETERS)}
    everything = {name for name, _ in model.named_parameters()}
    assert temporal and len(temporal) < len(everything)
    assert reached == (everything - temporal if frames == 1 else everything)


def test_a_step_reads_images_before_the_clips_weighted_by_image_share():
    assert recipe(image_share=0.25, image_batch_size=2, batch_size=6).streams() == {"images": (2, 0.25), "train": (6, 0.75)}
    assert list(recipe(image_share=0.25, image_batch_size=2).streams())[-1] == "train"  # the videos' backward syncs: every parameter
    assert recipe(image_share=0.0, image_batch_size=0).streams() == {"train": (6, 1.0)}


def test_after_each_optimizer_step_experts_move_towards_each_other():
    unet_recipe = recipe(expert_exchange_rate=0.1)
    model = unet_recipe.build()
    moe = next(module for module in model.modules() if isinstance(module, MoEFeedForward))
    torch.nn.init.normal_(moe.w1)
    spread = float((moe.w1 - moe.w1.mean(0)).norm())
    unet_recipe.after_optimizer_step(model)
    n = moe.num_experts  # eq. 7-8: deviations from the mean shrink by 1 - lambda * n / (n - 1)
    assert float((moe.w1 - moe.w1.mean(0)).norm()) == pytest.approx(spread * (1 - 0.1 * n / (n - 1)), rel=1e-4)


def params_for(**train) -> Params:
    base = dict(steps=30, batch_size=4, checkpoint_every=10, sample_every=0, sample_count=1, sample_steps=2, warmup_steps=5, lr=5e-4, shuffle_buffer=16, num_workers=1, held_out_share=0.0)  # the synthetic cache is one video
    return Params(train_unet=TrainUnetParams(**{**base, **train}), cache_latents=CacheLatentsParams(smoke_vae_fit_steps=0))


def loss_history(run_id: str) -> list[tuple[int, float]]:
    client = MlflowClient()
    return sorted((metric.step, metric.value) for metric in client.get_metric_history(run_id, "loss"))


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}")
        yield


@pytest.fixture(scope="module")
def ddp_two_workers(latents_dir, tracking, ray_session, tmp_path_factory) -> dict:
    """The reference run: DDP on two CPU workers (gloo), 30 steps of 2 clips + 1 image each, uninterrupted,
    exporting an EMA of the weights (which leaves the losses alone)."""
    folder = tmp_path_factory.mktemp("ddp")
    metrics = train_unet(params_for(batch_size=2, image_batch_size=1, num_workers=2, ema_decay=0.9), latents=latents_dir, output_dir=folder / "unet", runs=folder / "runs", run_name="ddp")
    return {**metrics, "weights": load_file(str(folder / "unet" / "model.safetensors"))}


def test_two_workers_match_one_worker_with_twice_the_batch(ddp_two_workers, latents_dir, tmp_path):
    one = train_unet(params_for(batch_size=4, image_batch_size=2, num_workers=1), latents=latents_dir, output_dir=tmp_path / "one", runs=tmp_path / "runs", run_name="one")
    curve_one = np.array([value for _, value in loss_history(one["mlflow_run_id"])]).reshape(3, 10).mean(1)
    curve_two = np.array([value for _, value in loss_history(ddp_two_workers["mlflow_run_id"])]).reshape(3, 10).mean(1)
    # Same global batch and seed, different sampling of clips, noise and timesteps per worker: the
    # 10-step means agree to within the run-to-run noise of this tiny setup (measured: < 15%).
    np.testing.assert_allclose(curve_two, curve_one, rtol=0.3)
    assert curve_one[-1] < curve_one[0] and curve_two[-1] < curve_two[0]
    client = MlflowClient()
    for run_id in (one["mlflow_run_id"], ddp_two_workers["mlflow_run_id"]):  # (4 + 2) x 1 x 1 = (2 + 1) x 1 x 2
        assert client.get_run(run_id).data.params["train_unet.global_batch"] == "6"
        # every step of both runs took 4 clips and 2 images (over all workers); each stream's loss is logged beside the total
        for stream, rows in (("train", 4), ("images", 2)):
            assert [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, f"rows/{stream}"), key=lambda m: m.step)] == [(step, rows) for step in range(1, 31)]
        total = dict(loss_history(run_id))
        parts = {stream: {m.step: m.value for m in client.get_metric_history(run_id, f"loss/{stream}")} for stream in ("train", "images")}
        if run_id == one["mlflow_run_id"]:  # one worker: its parts are the whole step's
            assert all(total[step] == pytest.approx(0.75 * parts["train"][step] + 0.25 * parts["images"][step], rel=1e-4) for step in total)
    # each worker tags the node it ran on: the cluster's (one) node, once per rank
    node_ids = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    for run_id, world in ((one["mlflow_run_id"], 1), (ddp_two_workers["mlflow_run_id"], 2)):
        worker_nodes = {key: value for key, value in client.get_run(run_id).data.tags.items() if key.startswith("ray.node_id.rank")}
        assert sorted(worker_nodes) == [f"ray.node_id.rank{rank}" for rank in range(world)] and set(worker_nodes.values()) <= node_ids
    assert json.loads((tmp_path / "one" / "config.json").read_text())["global_batch"] == 6
    # sample_every=0: one sample, at the end, as MP4 and GIF artifacts of the run
    folders = [item.path for item in client.list_artifacts(one["mlflow_run_id"], "samples")]
    assert folders == ["samples/step_0000030"]
    assert sorted(item.path.rsplit("/", 1)[1] for item in client.list_artifacts(one["mlflow_run_id"], folders[0])) == ["sample0_a_blob_moves.gif", "sample0_a_blob_moves.mp4"]
    # checkpoints and weights stay on disk: the run records where, and each file's sha256
    assert [item.path for item in client.list_artifacts(one["mlflow_run_id"])] == ["samples"]
    tags = client.get_run(one["mlflow_run_id"]).data.tags
    checkpoint = Path(tags["checkpoint.path"])
    assert checkpoint.parent.parent == tmp_path / "runs" and json.loads((checkpoint / "state.json").read_text())["step"] == 30
    recorded = {key.removeprefix("checkpoint.sha256."): value for key, value in tags.items() if key.startswith("checkpoint.sha256.")}
    assert recorded == {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in checkpoint.iterdir() if path.is_file()} and "model.safetensors" in recorded
    assert tags["weights.path"] == str(tmp_path / "one")
    assert tags["weights.sha256.model.safetensors"] == hashlib.sha256((tmp_path / "one" / "model.safetensors").read_bytes()).hexdigest()


def test_fsdp_killed_and_rerun_continues_the_uninterrupted_ddp_run_exactly(ddp_two_workers, latents_dir, object_store, tmp_path):
    """FSDP shards the same model over the same two workers: the same seed gives the same losses.
    Its run is interrupted twice: a worker is killed after the first checkpoint (Ray Train
    restarts the group from it), and the first call stops at step 20 while a second call with the
    same run name (a new driver, as after a crash) resumes there. Restored weights, EMA, optimizer
    state, RNG streams and data position make the history the uninterrupted run's, step for step,
    and the exported EMA weights the same. The run folders live in the object store (S3 on
    127.0.0.1), as on a cluster whose nodes share no disk: checkpoints are written, found and
    restored there."""
    runs = f"{object_store['bucket']}/runs-{tmp_path.name}"
    bucket = boto3.client("s3")
    killed = []

    def checkpoint_keys() -> list[str]:
        listing = bucket.list_objects_v2(Bucket=runs.split("/")[2], Prefix=runs.split("/", 3)[3] + "/")
        return [item["Key"] for item in listing.get("Contents", [])]

    def kill_a_worker_after_the_first_checkpoint():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            if any("/checkpoint_" in key for key in checkpoint_keys()):
                # this session's local Ray only (its raylet is our child): never another run's worker on the machine
                for process in psutil.Process().children(recursive=True):
                    with contextlib.suppress(psutil.Error):  # a process that ended while we looked
                        if "RayTrainWorker" in " ".join(process.cmdline()):
                            process.kill()
                            killed.append(process.pid)
                            return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_a_worker_after_the_first_checkpoint, daemon=True)
    killer.start()
    first = train_unet(params_for(steps=20, batch_size=2, image_batch_size=1, num_workers=2, ema_decay=0.9, strategy="fsdp"), latents=latents_dir, output_dir=tmp_path / "unet", runs=runs, run_name="fsdp")
    killer.join()
    assert killed, "no training worker was found to kill"
    assert [step for step, _ in loss_history(first["mlflow_run_id"])] == list(range(1, 21))

    metrics = train_unet(params_for(steps=30, batch_size=2, image_batch_size=1, num_workers=2, ema_decay=0.9, strategy="fsdp"), latents=latents_dir, output_dir=tmp_path / "unet", runs=runs, run_name="fsdp")
    assert metrics["mlflow_run_id"] == first["mlflow_run_id"]  # one MLflow run, one continuous history
    history, reference = loss_history(metrics["mlflow_run_id"]), loss_history(ddp_two_workers["mlflow_run_id"])
    assert [step for step, _ in history] == list(range(1, 31))  # no step twice, none missing
    np.testing.assert_allclose([value for _, value in history], [value for _, value in reference], rtol=1e-4)
    assert metrics["steps"] == 30 and metrics["loss_last_10pct"] < metrics["loss_first_10pct"]
    assert not list(tmp_path.glob("**/checkpoint_*")) and any(key.endswith("/model.safetensors") for key in checkpoint_keys())  # in the bucket only
    tags = MlflowClient().get_run(metrics["mlflow_run_id"]).data.tags
    assert tags["checkpoint.path"].startswith(f"{runs}/fsdp/checkpoint_") and tags["checkpoint.sha256.state.json"]
    exported = load_file(str(tmp_path / "unet" / "model.safetensors"))
    assert exported.keys() == ddp_two_workers["weights"].keys()
    for name, tensor in exported.items():  # float noise of different reduction orders (measured: < 1e-3)
        torch.testing.assert_close(tensor, ddp_two_workers["weights"][name], rtol=0, atol=2e-3, msg=name)


def test_held_out_videos_never_reach_training(tmp_path, ray_session):
    """Rows of held-out videos are dropped when shards are read; the rest stream through whole."""
    folder = synthetic_cache(tmp_path / "latents", frames=2, size=8, width=WIDTH)
    index = read_index(folder)
    assert held_out_videos(index, share=0.0, seed=0) == frozenset()
    index["video_id"] = [f"v{k % 5}" for k in range(len(index))]  # five videos instead of one
    held = held_out_videos(index, share=0.3, seed=0)
    assert held and len(held) < 5 and held == held_out_videos(index, share=0.3, seed=0)  # seeded: the same draw
    kept = latent_dataset(folder, exclude_videos=frozenset({"synthetic"}))  # the cache's own video id: every row goes
    assert kept.count() == 0 and latent_dataset(folder).count() == len(index)


def poisoned_cache(source, folder, every: int):
    """A copy of the cache at `source` where every `every`-th clip's latents are NaN, as a corrupt
    latent shard would give."""
    shutil.copytree(source, folder)
    index = read_index(folder)
    for shard, rows in index.groupby("shard"):
        path = folder / shard_name(int(shard))
        tensors = read_latent_shard(path)
        latents = tensors["latents"].copy()
        latents[::every] = np.nan
        write_latent_shard(path, rows.sort_values("shard_row"), latents, tensors["context"], shard_fingerprint(path))
    return folder


def test_non_finite_losses_skip_the_step_on_every_worker_and_abort_when_they_persist(latents_dir, tracking, tmp_path):
    """Clips with NaN latents give a NaN loss on one worker: both skip the step (the loss is
    checked across workers, or DDP would hang), count it and go on; the logged losses and the
    exported weights stay finite. The run accumulates gradients over 2 micro-steps of 1 clip
    each, so a bad clip can come in either micro-step, with or without DDP's gradient sync held
    back. When every clip is bad, the run stops after max_bad_steps + 1 in a row, saying what to
    do."""
    some_bad = poisoned_cache(latents_dir, tmp_path / "some_bad", every=24)
    metrics = train_unet(params_for(batch_size=1, grad_accum=2, num_workers=2), latents=some_bad, output_dir=tmp_path / "unet", runs=tmp_path / "runs", run_name="some_bad")
    history = loss_history(metrics["mlflow_run_id"])
    assert [step for step, _ in history] == list(range(1, 31)) and np.isfinite([value for _, value in history]).all()
    assert 1 <= metrics["skipped_steps"] <= 15
    assert all(torch.isfinite(tensor).all() for tensor in load_file(str(tmp_path / "unet" / "model.safetensors")).values())

    all_bad = poisoned_cache(latents_dir, tmp_path / "all_bad", every=1)
    with pytest.raises(Exception, match=r"3 non-finite losses in a row at step 0: lower the learning rate or check the data \(max_bad_steps=2\)"):
        train_unet(params_for(max_bad_steps=2, max_failures=0), latents=all_bad, output_dir=tmp_path / "never", runs=tmp_path / "runs", run_name="all_bad")
    assert not (tmp_path / "never" / "model.safetensors").exists()
    failed = MlflowClient().search_runs([MlflowClient().get_run(metrics["mlflow_run_id"]).info.experiment_id], filter_string="attributes.run_name = 'all_bad'")
    assert [run.info.status for run in failed] == ["FAILED"]


class ColourReader(torch.nn.Module):
    """A denoiser that reads the colour word of a demo caption and nothing else: its x0 is the
    latent drawn for that colour, from which it returns v exactly (v = (a z_t - x0) / s)."""

    def __init__(self, templates: dict[str, torch.Tensor], colour_states: dict[str, torch.Tensor], schedule) -> None:
        super().__init__()
        self.templates, self.colour_states, self.schedule = templates, colour_states, schedule
        self.scale = torch.nn.Parameter(torch.ones(()))  # caption_reading asks for the model's device

    def forward(self, z_t, timesteps, context):
        # the causal text tower's state at the colour word (token 2) depends on "a COLOUR" alone
        names = [min(self.colour_states, key=lambda c: float((state[2] - self.colour_states[c]).norm())) for state in context]
        x0 = torch.stack([self.templates[name] for name in names])
        a, s = self.schedule._coefficients(timesteps, z_t)
        return (a * z_t - x0) / s * self.scale


def test_caption_reading_sees_the_words_a_model_reads_and_no_others(tmp_path):
    """The check on held-out clips: a model that reads the colour alone has a positive colour
    gap (interval above 0) and a direction and shape gap of exactly 0, since the swapped captions
    share the noise and timesteps; a model blind to its context reads nothing."""
    from eval.caption_probe import PALETTE
    from model.diffusion import Schedule
    from model.presets import get_preset
    from tasks.inference.encoders import encode_captions, load_text
    from tasks.training.unet import caption_reading

    encoders = CacheLatentsParams(smoke_vae_fit_steps=0)
    text, tokenizer = load_text(encoders)
    rng = np.random.default_rng(0)
    templates = {c: torch.from_numpy(rng.standard_normal((4, FRAMES, SIZE, SIZE)).astype(np.float32)) for c in PALETTE}
    colour_states = {c: torch.from_numpy(encode_captions(text, tokenizer, [f"a {c}"]).astype(np.float32))[0, 2] for c in PALETTE}
    captions = [f"a {c} {s} moves {d} on a striped background" for c, s, d in zip(list(PALETTE) * 2, ["circle", "square", "triangle"] * 4, ["left", "up", "down", "right"] * 3)]
    captions.append("a red circle stays still on a dotted background")  # has no direction to swap
    latents = np.stack([templates[caption.split()[1]].permute(1, 0, 2, 3).numpy() for caption in captions])  # cache layout (t, c, h, w)
    rows = pd.DataFrame({"clip_id": [f"c{k}" for k in range(len(captions))], "video_id": [f"v{k}" for k in range(len(captions))], "caption": captions})
    folder = tmp_path / "latents"
    folder.mkdir()
    write_latent_shard(folder / shard_name(0), rows, latents, encode_captions(text, tokenizer, captions), fingerprint="test")
    rows = rows.assign(shard=0, shard_row=np.arange(len(rows)))

    diffusion = get_preset("smoke").diffusion
    reader = ColourReader(templates, colour_states, Schedule(diffusion))
    report = caption_reading(reader, diffusion, folder, rows, encoders, seed=0, draws=2)
    assert report["color"]["reads"] and report["color"]["gap_low"] > 0 and report["color"]["loss_true"] < 1e-6
    assert report["color"]["clips"] == len(captions) and report["direction"]["clips"] == len(captions) - 1
    for word in ("shape", "direction"):
        assert report[word]["gap"] == 0 and not report[word]["reads"]

    class Blind(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = torch.nn.Parameter(torch.zeros(()))

        def forward(self, z_t, timesteps, context):
            return z_t * 0.5 + self.bias

    blind = caption_reading(Blind(), diffusion, folder, rows, encoders, seed=0, draws=2)
    assert all(figures["gap"] == 0 and not figures["reads"] for figures in blind.values())
