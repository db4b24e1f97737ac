"""Condition extractors on the real fixture frames: canny is OpenCV's, HED and image maps have
the adapters' format, unknown or missing conditions fail clearly, style embeddings are unit norm."""

import cv2
import numpy as np
import pytest
import torch

from model.controlnet import CONDITIONS
from tasks.conditions import ConditionExtractor, ConditionSettings, condition_index, load_style_encoder, style_embeddings


def test_canny_equals_opencv_on_the_fixture_frames(fixture_clip_reader):
    for name in ("h264_340x256_28fps.mp4", "mpeg4_320x240_25fps.avi", "pancake_426x240_30fps.mkv"):
        frames = fixture_clip_reader(name, frames=4, size=96)
        maps = ConditionExtractor(ConditionSettings(canny_low=100, canny_high=200))("canny", frames)
        assert maps.shape == frames.shape and maps.dtype == np.uint8
        for frame, edges in zip(frames, maps):
            expected = cv2.Canny(frame, 100, 200)
            assert np.array_equal(edges[..., 0], expected) and np.array_equal(edges[..., 2], expected)
        assert 0.01 < (maps > 0).mean() < 0.5, name  # real edges: neither none nor everywhere


def test_thresholds_change_the_edges_and_bad_ones_are_refused(fixture_clip):
    loose = ConditionExtractor(ConditionSettings(canny_low=20, canny_high=60))("canny", fixture_clip)
    strict = ConditionExtractor(ConditionSettings(canny_low=150, canny_high=300))("canny", fixture_clip)
    assert (loose > 0).sum() > (strict > 0).sum()
    with pytest.raises(ValueError, match="low=200, high=100"):
        ConditionSettings(canny_low=200, canny_high=100)


def test_image_condition_repeats_or_keeps_the_first_frame(fixture_clip):
    repeated = ConditionExtractor(ConditionSettings(image_mode="repeat"))("image", fixture_clip)
    assert all(np.array_equal(frame, fixture_clip[0]) for frame in repeated)
    first = ConditionExtractor(ConditionSettings(image_mode="first_frame"))("image", fixture_clip)
    assert np.array_equal(first[0], fixture_clip[0]) and not first[1:].any()
    with pytest.raises(ValueError, match="choose one of repeat, first_frame"):
        ConditionSettings(image_mode="last")


def test_hed_maps_and_missing_weights(fixture_clip):
    maps = ConditionExtractor(ConditionSettings(), allow_random=True)("hed", fixture_clip)
    assert maps.shape == fixture_clip.shape and maps.dtype == np.uint8
    assert np.array_equal(maps[..., 0], maps[..., 1])
    with pytest.raises(FileNotFoundError, match="set train_controlnet.hed_weights"):
        ConditionExtractor(ConditionSettings())("hed", fixture_clip)


def test_condition_names():
    assert [condition_index(name) for name in ("canny", "hed", "image")] == [CONDITIONS.index(n) for n in ("canny", "hed", "image")]
    with pytest.raises(ValueError, match="unknown condition 'sketch'; choose one of canny, hed, depth, image"):
        condition_index("sketch")
    with pytest.raises(ValueError, match="MiDaS"):
        condition_index("depth")


def test_style_embeddings_are_unit_norm_and_tell_images_apart(fixture_clip_reader):
    encoder = load_style_encoder("ViT-B-32", "", seed=0, allow_random=True)
    images = np.stack([fixture_clip_reader("h264_340x256_28fps.mp4", 1)[0], fixture_clip_reader("pancake_426x240_30fps.mkv", 1)[0]])
    embedded = style_embeddings(encoder, images)
    assert torch.allclose(embedded.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert (embedded[0] - embedded[1]).abs().sum() > 1e-3
    with pytest.raises(FileNotFoundError, match="train_controlnet.style_weights"):
        load_style_encoder("ViT-B-32", "", seed=0, allow_random=False)
