"""evaluate: the stage end to end on tiny random models (held-out clips of real fixture videos, and
a UCF-101 tree in the real layout: the official classInd.txt, real class folders with the
HandstandPushups/v_HandStandPushups quirk, a CRLF test list naming fixture videos, broken files
included), our own and the reference protocols recorded with every number, the real statistics
cache, MLflow; and seeded generation independent of batching."""

import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from eval.ucf101_prompts import prompt_table_digest
from model.image_vae import build_tiny_image_vae
from model.tcm_vae import TCMDecoder, TCMVAEConfig
from tasks.config.params import CacheLatentsParams, EvaluateParams, Params, TrainUnetParams
from tasks.inference.encoders import encode_captions, load_text
from tasks.inference.generation import VideoGenerator
from tasks.inference.models import IMAGE_DECODER, image_vae_decoder, load_unet, save_decoder
from tasks.evaluation.protocols import listed_video
from tasks.evaluation.scoring import evaluate
from tasks.storage.clip_shards import held_out_videos
from tests.conftest import FIXTURE_SOURCES, SHARED, write_fixture_clips, write_tiny_models

SOURCES = FIXTURE_SOURCES
REAL_CLASS_INDEX = SHARED / "datasets" / "benchmark-splits" / "ucfTrainTestlist" / "classInd.txt"


@pytest.fixture(scope="module")
def project(tmp_path_factory, fixture_clip_reader, fixture_videos):
    """A project folder with what evaluate reads: clip shards, a smoke cache's encoders.json and
    empty-prompt context, random-init smoke UNet and TCM-VAE exports, and a UCF-101 copy."""
    root = tmp_path_factory.mktemp("evaluate")
    clips_dir, latents_dir = root / "data" / "clips", root / "data" / "latents"
    latents_dir.mkdir(parents=True)
    write_fixture_clips(clips_dir)
    (latents_dir / "encoders.json").write_text(json.dumps({"image_vae": {"weights": ""}, "random_init": True}))
    text, tokenizer = load_text(CacheLatentsParams())
    np.save(latents_dir / "null_context.npy", encode_captions(text, tokenizer, [""])[0])

    write_tiny_models(root)
    write_decoder_baselines(root / "models" / "decoder")

    ucf = root / "ucf101"
    (ucf / "ucfTrainTestlist").mkdir(parents=True)
    (ucf / "ucfTrainTestlist" / "classInd.txt").write_bytes(REAL_CLASS_INDEX.read_bytes())  # the official 101 classes
    test_list = []
    for k, (folder, stem, source) in enumerate([("PlayingCello", "PlayingCello", SOURCES[0]), ("PlayingCello", "PlayingCello", SOURCES[1]),
                                                ("HandstandPushups", "HandStandPushups", SOURCES[2]),
                                                ("HandstandPushups", "HandStandPushups", "rotated90_3frames.mov"),
                                                ("HandstandPushups", "HandStandPushups", "empty.mp4")]):
        path = f"{folder}/v_{stem}_g0{k + 1}_c01.avi"
        (ucf / "videos" / folder).mkdir(parents=True, exist_ok=True)
        os.symlink(fixture_videos / source, ucf / "videos" / path)
        test_list.append(path)
    (ucf / "ucfTrainTestlist" / "testlist01.txt").write_bytes(("\r\n".join(test_list) + "\r\n").encode())  # CRLF, as shipped

    msrvtt = root / "msrvtt"
    (msrvtt / "videos").mkdir(parents=True)
    ids = ["video7010", "video7011", "video7012"]
    for video_id, source in zip(ids, SOURCES):
        os.symlink(fixture_videos / source, msrvtt / "videos" / f"{video_id}.mp4")
    (msrvtt / "test_videodatainfo.json").write_text(json.dumps({
        "info": {}, "videos": [{"video_id": video_id, "split": "test", "id": k} for k, video_id in enumerate(ids)],
        "sentences": [{"video_id": video_id, "caption": f"{source} caption {c}", "sen_id": c} for video_id, source in zip(ids, SOURCES) for c in range(3)],
    }))
    return root


def write_decoder_baselines(folder):
    """Two of train_decoder's baselines beside the TCM-VAE: the image decoder with the cache's image
    VAE weights exactly (a random tiny VAE, seed 0), and a VideoLDM-style decoder moved off its
    image-decoder start."""
    vae = build_tiny_image_vae(seed=0)
    save_decoder(image_vae_decoder(vae), folder / IMAGE_DECODER)
    videoldm = TCMDecoder(vae, TCMVAEConfig(temporal_compensation=False, refinement=False, video_layers="videoldm"))
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in videoldm.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    save_decoder(videoldm, folder / "videoldm_decoder")


def test_stage_records_every_number_with_its_protocol(project, monkeypatch, ray_session):
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    cfg = EvaluateParams(protocols="heldout,ucf101,msrvtt,stylegan-v,ucf101-is10k", num_videos=4, steps=2, batch_size=3, sample_count=1, num_workers=2,
                         reference_sample_limit=4,
                         ucf101_lists=str(project / "ucf101" / "ucfTrainTestlist"), ucf101_videos=str(project / "ucf101" / "videos"),
                         msrvtt_annotations=str(project / "msrvtt" / "test_videodatainfo.json"), msrvtt_videos=str(project / "msrvtt" / "videos"))
    params = Params(evaluate=cfg, train_unet=TrainUnetParams(held_out_share=0.34))
    report = evaluate(params)

    held, ucf, msrvtt = (report["protocols"][name] for name in ("heldout", "ucf101", "msrvtt"))
    assert held["protocol"]["real_videos"] == 2 and held["protocol"]["generated_videos"] == 4  # one held-out video, two clips
    assert ucf["protocol"]["real_videos"] == 3 and ucf["protocol"]["real_skipped"] == 2  # 3-frame and empty files: counted, not fatal
    assert msrvtt["protocol"]["generated_videos"] == msrvtt["protocol"]["real_videos"] == 3  # one seeded caption per test video
    assert msrvtt["protocol"]["split"] == "test"
    for figures in (held, ucf, msrvtt):
        assert figures["comparable"] is False and figures["fvd"] > 0 and figures["is_mean"] >= 1.0
        assert -1 <= figures["clipsim"] <= 1 and -1 <= figures["frame_consistency"] <= 1
        protocol = figures["protocol"]
        assert (protocol["frames"], protocol["resolution"], protocol["sampler_steps"], protocol["cfg"], protocol["seed"]) == (8, "64x64", 2, cfg.guidance_scale, 0)
        assert protocol["weights"]["i3d"] == "random-i3d-seed0" and len(protocol["weights"]["unet"]) == 64
        assert protocol["real_stats_cached"] is False
        assert protocol["clipsim_frame_count"] == protocol["generated_videos"] * 8  # CLIPSIM's terms: every frame of every video
    assert ucf["protocol"]["split"] == "testlist01" and ucf["protocol"]["prompt_table_sha256"] == prompt_table_digest()
    assert ucf["protocol"]["real_frames"]["rule"].startswith("from frame 0")

    # The reference protocols: their definitions, their viewing, and the deviation a small budget is
    stylegan, is10k = report["protocols"]["stylegan-v"], report["protocols"]["ucf101-is10k"]
    assert set(stylegan) == {"fvd", "comparable", "protocol"} and stylegan["fvd"] > 0  # FVD only: no IS on 2048 samples
    assert set(is10k) == {"is_mean", "is_std", "comparable", "protocol"} and is10k["is_mean"] >= 1.0
    record = stylegan["protocol"]
    assert record["reference"]["name"] == "stylegan-v" and record["covariance_divisor"] == "n"
    assert (record["frames"], record["generated_frames"], record["resolution"], record["generated_size"]) == (16, 16, "256x256", "64x64")
    assert record["generated_videos"] == 4 and record["real_videos"] == 3 and record["real_skipped"] == 2  # the 3-frame and empty files
    assert record["follows_reference"] is False and "reference_sample_limit 4" in record["deviations"][0]
    assert "4 generated / 4 real videos instead of 2048 / 2048" in record["deviations"][0]
    offsets = record["real_frames"]
    assert offsets["stride"] == 1 and len(offsets["sha256"]) == 64 and len(offsets["first"]) == 3
    assert all(0 <= int(line.split()[1]) <= 280 - 16 for line in offsets["first"])  # seeded windows inside the fixtures
    assert record["lists_sha256"] and record["prompt_table_sha256"] == prompt_table_digest() and record["split"] == "testlist01"
    assert record["fps"] == "native" and "clipsim_frame_count" not in record
    assert is10k["protocol"]["real_videos"] == 0 and is10k["protocol"]["is_splits"] == 4 and is10k["protocol"]["is_shuffle"] == "numpy RandomState(42)"
    assert stylegan["comparable"] is False and is10k["comparable"] is False
    table = pd.read_csv(project / "plots" / "eval" / "ucf101.csv")
    assert list(table["frame"]) == list(range(8)) and np.isnan(table["consistency"][0]) and table["clipsim_real"].notna().all()

    # Table 3's generation columns (evaluate.decoder_table: heldout): every decoder decodes the heldout
    # latents of the same prompts and seeds. The baseline with the image VAE's exact weights scores
    # as the image VAE's own decoder; the perturbed one does not; the TCM-VAE's row is heldout's own
    table = report["decoder_table"]
    rows = table["decoders"]
    assert list(rows) == ["tcm_vae", "image_vae", "image_decoder_finetuned", "videoldm_decoder"]
    metrics = ("fvd", "is_mean", "is_std", "clipsim", "frame_consistency", "real_frame_consistency")
    assert {key: rows["tcm_vae"][key] for key in metrics} == {key: held[key] for key in metrics}
    for key in metrics:
        assert rows["image_decoder_finetuned"][key] == pytest.approx(rows["image_vae"][key], abs=1e-4)
    assert abs(rows["videoldm_decoder"]["fvd"] - rows["image_vae"]["fvd"]) > 1e-3
    assert rows["videoldm_decoder"]["real_frame_consistency"] == rows["image_vae"]["real_frame_consistency"]  # one set of real videos
    assert table["protocol"] == "heldout" and table["comparable"] is False and len(table["weights"]["videoldm_decoder"]) == 64
    assert table["same_latents"].startswith("4 videos")
    same = table["differences"]["tcm_vae - image_decoder_finetuned"]["frame_consistency"]
    assert same["mean"] == pytest.approx(rows["tcm_vae"]["frame_consistency"] - rows["image_decoder_finetuned"]["frame_consistency"], abs=1e-4)
    assert same["low"] <= same["mean"] <= same["high"] and same["verdict"] in ("better", "worse", "within spread")

    client = MlflowClient()
    run = client.get_run(report["mlflow_run_id"])
    assert run.data.metrics["ucf101/fvd"] == pytest.approx(ucf["fvd"]) and run.data.params["evaluate.protocols"] == cfg.protocols
    assert run.data.metrics["decoders/videoldm_decoder/fvd"] == pytest.approx(rows["videoldm_decoder"]["fvd"])
    assert run.data.tags["versvideo.stage"] == "evaluate"
    samples = [item.path for item in client.list_artifacts(run.info.run_id, "samples")]
    assert len(samples) == 10 and {path.rsplit(".", 1)[1] for path in samples} == {"mp4", "gif"}  # one sample per protocol

    # Second run: the real statistics come from data/eval_stats; seeded generation gives the same numbers
    again = evaluate(params)
    for name in ("heldout", "ucf101", "msrvtt", "stylegan-v"):
        assert again["protocols"][name]["protocol"]["real_stats_cached"] is True
        for key in ("fvd", "clipsim", "frame_consistency", "real_clipsim", "is_mean"):
            if key in report["protocols"][name]:
                assert again["protocols"][name][key] == pytest.approx(report["protocols"][name][key], rel=1e-6)
    assert again["protocols"]["stylegan-v"]["protocol"]["real_frames"] == report["protocols"]["stylegan-v"]["protocol"]["real_frames"]
    assert len(list((project / "data" / "eval_stats").glob("*.npz"))) == 4


def test_generation_is_seeded_per_video_independent_of_the_batch(project):
    root = project
    generator = VideoGenerator(root / "models" / "unet", root / "models" / "decoder", root / "data" / "latents", CacheLatentsParams())
    settings = {"frames": 4, "height": 32, "width": 64, "steps": 2, "guidance_scale": 7.5}
    pair = generator(["a red square", "a blue circle"], [5, 6], **settings)
    alone = generator(["a blue circle"], [6], **settings)
    assert pair.shape == (2, 4, 32, 64, 3) and pair.dtype == np.uint8
    np.testing.assert_array_equal(pair[1], alone[0])
    assert not np.array_equal(generator(["a blue circle"], [7], **settings), alone)
    with pytest.raises(ValueError, match="multiples of 32 for this UNet"):  # VAE factor 8, two UNet downsamplings
        generator(["x"], [0], frames=4, height=48, width=32, steps=2, guidance_scale=1.0)


def test_heldout_needs_videos_the_unet_never_saw(project, monkeypatch):
    monkeypatch.chdir(project)
    with pytest.raises(ValueError, match="train_unet.held_out_share is 0"):
        evaluate(Params(train_unet=TrainUnetParams(held_out_share=0.0)))


def test_the_exported_unet_loads_back_with_merged_experts(project):
    unet, preset = load_unet(project / "models" / "unet")
    assert preset == "smoke" and not any(p.requires_grad for p in unet.parameters())
    with pytest.raises(FileNotFoundError, match="run the train_unet stage first"):
        load_unet(project / "nowhere")


def world_clips(clips_dir, videos: int = 6) -> list[str]:
    """A clip folder of the demo world: `videos` drawn videos (2 clips each, 8 x 64 x 64) whose
    captions say which coloured shape moves which way; returns the captions."""
    from tasks.preprocessing.synthetic import render

    clips_dir.mkdir(parents=True, exist_ok=True)
    rows, clips, captions = [], [], []
    for v in range(videos):
        frames, caption = render(64, 64, 16, np.random.default_rng([7, v]), static=False, cut_at=None)
        captions.append(caption)
        for k in range(2):
            rows.append({"clip_id": f"w{v}-{k}", "video_id": f"w{v}", "shard": 0, "shard_row": len(clips), "caption": caption})
            clips.append(frames[8 * k : 8 * k + 8])
    np.save(clips_dir / "clips-00000.npy", np.stack(clips))
    pd.DataFrame(rows).to_parquet(clips_dir / "index.parquet")
    return captions


def test_captions_protocol_scores_prompt_following_beside_chance_and_the_real_clips(tmp_path, monkeypatch, ray_session):
    """Training captions and unseen combinations, each probed on its generated video; the probe
    reads the real held-out clips' captions back (drawn clips: all of them)."""
    root = tmp_path
    captions = world_clips(root / "data" / "clips")
    latents_dir = root / "data" / "latents"
    latents_dir.mkdir(parents=True)
    (latents_dir / "encoders.json").write_text(json.dumps({"image_vae": {"weights": ""}, "random_init": True}))
    text, tokenizer = load_text(CacheLatentsParams())
    np.save(latents_dir / "null_context.npy", encode_captions(text, tokenizer, [""])[0])
    write_tiny_models(root)
    write_decoder_baselines(root / "models" / "decoder")
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")

    params = Params(evaluate=EvaluateParams(protocols="captions", caption_prompts=3, steps=2, batch_size=3, sample_count=1, num_workers=1),
                    train_unet=TrainUnetParams(held_out_share=0.34))
    figures = evaluate(params)["protocols"]["captions"]
    assert figures["videos_training"] == 3 and figures["videos_unseen"] == 3 and figures["protocol"]["generated_videos"] == 6
    held = held_out_videos(pd.read_parquet(root / "data" / "clips" / "index.parquet"), 0.34, 0)
    trained = {caption.split(" on ")[0] for v, caption in enumerate(captions) if f"w{v}" not in held}
    assert figures["protocol"]["unseen_combinations"] == 72 - len(trained)  # colour x shape x direction, less the trained ones
    assert (figures["color_chance"], figures["shape_chance"], figures["direction_chance"]) == (round(1 / 6, 4), round(1 / 3, 4), 0.25)
    assert figures["color_accuracy_real_clips"] == figures["direction_accuracy_real_clips"] == 1.0
    for key in ("color", "shape", "direction"):
        for group in ("training", "unseen"):
            assert 0.0 <= figures[f"{key}_accuracy_{group}"] <= 1.0
    client = MlflowClient()
    run = client.search_runs([client.get_experiment_by_name("versvideo").experiment_id])[0]
    assert run.data.metrics["captions/direction_accuracy_unseen"] == figures["direction_accuracy_unseen"]
    plotted = pd.read_csv(root / "plots" / "eval" / "prompt_following.csv").set_index(["attribute", "group"])
    assert len(plotted) == 9 and (root / "plots" / "eval" / "prompt_following.png").stat().st_size > 0
    for key in ("color", "shape", "direction"):
        for group in ("training", "unseen", "real_clips"):
            assert plotted.loc[(key, group), "accuracy"] == figures[f"{key}_accuracy_{group}"]
            assert plotted.loc[(key, group), "chance"] == figures[f"{key}_chance"]


def test_a_benchmark_list_entry_cannot_leave_its_videos_folder(tmp_path):
    (tmp_path / "UCF-101/ApplyEyeMakeup").mkdir(parents=True)
    assert listed_video(str(tmp_path / "UCF-101"), "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi", "evaluate.ucf101_lists").endswith("UCF-101/ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi")
    with pytest.raises(ValueError, match=r"evaluate.msrvtt_annotations: entry ../../etc/passwd.mp4 resolves outside"):
        listed_video(str(tmp_path / "UCF-101"), "../../etc/passwd.mp4", "evaluate.msrvtt_annotations")
    with pytest.raises(ValueError, match=r"entry /etc/passwd.mp4 resolves outside"):
        listed_video(str(tmp_path / "UCF-101"), "/etc/passwd.mp4", "evaluate.msrvtt_annotations")
