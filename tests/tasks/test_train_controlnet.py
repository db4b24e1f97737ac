"""train_controlnet end to end on tiny smoke models and real fixture clips: the latent and pixel
rows of a clip stay paired, held-out videos stay out, the export loads for generation, and the
control check and samples reach MLflow."""

import json

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from tasks.config.params import CacheLatentsParams, Params, TrainControlnetParams, TrainUnetParams, require_pretrained_weights
from tasks.inference.encoders import encode_captions, load_text
from tasks.stages.train_controlnet import train_controlnet
from tasks.storage.latent_shards import latent_clip_dataset, write_latent_shard
from tests.conftest import write_fixture_clips, write_tiny_models


@pytest.fixture(scope="module")
def project(tmp_path_factory, fixture_videos):
    root = tmp_path_factory.mktemp("controlnet")
    clips_dir, latents_dir = root / "data" / "clips", root / "data" / "latents"
    latents_dir.mkdir(parents=True)
    index = write_fixture_clips(clips_dir)
    text, tokenizer = load_text(CacheLatentsParams())
    context = encode_captions(text, tokenizer, index["caption"].tolist())
    # latent k carries k in every cell, so a test can tell which clip a latent row is
    latents = np.stack([np.full((8, 4, 8, 8), k / 10, np.float16) for k in range(len(index))])
    write_latent_shard(latents_dir / "latents-00000.parquet", index, latents, context, fingerprint="test")
    index.to_parquet(latents_dir / "index.parquet")
    np.save(latents_dir / "null_context.npy", encode_captions(text, tokenizer, [""])[0])
    (latents_dir / "encoders.json").write_text(json.dumps({"image_vae": {"weights": ""}, "random_init": True}))
    write_tiny_models(root)
    return root


def test_latents_and_pixels_of_a_clip_stay_paired_and_held_out_videos_stay_out(project, ray_session):
    rows = latent_clip_dataset(project / "data" / "latents", project / "data" / "clips", seed=0, exclude_videos=frozenset({"v1"})).take_all()
    assert len(rows) == 4
    clips = np.load(project / "data" / "clips" / "clips-00000.npy")
    for row in rows:
        k = round(float(row["latents"].flat[0]) * 10)
        assert k not in (2, 3)  # v1's clips
        assert np.array_equal(row["frames"], clips[k])


def test_stage_trains_exports_and_checks_the_control(project, monkeypatch, ray_session):
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    cfg = TrainControlnetParams(steps=4, batch_size=2, checkpoint_every=2, keep_checkpoints=1, eval_clips=2, sample_count=1, sample_steps=2, style_dropout=0.0,
                                conditions="canny,hed,depth,image", depth_resolution=64)
    params = Params(train_controlnet=cfg, train_unet=TrainUnetParams(held_out_share=0.34))
    report = train_controlnet(params)

    check = report["control_check"]
    assert check["clips"] == 2 and check["held_out"] is True
    for key in ("canny_edge_correlation_matched", "canny_edge_correlation_mismatched", "canny_edge_correlation_uncontrolled"):
        assert -1 <= check[key] <= 1
    for key in ("centroid_error_matched_px", "centroid_error_mismatched_px", "centroid_error_uncontrolled_px"):
        assert 0 <= check[key] <= np.hypot(64, 64)  # pixels; the diagonal when a shape is never seen
    assert 0 <= check["centroid_matched_below_mismatched_share"] <= 1
    assert report["comparable"] is False and report["logged_steps"] == 4
    kept = [path for path in (project / "models/runs").glob("train_controlnet-*/checkpoint_*") if path.is_dir()]
    assert len(kept) == 1 and json.loads((kept[0] / "state.json").read_text())["step"] == 4  # keep_checkpoints=1: the step-2 one is gone
    folder = project / "models" / "controlnet"
    saved = json.loads((folder / "config.json").read_text())
    assert saved["trained_conditions"] == ["canny", "hed", "depth", "image"] and saved["style"]["model"] == "tiny-random"
    assert json.loads((folder / "metrics.json").read_text())["control_check"] == check

    client = MlflowClient()
    run = client.get_run(report["mlflow_run_id"])
    assert run.data.tags["versvideo.stage"] == "train_controlnet"
    assert run.data.metrics["control/canny_edge_correlation_matched"] == pytest.approx(check["canny_edge_correlation_matched"])
    assert {"grad_norm", "grad_norm/style", "loss"} <= set(run.data.metrics)  # both groups trained (no style dropout)
    samples = [item.path for folder in client.list_artifacts(run.info.run_id, "samples") for item in client.list_artifacts(run.info.run_id, folder.path)]
    assert {path.rsplit(".", 1)[1] for path in samples} == {"mp4", "gif"}


def test_scale_presets_need_every_annotators_weights():
    needs = TrainControlnetParams(conditions="canny,hed,depth", style_weights="clip.pt", hed_weights="hed.pth")
    with pytest.raises(FileNotFoundError, match=r"^train_controlnet\.midas_weights: required for preset L"):
        require_pretrained_weights(Params(preset="L", train_controlnet=needs), "train_controlnet")
    require_pretrained_weights(Params(preset="L", train_controlnet=TrainControlnetParams(conditions="canny,hed", style_weights="clip.pt", hed_weights="hed.pth")), "train_controlnet")
    require_pretrained_weights(Params(preset="smoke", train_controlnet=needs), "train_controlnet")  # smoke: random stand-ins
