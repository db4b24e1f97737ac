"""The caption probe reads back what the demo world's videos show: on drawn videos with known
answers, on the real H.264 files of the embedded set decoded by the decode stage's code, and, for
a model that ignores its prompt, at chance."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from eval.caption_probe import CHANCE, DIRECTIONS, PALETTE, SHAPES, STATIC, agreement, centroid_error, parse_caption, probe, swap_attribute
from tasks.config.params import DecodeParams, FilterParams, PrepareParams
from tasks.preprocessing.assessment import assess_video
from tasks.preprocessing.clips import decode_video_clips
from tasks.preprocessing.synthetic import draw_shape, generate, texture


def drawn_video(color: str, shape: str, direction: str | None, frames: int = 8, size: int = 64, seed: int = 0) -> np.ndarray:
    """A shape of `color` crossing a dim texture `direction`-wards by 2 px a frame (None: still)."""
    rng = np.random.default_rng(seed)
    background = texture("striped", size, size, rng)[:size, :size].astype(np.uint8)
    dy, dx = DIRECTIONS[direction] if direction else (0, 0)
    video = np.empty((frames, size, size, 3), np.uint8)
    for t in range(frames):
        video[t] = background
        draw_shape(video[t], shape, PALETTE[color], size / 2 + dy * 2 * (t - frames / 2), size / 2 + dx * 2 * (t - frames / 2), size * 0.15)
    return video


@pytest.mark.parametrize("color", list(PALETTE))
def test_each_colour(color):
    assert probe(drawn_video(color, "circle", "left")).color == color


@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_each_direction_and_its_track(direction):
    result = probe(drawn_video("green", "square", direction))
    assert result.direction == direction
    dy, dx = DIRECTIONS[direction]
    step = np.diff(result.track, axis=0).mean(0)  # px per frame, (y, x)
    assert step == pytest.approx([2 * dy, 2 * dx], abs=0.3)


@pytest.mark.parametrize("shape", SHAPES)
def test_each_shape(shape):
    assert probe(drawn_video("yellow", shape, "down")).shape == shape


def test_a_still_shape_is_static_and_an_empty_video_is_unseen():
    assert probe(drawn_video("blue", "triangle", None)).direction == STATIC
    empty = drawn_video("red", "circle", None)
    empty[:] = empty[:1, :1, :1]  # one dim background colour everywhere: no shape at all
    result = probe(empty)
    assert (result.color, result.shape, result.direction, result.pixels) == (None, None, None, 0)
    assert np.isnan(result.track).all()
    assert agreement([result], ["a red circle moves left on a dotted background"])["color"] == 0.0  # unseen counts as wrong


def test_captions_parse_and_bad_ones_say_why():
    assert parse_caption("a purple triangle moves up on a checkered background") == {"color": "purple", "shape": "triangle", "direction": "up"}
    assert parse_caption("a white square stays still on a gradient background")["direction"] == STATIC
    with pytest.raises(ValueError, match="not a caption of the demo world"):
        parse_caption("a person doing a handstand")


def test_chance_levels_and_a_prompt_blind_model_scores_at_chance():
    assert CHANCE == {"color": 1 / 6, "shape": 1 / 3, "direction": 1 / 4}
    captions = [f"a {color} {shape} moves {direction} on a striped background" for color, shape, direction in itertools.product(PALETTE, SHAPES, DIRECTIONS)]
    fixed = probe(drawn_video("red", "circle", "left"))  # the same video whatever the prompt
    scores = agreement([fixed] * len(captions), captions)
    assert (scores["color"], scores["shape"], scores["direction"]) == pytest.approx((1 / 6, 1 / 3, 1 / 4))


def test_the_probe_agrees_with_the_captions_of_the_real_decoded_demo_clips(tmp_path):
    """The embedded set's own H.264 files (prepare's generator), assessed and cut into clips by
    the filter's and decode stage's code: colour, shape and direction agree with the captions."""
    demo = PrepareParams()  # the demo's own videos: its size, length and frame rate
    rows = generate(tmp_path, num_videos=64, seconds=demo.seconds, fps=demo.fps, height=demo.height, width=demo.width, seed=0)
    cfg = DecodeParams()
    results, captions = [], []
    for row in {row["videoid"]: row for row in rows}.values():  # a re-crawled id keeps its last caption
        assessed = assess_video(row, str(tmp_path), FilterParams(), cfg)
        if assessed["reason"]:  # static, empty caption, ...: the filter's rejections
            continue
        _, clips = decode_video_clips(str(tmp_path / assessed["path"]), assessed["height"], assessed["width"], assessed["segment_start"], assessed["segment_end"], assessed["stride"], cfg)
        results += [probe(clip) for clip in clips]
        captions += [row["name"]] * len(clips)
    scores = agreement(results, captions)
    assert scores["videos"] >= 40
    assert scores["color"] >= 0.95 and scores["direction"] >= 0.95 and scores["shape"] >= 0.9, scores


def test_centroid_error_in_pixels_over_frames_seen_in_both():
    track = np.array([[10.0, 10.0], [12.0, 10.0], [np.nan, np.nan]])
    assert centroid_error(track, track, (64, 64)) == 0.0
    assert centroid_error(track, track + [3.0, 4.0], (64, 64)) == pytest.approx(5.0)
    assert centroid_error(track, np.full((3, 2), np.nan), (64, 48)) == pytest.approx(80.0)  # never both seen: the diagonal
    moving = probe(drawn_video("white", "circle", "right")).track
    assert centroid_error(moving, probe(drawn_video("white", "circle", "left")).track, (64, 64)) > 5


@pytest.mark.parametrize("attribute", ["color", "shape", "direction"])
def test_swapping_one_attribute_changes_that_word_alone(attribute):
    for color, shape, direction in itertools.product(PALETTE, SHAPES, DIRECTIONS):
        caption = f"a {color} {shape} moves {direction} on a checkered background"
        swapped = swap_attribute(caption, attribute)
        before, after = parse_caption(caption), parse_caption(swapped)
        assert after[attribute] != before[attribute]
        assert {k: v for k, v in after.items() if k != attribute} == {k: v for k, v in before.items() if k != attribute}
        assert swapped.endswith("on a checkered background")
    assert swap_attribute("a red circle moves left on a dotted background", "direction").split()[4] == "right"  # the opposite
    still = "a red circle stays still on a dotted background"
    assert swap_attribute(still, "direction") is None and swap_attribute(still, "color").startswith("a green circle stays still")
