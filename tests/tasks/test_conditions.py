"""Condition extractors on the real fixture frames: canny is OpenCV's, HED, depth and image maps
have the adapters' format, depth follows ControlNet's annotator recipe, unknown or missing
conditions and bad settings fail clearly, style embeddings are unit norm."""

import cv2
import numpy as np
import pytest
import torch

from eval.clip_metrics import frame_embeddings
from model.controlnet import CONDITIONS
from tasks.config.params import CONTROL_CONDITIONS, ParamsError, TrainControlnetParams
from tasks.inference.conditions import ConditionExtractor, ConditionSettings, annotator_size, condition_index, depth, load_style_encoder, style_embeddings


def test_canny_equals_opencv_on_the_fixture_frames(fixture_clip_reader):
    for name in ("h264_340x256_28fps.mp4", "mpeg4_320x240_25fps.avi", "pancake_426x240_30fps.mkv"):
        frames = fixture_clip_reader(name, frames=4, size=96)
        maps = ConditionExtractor(ConditionSettings(canny_low=100, canny_high=200))("canny", frames)
        assert maps.shape == frames.shape and maps.dtype == np.uint8
        for frame, edges in zip(frames, maps):
            expected = cv2.Canny(frame, 100, 200)
            assert np.array_equal(edges[..., 0], expected) and np.array_equal(edges[..., 2], expected)
        assert 0.01 < (maps > 0).mean() < 0.5, name  # real edges: neither none nor everywhere


def test_thresholds_change_the_edges_and_bad_settings_are_refused(fixture_clip):
    loose = ConditionExtractor(ConditionSettings(canny_low=20, canny_high=60))("canny", fixture_clip)
    strict = ConditionExtractor(ConditionSettings(canny_low=150, canny_high=300))("canny", fixture_clip)
    assert (loose > 0).sum() > (strict > 0).sum()
    for bad, message in (({"canny_low": 200, "canny_high": 100}, "200/100; need 0 <= low <= high"), ({"image_mode": "last"}, "repeat, first_frame"),
                         ({"depth_resolution": 100}, "depth_resolution: 100; need a positive multiple of 64")):
        with pytest.raises(ParamsError, match=message):
            TrainControlnetParams(**bad)


def test_image_condition_repeats_or_keeps_the_first_frame(fixture_clip):
    repeated = ConditionExtractor(ConditionSettings(image_mode="repeat"))("image", fixture_clip)
    assert all(np.array_equal(frame, fixture_clip[0]) for frame in repeated)
    first = ConditionExtractor(ConditionSettings(image_mode="first_frame"))("image", fixture_clip)
    assert np.array_equal(first[0], fixture_clip[0]) and not first[1:].any()


def test_hed_maps_and_missing_weights(fixture_clip):
    maps = ConditionExtractor(ConditionSettings(), allow_random=True)("hed", fixture_clip)
    assert maps.shape == fixture_clip.shape and maps.dtype == np.uint8
    assert np.array_equal(maps[..., 0], maps[..., 1])
    with pytest.raises(FileNotFoundError, match="set train_controlnet.hed_weights"):
        ConditionExtractor(ConditionSettings())("hed", fixture_clip)


def test_depth_follows_controlnets_annotator_recipe(fixture_clip_reader):
    """The network sees the frame at the annotator size (short side 384, sides multiples of 64) in
    [-1, 1]; each frame's map spans 0..255 at the frame's own size, on three equal channels."""
    frames = fixture_clip_reader("h264_340x256_28fps.mp4", frames=3, size=96)
    assert annotator_size(256, 340, 384) == (384, 512) and annotator_size(64, 64, 384) == (384, 384)
    seen = []

    class Spy(torch.nn.Module):  # inverse depth = the image's brightness, so the scaling is checkable
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(1))

        def forward(self, images):
            seen.append((tuple(images.shape), float(images.min()), float(images.max())))
            return images.mean(dim=1) * self.weight

    maps = depth(Spy(), frames, resolution=128)
    assert [shape for shape, _, _ in seen] == [(3, 3, 128, 128)] and all(-1 <= low < high <= 1 for _, low, high in seen)
    assert maps.shape == (3, 96, 96) and maps.dtype == np.uint8
    assert all(frame.min() <= 2 and frame.max() >= 253 for frame in maps)  # min-max per frame (bilinear back to 96 px)
    assert np.corrcoef(maps.reshape(-1).astype(float), frames.mean(-1).reshape(-1))[0, 1] > 0.95

    stand_in = ConditionExtractor(ConditionSettings(depth_resolution=64), allow_random=True)("depth", frames[:2])
    assert stand_in.shape == (2, 96, 96, 3) and np.array_equal(stand_in[..., 0], stand_in[..., 2])
    with pytest.raises(FileNotFoundError, match="set train_controlnet.midas_weights to dpt_hybrid-midas-501f0c75.pt"):
        ConditionExtractor(ConditionSettings())("depth", frames)


def test_condition_names():
    assert CONTROL_CONDITIONS == CONDITIONS  # params' spelling of the adapters' order
    assert [condition_index(name) for name in CONDITIONS] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="unknown condition 'sketch'; choose one of canny, hed, depth, image"):
        condition_index("sketch")


def test_style_embeddings_are_unit_norm_and_tell_images_apart(fixture_clip_reader):
    encoder = load_style_encoder("ViT-B-32", "", seed=0, allow_random=True)
    images = np.stack([fixture_clip_reader("h264_340x256_28fps.mp4", 1)[0], fixture_clip_reader("pancake_426x240_30fps.mkv", 1)[0]])
    embedded = style_embeddings(encoder, images)
    assert torch.allclose(embedded.norm(dim=-1), torch.ones(2), atol=1e-5)
    torch.testing.assert_close(embedded, frame_embeddings(encoder, images[:, None])[:, 0])  # the evaluation's CLIP preprocessing
    assert (embedded[0] - embedded[1]).abs().sum() > 1e-3
    with pytest.raises(FileNotFoundError, match="train_controlnet.style_weights"):
        load_style_encoder("ViT-B-32", "", seed=0, allow_random=False)
