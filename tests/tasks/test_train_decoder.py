"""train_decoder: held-out split by video, the stage end to end on real fixture frames (both
decoders trained as long, the Table 3 comparison, MLflow), and the weights policy."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from tasks.config.params import PRESET_DEFAULTS, Params, TrainDecoderParams
from tasks.inference.models import IMAGE_DECODER, load_decoder
from tasks.stages.train_decoder import decoder_variants, train_decoder
from tasks.storage.clip_shards import read_clips, split_clips

SOURCES = ("h264_340x256_28fps.mp4", "mpeg4_320x240_25fps.avi", "pancake_426x240_30fps.mkv")


@pytest.fixture(scope="module")
def stage_inputs(tmp_path_factory, fixture_clip_reader):
    """data/clips in the decode stage's format (two clips of each of three fixture videos, two shards)
    and the encoders.json of a smoke cache (tiny random VAE)."""
    root = tmp_path_factory.mktemp("decoder")
    clips_dir, latents_dir = root / "clips", root / "latents"
    clips_dir.mkdir()
    latents_dir.mkdir()
    clips, rows = [], []
    for v, name in enumerate(SOURCES):
        for k in range(2):
            rows.append({"clip_id": f"v{v}-{k}", "video_id": f"v{v}", "shard": len(clips) // 3, "shard_row": len(clips) % 3, "caption": name})
            clips.append(fixture_clip_reader(name, skip=8 * k))
    for shard in range(2):
        np.save(clips_dir / f"clips-{shard:05d}.npy", np.stack(clips[3 * shard:3 * shard + 3]))
    pd.DataFrame(rows).to_parquet(clips_dir / "index.parquet")
    (latents_dir / "encoders.json").write_text(json.dumps({"image_vae": {"weights": ""}, "random_init": True}))
    return root, clips_dir, latents_dir


def test_split_is_by_video_seeded_and_reads_back_the_right_clips(stage_inputs, fixture_clip_reader):
    _, clips_dir, _ = stage_inputs
    index = pd.read_parquet(clips_dir / "index.parquet")
    train, held = split_clips(index, share=0.34, seed=0)
    assert set(train["video_id"]).isdisjoint(held["video_id"]) and len(train) + len(held) == len(index)
    assert len(held) > 0 and len(train) > 0
    pd.testing.assert_frame_equal(split_clips(index, 0.34, 0)[1], held)  # the same split every time
    row = held.iloc[-1]
    source = SOURCES[int(row["video_id"][1:])]
    assert np.array_equal(read_clips(clips_dir, held)[-1], fixture_clip_reader(source, skip=8 * int(row["clip_id"][-1])))


def test_stage_trains_the_tcm_vae_and_compares_it_on_held_out_clips(stage_inputs, monkeypatch, ray_session):
    """Two training runs (each costs ~45 s of Ray Train start-up here): the TCM-VAE and one of
    Table 3's video baselines (VideoLDM's); the fine-tuned image decoder is the same code with
    TCMs and refinement off, and `make demo` trains all four."""
    root, clips_dir, latents_dir = stage_inputs
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    cfg = TrainDecoderParams(steps=4, batch_size=1, checkpoint_every=2, disc_start=2, warmup_steps=1, held_out_share=0.34,
                             refine_channels=8, disc_channels=8, compare_image_decoder=False,
                             compare_without_refinement=False, video_baselines="videoldm")
    out = root / "models" / "decoder"
    report = train_decoder(Params(train_decoder=cfg), clips=clips_dir, latents=latents_dir, output_dir=out, runs=root / "runs")

    assert set(report["table"]) == {"image_vae", "tcm_vae", "videoldm_decoder"}
    assert set(report["differences"]) == {"tcm_vae - image_vae", "tcm_vae - videoldm_decoder"}
    assert report["comparable"] is False and report["held_out"]["videos"] == 1
    held_frames = report["held_out"]["clips"] * 8
    assert all(row["frames"] == held_frames and np.isfinite(row["psnr_y"]) for row in report["table"].values())
    assert json.loads((out / "metrics.json").read_text())["table"] == report["table"]
    psnr = report["differences"]["tcm_vae - image_vae"]["psnr_y"]  # one held-out video: no spread, so no claim
    assert psnr["low"] == psnr["mean"] == psnr["high"] and psnr["verdict"] == "one video: no spread"
    assert report["spread"]["tcm_vae"]["ssim_y"]["mean"] == pytest.approx(report["table"]["tcm_vae"]["ssim_y"])
    assert not (out / IMAGE_DECODER).exists()
    videoldm = load_decoder(out / "videoldm_decoder")  # reloads as the architecture it trained
    assert videoldm.config.video_layers == "videoldm" and videoldm.tcms is None and videoldm.refine is None
    assert videoldm.temporal_blocks[0].conv2.weight.abs().sum() > 0  # trained off its zero start

    tcm = load_decoder(out)
    assert tcm.tcms is not None and tcm.refine is not None
    with torch.no_grad():
        assert tcm(torch.zeros(1, 4, 8, 8, 8)).shape == (1, 3, 8, 64, 64)
    trained = dict(tcm.named_parameters())  # TCMs and refinement left their zero initialisation
    assert trained["refine.conv_out.weight"].abs().sum() > 0 and trained["tcms.0.conv2.spatial.weight"].abs().sum() > 0

    client = MlflowClient()
    for variant, run_id in report["mlflow_run_ids"].items():
        history = {key: sorted(m.step for m in client.get_metric_history(run_id, key)) for key in ("loss", "loss/l1", "loss/discriminator", "loss/consistency")}
        assert history["loss"] == [1, 2, 3, 4] and history["loss/l1"] == [1, 2, 3, 4]
        assert history["loss/discriminator"] == [3, 4]  # the adversarial loss from disc_start (step index 2) on
        assert history["loss/consistency"] == ([1, 2, 3, 4] if variant == "tcm_vae" else [])
        assert sorted(m.step for m in client.get_metric_history(run_id, "grad_norm/discriminator")) == [1, 2, 3, 4]
        assert client.get_run(run_id).data.metrics["heldout/tcm_vae/psnr_y"] == pytest.approx(report["table"]["tcm_vae"]["psnr_y"])
        assert client.get_run(run_id).data.tags["progress"].startswith(f"train_decoder-{variant}: step 4/4  loss ")  # rank 0's last progress line
    assert "reconstruction.json" in [a.path for a in client.list_artifacts(report["mlflow_run_ids"]["tcm_vae"])]


def test_variants_are_table3_rows_plus_the_tcm_vae_without_refinement():
    variants = decoder_variants(TrainDecoderParams(**PRESET_DEFAULTS["L"]["train_decoder"]))
    assert list(variants) == ["tcm_vae", "tcm_vae_no_refinement", "image_decoder_finetuned", "conv3d_decoder", "videoldm_decoder"]
    assert PRESET_DEFAULTS["H"]["train_decoder"]["video_baselines"] == "conv3d,videoldm"
    # smoke fine-tunes the image decoder and the TCM-VAE without R beside the TCM-VAE; the video
    # baselines are one -S train_decoder.video_baselines=conv3d,videoldm away
    assert list(decoder_variants(TrainDecoderParams())) == ["tcm_vae", "tcm_vae_no_refinement", "image_decoder_finetuned"]
    parts = {name: (c.temporal_compensation, c.refinement, c.video_layers) for name, c in variants.items()}
    assert parts["tcm_vae"] == (True, True, "") and parts["tcm_vae_no_refinement"] == (True, False, "")
    assert parts["image_decoder_finetuned"] == (False, False, "") and parts["conv3d_decoder"] == (False, False, "conv3d")
    # a TCM-VAE already without R (or without TCMs) has no row that differs from it by R alone
    assert "tcm_vae_no_refinement" not in decoder_variants(TrainDecoderParams(refinement=False))
    assert "tcm_vae_no_refinement" not in decoder_variants(TrainDecoderParams(temporal_compensation=False))
    assert list(decoder_variants(TrainDecoderParams(compare_without_refinement=False, compare_image_decoder=False, video_baselines=""))) == ["tcm_vae"]


def test_presets_at_scale_need_the_lpips_weights(stage_inputs, tmp_path):
    _, clips_dir, latents_dir = stage_inputs
    with pytest.raises(FileNotFoundError, match="^train_decoder.lpips_vgg_weights, train_decoder.lpips_linear_weights: required for preset L"):
        train_decoder(Params(preset="L"), clips=clips_dir, latents=latents_dir, output_dir=tmp_path / "out", runs=tmp_path / "runs")
