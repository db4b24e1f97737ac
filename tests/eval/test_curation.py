"""Motion and scene-cut scores on synthetic videos built to have, or not have, motion and cuts:
first as raw frames, then through a real H.264 encode/decode round trip."""

import numpy as np
import pytest

from eval import curation
from tasks.preprocessing.synthetic import render
from tasks.storage.previews import write_mp4
from tasks.storage.video_io import decode_frames

H, W, N = 48, 64, 12


def moving_square(num_frames=N, step=3, background=40, color=(200, 50, 50)):
    frames = np.full((num_frames, H, W, 3), background, np.uint8)
    for t in range(num_frames):
        frames[t, 16:32, 4 + step * t : 20 + step * t] = color
    return frames


def test_static_video_has_zero_motion_and_moving_video_has_the_expected_motion():
    assert curation.motion_scores(np.repeat(moving_square()[:1], N, axis=0)).max() == 0.0
    scores = curation.motion_scores(moving_square(step=3))
    # Each step changes 2 * 3 columns x 16 rows of the square from/to background: grey 40 <-> 100.
    changed_pixels, grey_change = 2 * 3 * 16, (np.mean((200, 50, 50)) - 40) / 255
    np.testing.assert_allclose(scores, changed_pixels * grey_change / (H * W), rtol=1e-5)


def test_motion_keeps_the_histogram_but_a_cut_replaces_it():
    moving = moving_square()
    assert curation.histogram_distances(moving).max() == 0.0  # a translated square: same colours
    other_scene = np.full((N, H, W, 3), 180, np.uint8)
    cut_video = np.concatenate([moving[:5], other_scene[:7]])
    distances = curation.histogram_distances(cut_video)
    assert curation.cut_positions(distances, 0.45) == [4]  # between frame 4 and frame 5
    assert distances[4] == pytest.approx(1.0)  # disjoint colour distributions


def test_adaptive_rule_finds_a_cut_between_similar_scenes():
    steady = np.array([0.03, 0.04, 0.03, 0.32, 0.03, 0.02, 0.04])
    assert curation.cut_positions(steady, threshold=0.45) == []
    assert curation.cut_positions(steady, threshold=0.45, adaptive_ratio=4.0, min_distance=0.15) == [3]
    busy = np.array([0.20, 0.25, 0.22, 0.32, 0.24, 0.21, 0.26])  # fast motion: nothing stands out
    assert curation.cut_positions(busy, threshold=0.45, adaptive_ratio=4.0, min_distance=0.15) == []


@pytest.mark.parametrize(
    "cuts, expected",
    [([], (0, 10)), ([3], (4, 10)), ([5], (0, 6)), ([1, 6], (2, 7)), ([0, 8], (1, 9))],
)
def test_longest_clean_segment(cuts, expected):
    assert curation.longest_clean_segment(10, cuts) == expected


def test_scores_survive_a_real_h264_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    cases = {
        "moving": render(80, 112, 24, rng, static=False, cut_at=None),
        "static": render(80, 112, 24, rng, static=True, cut_at=None),
        "cut": render(80, 112, 24, rng, static=False, cut_at=10),
    }
    scores = {}
    for name, (frames, _) in cases.items():
        path = tmp_path / f"{name}.mp4"
        write_mp4(frames, path, fps=24)
        decoded = decode_frames(path, range(0, 24, 2), 48, 64)
        scores[name] = (curation.motion_scores(decoded).mean(), curation.histogram_distances(decoded))
    assert scores["static"][0] < 0.002 < scores["moving"][0]
    assert curation.cut_positions(scores["moving"][1], 0.45) == []
    assert curation.cut_positions(scores["static"][1], 0.45) == []
    assert curation.cut_positions(scores["cut"][1], 0.45) == [4]  # sampled frames 8 -> 10
