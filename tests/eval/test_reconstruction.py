"""Reconstruction metrics: parity with scikit-image, BT.601 YUV, and what flicker measures."""

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from eval.reconstruction import flicker, grouped_bootstrap, paired_difference, psnr, reconstruction_metrics, rgb_to_yuv, spread, ssim


@pytest.fixture(scope="module")
def degraded(fixture_clip):
    """The real clip and a lossy copy of it (per-frame noise + a brightness shift)."""
    noise = np.random.default_rng(0).integers(-12, 13, fixture_clip.shape)
    return torch.from_numpy(fixture_clip), torch.from_numpy(np.clip(fixture_clip.astype(int) + noise + 5, 0, 255).astype(np.uint8))


def test_bt601_full_range_on_primaries():
    colours = torch.tensor([[[[255, 255, 255], [0, 0, 0], [255, 0, 0], [0, 0, 255]]]], dtype=torch.uint8)
    yuv = rgb_to_yuv(colours)[0, :, 0].T  # (4 colours, 3)
    expected = torch.tensor([[255, 128, 128], [0, 128, 128], [76.245, 84.972, 255], [29.07, 255, 107.265]], dtype=torch.float64)
    assert torch.allclose(yuv, expected, atol=0.01)


def test_psnr_and_ssim_match_scikit_image_on_real_frames(degraded):
    source, test = degraded
    source_yuv, test_yuv = rgb_to_yuv(source), rgb_to_yuv(test)
    ours_psnr, ours_ssim = psnr(source_yuv, test_yuv), ssim(source_yuv, test_yuv)
    for frame in range(source.shape[0]):
        a, b = source_yuv[frame].numpy(), test_yuv[frame].numpy()
        assert abs(float(ours_psnr[frame]) - peak_signal_noise_ratio(a, b, data_range=255)) < 1e-4
        for channel in range(3):
            reference = structural_similarity(a[channel], b[channel], gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)
            assert abs(float(ours_ssim[frame, channel]) - reference) < 1e-4
    y_only = peak_signal_noise_ratio(source_yuv[0, 0].numpy(), test_yuv[0, 0].numpy(), data_range=255)
    assert abs(float(psnr(source_yuv[:1, :1], test_yuv[:1, :1])[0]) - y_only) < 1e-4


def test_identical_clips_are_perfect(fixture_clip):
    clip = torch.from_numpy(fixture_clip)[None]
    figures = reconstruction_metrics(clip, clip.clone())
    assert figures["psnr_y"] == float("inf") and figures["ssim_yuv"] == pytest.approx(1.0) and figures["flicker"] == 0.0


def test_flicker_sees_frame_to_frame_noise_that_a_constant_error_does_not_have(fixture_clip):
    clip = torch.from_numpy(fixture_clip.astype(np.int16))[None]
    steady = (clip + 6).clamp(0, 255)  # the same error on every frame
    noise = torch.from_numpy(np.random.default_rng(1).choice([-6, 6], size=(*clip.shape[:-1], 1)))  # grey: Y moves by 6
    flickering = (clip + noise).clamp(0, 255)  # errors of the same size, changing each frame
    assert float(flicker(clip, steady)) < 0.5  # only where +6 clips at 255
    assert float(flicker(clip, flickering)) > 5.0
    # PSNR cannot tell the two apart: the error is 6 grey levels per pixel in both
    assert reconstruction_metrics(clip.to(torch.uint8), steady.to(torch.uint8))["psnr_y"] == pytest.approx(
        reconstruction_metrics(clip.to(torch.uint8), flickering.to(torch.uint8))["psnr_y"], abs=0.5)


def test_shape_mismatch_is_an_error(fixture_clip):
    clip = torch.from_numpy(fixture_clip)[None]
    with pytest.raises(ValueError, match="differ in shape"):
        reconstruction_metrics(clip, clip[:, :4])


def test_the_spread_resamples_whole_videos_and_covers_only_real_differences():
    videos = np.repeat(np.arange(6), 3)  # 6 videos of 3 clips
    rng = np.random.default_rng(0)
    same_per_video = np.repeat(rng.normal(size=6), 3)
    assert grouped_bootstrap(same_per_video, videos, resamples=500).min() >= same_per_video.min()  # means of whole videos
    assert spread(np.ones(18), videos)["std_error"] == 0.0
    assert spread(np.ones(3), np.zeros(3))["low"] == spread(np.ones(3), np.zeros(3))["high"] == 1.0  # one video: nothing to resample
    shift = spread(1.0 + 0.1 * rng.normal(size=18), videos)  # a clear improvement: the interval excludes 0
    assert 0 < shift["low"] < 1 < shift["high"] < 1.2
    noise = spread(rng.normal(size=18), videos)  # no difference: the interval straddles 0
    assert noise["low"] < 0 < noise["high"]


def test_a_paired_difference_is_called_better_only_when_its_interval_clears_zero():
    videos = np.repeat(np.arange(6), 3)
    rng = np.random.default_rng(1)
    base = rng.normal(size=18)
    improved = paired_difference(base + 1.0 + 0.1 * rng.normal(size=18), base, videos)
    assert improved["verdict"] == "better" and 0 < improved["low"] < 1 < improved["high"]
    assert paired_difference(base + 1.0, base, videos, lower_is_better=True)["verdict"] == "worse"  # e.g. flicker
    assert paired_difference(base + rng.normal(size=18), base, videos)["verdict"] == "within spread"
    assert paired_difference(np.ones(3), np.zeros(3), np.zeros(3))["verdict"] == "one video: no spread"
