"""A caption probe for the embedded demo world: which coloured shape moves which way in a video.

The demo set (tasks/preprocessing/synthetic.py draws it from the palette, shapes and directions
defined here) captions every video with what it shows, "a red circle moves left on a striped
background", so a video, real or generated, can be checked against a caption by its pixels:

1. shape pixels: bright and near a palette colour (the textured backgrounds are dim: no channel
   above ~110, while every palette colour has a channel of 190 or more);
2. colour: the palette colour with the most such pixels over the whole clip;
3. track: per frame, the centroid of that colour's pixels (frames with too few are gaps);
4. direction: the dominant axis of the track's net displacement, or "static" when it moves less
   than `min_travel` of the frame;
5. shape: how much of its bounding box the mask fills (square ~1, circle pi/4, triangle ~1/2), in
   the frame where it is largest without touching the border.

Anything the probe cannot see (no bright palette pixels, a shape cut by the border in every
frame) is None, which a caller counts as wrong. Pure numpy; no networks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
    "white": (245, 245, 245),
    "purple": (150, 60, 200),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}  # (dy, dx) per step
TEXTURES = ("striped", "checkered", "dotted", "gradient")  # the dim backgrounds the captions name
STATIC = "static"  # what a caption's "stays still" reads as
CHANCE = {"color": 1 / len(PALETTE), "shape": 1 / len(SHAPES), "direction": 1 / len(DIRECTIONS)}

MIN_BRIGHTNESS = 140  # a shape pixel's brightest channel; backgrounds stay below ~110
MAX_COLOR_DISTANCE = 90.0  # RGB distance to the nearest palette colour (compression shifts edges)
MIN_PIXELS = 6  # fewer in a frame: the shape is not seen there
FILL_SQUARE, FILL_CIRCLE = 0.89, 0.64  # bounding-box fill above: square; above: circle; below: triangle

_CAPTION = re.compile(r"^an? (?P<color>\w+) (?P<shape>\w+) (?:moves (?P<direction>\w+)|stays still)\b")


@dataclass(frozen=True)
class ProbeResult:
    color: str | None
    shape: str | None
    direction: str | None  # one of DIRECTIONS, STATIC, or None when the shape is never seen
    track: np.ndarray  # (t, 2) float: the shape's (y, x) centroid per frame, nan where unseen
    pixels: int  # shape pixels of the chosen colour over the clip


def parse_caption(caption: str) -> dict[str, str]:
    """'a red circle moves left on a striped background' -> {color, shape, direction}."""
    found = _CAPTION.match(caption.strip().lower())
    if not found or found["color"] not in PALETTE or found["shape"] not in SHAPES:
        raise ValueError(f"{caption!r} is not a caption of the demo world ('a COLOR SHAPE moves DIRECTION ...')")
    direction = found["direction"] or STATIC
    if direction not in (*DIRECTIONS, STATIC):
        raise ValueError(f"{caption!r}: direction {direction!r} is not one of {', '.join(DIRECTIONS)}")
    return {"color": found["color"], "shape": found["shape"], "direction": direction}


# What a caption's word is changed to when that word alone is swapped (caption_reading): the
# next colour of the palette, the next shape, the opposite direction.
SWAPS = {
    "color": dict(zip(PALETTE, list(PALETTE)[1:] + list(PALETTE)[:1])),
    "shape": dict(zip(SHAPES, SHAPES[1:] + SHAPES[:1])),
    "direction": {"left": "right", "right": "left", "up": "down", "down": "up"},
}
_WORD_POSITION = {"color": 1, "shape": 2, "direction": 4}  # in "a COLOR SHAPE moves DIRECTION on a ..."


def swap_attribute(caption: str, attribute: str) -> str | None:
    """The caption with one attribute's word changed (SWAPS) and every other word kept; None when
    the caption has no such word to change (a still shape has no direction)."""
    found = parse_caption(caption)
    if found[attribute] == STATIC:
        return None
    words = caption.strip().split()
    position = _WORD_POSITION[attribute]
    if words[position].lower() != found[attribute]:
        raise ValueError(f"{caption!r}: expected {found[attribute]!r} as word {position + 1}")
    words[position] = SWAPS[attribute][found[attribute]]
    return " ".join(words)


def palette_labels(video: np.ndarray) -> np.ndarray:
    """(t, h, w, 3) uint8 -> (t, h, w) int: the index of the nearest palette colour for shape
    pixels, -1 for background."""
    pixels = video.astype(np.float32)
    colors = np.array(list(PALETTE.values()), np.float32)  # (k, 3)
    distance = np.linalg.norm(pixels[..., None, :] - colors, axis=-1)  # (t, h, w, k)
    nearest = distance.argmin(-1)
    bright = pixels.max(-1) >= MIN_BRIGHTNESS
    close = np.take_along_axis(distance, nearest[..., None], -1)[..., 0] <= MAX_COLOR_DISTANCE
    return np.where(bright & close, nearest, -1)


def fill_ratio(mask: np.ndarray) -> float:
    ys, xs = np.nonzero(mask)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    return float(mask.sum() / box)


def classify_shape(masks: np.ndarray) -> str | None:
    """The shape class from the largest mask that does not touch the frame's border (the border
    cuts a shape into another; when it touches in every frame, the largest mask all the same)."""
    seen = [mask for mask in masks if mask.sum() >= MIN_PIXELS]
    if not seen:
        return None
    inside = [mask for mask in seen if not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())]
    ratio = fill_ratio(max(inside or seen, key=lambda mask: mask.sum()))
    return "square" if ratio >= FILL_SQUARE else "circle" if ratio >= FILL_CIRCLE else "triangle"


def travel_direction(track: np.ndarray, size: tuple[int, int], min_travel: float) -> str | None:
    """The dominant axis of the net displacement between the first and last seen centroids,
    measured in fractions of the frame's height and width."""
    seen = track[~np.isnan(track).any(axis=1)]
    if len(seen) == 0:
        return None
    if len(seen) == 1:
        return STATIC
    dy, dx = (seen[-1] - seen[0]) / np.array(size, np.float32)
    if max(abs(dy), abs(dx)) < min_travel:
        return STATIC
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def probe(video: np.ndarray, min_travel: float = 0.04) -> ProbeResult:
    """What moves in `video` (t, h, w, 3) uint8, and where to."""
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"expected a (t, h, w, 3) video, got shape {video.shape}")
    frames, height, width = video.shape[:3]
    labels = palette_labels(video)
    counts = np.bincount(labels[labels >= 0], minlength=len(PALETTE))
    if counts.max(initial=0) < MIN_PIXELS:
        return ProbeResult(None, None, None, np.full((frames, 2), np.nan), 0)
    chosen = int(counts.argmax())
    masks = labels == chosen  # (t, h, w)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    track = np.full((frames, 2), np.nan, np.float32)
    for t, mask in enumerate(masks):
        if mask.sum() >= MIN_PIXELS:
            track[t] = ys[mask].mean(), xs[mask].mean()
    return ProbeResult(
        color=list(PALETTE)[chosen],
        shape=classify_shape(masks),
        direction=travel_direction(track, (height, width), min_travel),
        track=track,
        pixels=int(counts[chosen]),
    )


def centroid_error(track: np.ndarray, reference: np.ndarray, size: tuple[int, int]) -> float:
    """Mean distance in pixels between two (t, 2) centroid tracks over the frames where both are
    seen; the frame's diagonal (the worst case) when no frame has both."""
    both = ~(np.isnan(track).any(axis=1) | np.isnan(reference).any(axis=1))
    if not both.any():
        return float(np.hypot(*size))
    return float(np.linalg.norm(track[both] - reference[both], axis=1).mean())


def agreement(results: list[ProbeResult], captions: list[str]) -> dict[str, float]:
    """Share of videos whose probed colour, shape and direction match their caption's (None
    counts as wrong), with the chance level of each beside it."""
    if len(results) != len(captions) or not results:
        raise ValueError(f"{len(results)} probe results for {len(captions)} captions")
    wanted = [parse_caption(caption) for caption in captions]
    scores = {}
    for key in ("color", "shape", "direction"):
        scores[key] = float(np.mean([getattr(result, key) == want[key] for result, want in zip(results, wanted)]))
        scores[f"{key}_chance"] = CHANCE[key]
    scores["videos"] = len(results)
    return scores
