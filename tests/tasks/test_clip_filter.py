"""The optional CLIP text-frame filter, with a tiny random-init open_clip model saved locally."""

import json

import open_clip
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from model.weights import WeightsError
from tasks.config.params import DecodeParams, FilterParams
from tasks.inference.clip_score import ClipFrameScorer, clip_pixels, load_clip
from tasks.stages.filter import filter_videos
from tasks.storage.video_io import center_crop, cover_size, decode_frames

TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    config = folder / "tiny-clip-test.json"
    config.write_text(json.dumps(TINY))
    torch.manual_seed(0)
    open_clip.add_model_config(str(config))
    model = open_clip.create_model("tiny-clip-test", pretrained=None)
    weights = folder / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return str(config), str(weights)


def test_scorer_matches_a_direct_cosine_similarity(tiny_clip, fixture_videos):
    config, weights = tiny_clip
    scorer = ClipFrameScorer(config, weights, str(fixture_videos))
    path = fixture_videos / "pancake_426x240_30fps.mkv"
    batch = pd.DataFrame([{"row_index": 7, "path": path.name, "name": "pancakes in a pan", "segment_start": 0, "segment_end": 101, "height": 240, "width": 426}])
    score = scorer(batch)["clip_score"].iloc[0]

    model, tokenizer = load_clip(config, weights)
    frame = center_crop(decode_frames(path, [50], *cover_size(240, 426, 32, 32)), 32, 32)
    with torch.no_grad():
        image = F.normalize(model.encode_image(clip_pixels(frame, model)), dim=-1)
        text = F.normalize(model.encode_text(tokenizer(["pancakes in a pan"])), dim=-1)
    assert score == pytest.approx(float((image * text).sum()), abs=1e-6)
    assert -1.0 <= score <= 1.0


def test_filter_rejects_rows_below_the_clip_threshold(tiny_clip, fixture_videos, ray_session):
    config, weights = tiny_clip
    rows = pd.DataFrame([
        {"videoid": name, "contentUrl": "", "duration": "", "page_dir": ".", "name": "a short video clip"}
        for name in ("pancake_426x240_30fps.mkv", "mpeg4_320x240_25fps.avi")
    ])
    keep_all = FilterParams(clip_min_score=-1.0 + 1e-9, clip_model=config, clip_weights=weights)
    kept, _ = filter_videos(rows, str(fixture_videos), keep_all, DecodeParams())
    assert len(kept) == 2 and kept["clip_score"].between(-1, 1).all()
    threshold = float(kept["clip_score"].max()) + 1e-6  # above every score: both rejected, with it
    strict = FilterParams(clip_min_score=threshold, clip_model=config, clip_weights=weights)
    kept, rejected = filter_videos(rows, str(fixture_videos), strict, DecodeParams())
    assert kept.empty and set(rejected["reason"]) == {"low_clip_score"}


def test_bad_clip_checkpoints_name_the_file_and_key(tiny_clip, tmp_path):
    config, weights = tiny_clip
    with pytest.raises(WeightsError, match="filter.clip_weights"):
        load_clip(config, tmp_path / "absent.safetensors")
    state = open_clip.create_model("tiny-clip-test", pretrained=None).state_dict()
    state["text_projection"] = torch.zeros(3, 3)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(WeightsError, match=r"wrong.safetensors: key 'text_projection' has shape \(3, 3\)"):
        load_clip(config, tmp_path / "wrong.safetensors")


def test_clip_filter_with_every_row_already_rejected(tiny_clip, fixture_videos, ray_session):
    config, weights = tiny_clip
    rows = pd.DataFrame([{"videoid": "empty.mp4", "contentUrl": "", "duration": "", "page_dir": ".", "name": "a short video clip"}])
    kept, rejected = filter_videos(rows, str(fixture_videos), FilterParams(clip_model=config, clip_weights=weights), DecodeParams())
    assert kept.empty and rejected["reason"].tolist() == ["unreadable"]
