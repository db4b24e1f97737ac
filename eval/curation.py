"""Curation scores computed on small frames: motion, scene cuts, clean segments.

Frames here are uint8 (n, h, w, 3) sampled at the clip stride, so the scores describe what a
training clip would see. Both scores live in [0, 1] and do not depend on frame size.
"""

from __future__ import annotations

import numpy as np

HISTOGRAM_BINS = 32


def motion_scores(frames: np.ndarray) -> np.ndarray:
    """Mean |grey_{t+1} - grey_t| per step, grey in [0, 1]: (n, h, w, 3) -> (n-1,).

    Near 0 for a static shot (a still image, a slideshow frame), larger with more moving pixels.
    """
    grey = frames.astype(np.float32).mean(axis=-1) / 255.0  # (n, h, w)
    return np.abs(np.diff(grey, axis=0)).mean(axis=(1, 2))


def histogram_distances(frames: np.ndarray, bins: int = HISTOGRAM_BINS) -> np.ndarray:
    """Colour-histogram change per step: (n, h, w, 3) -> (n-1,) in [0, 1].

    Per channel, the normalised histograms of successive frames are compared with half the L1
    distance (total variation: 0 = same colour distribution, 1 = disjoint); channels are
    averaged. Motion moves pixels but keeps the histogram; a hard cut replaces it.
    """
    n = frames.shape[0]
    edges = np.linspace(0, 256, bins + 1)
    histograms = np.empty((n, 3, bins), dtype=np.float64)
    for channel in range(3):
        for index in range(n):
            histograms[index, channel], _ = np.histogram(frames[index, ..., channel], bins=edges)
    histograms /= histograms.sum(axis=-1, keepdims=True)
    return 0.5 * np.abs(np.diff(histograms, axis=0)).sum(axis=-1).mean(axis=-1)


def cut_positions(distances: np.ndarray, threshold: float, adaptive_ratio: float = 0.0, min_distance: float = 0.0, window: int = 3) -> list[int]:
    """Steps i (a cut between sampled frames i and i+1) that look like hard cuts.

    A step is a cut when its histogram distance exceeds `threshold`, or, adaptively, when it is
    at least `min_distance` and `adaptive_ratio` times the median of the `window` steps on each
    side: two scenes with similar colours still make one step stand out from steady motion
    (the idea of PySceneDetect's adaptive detector). adaptive_ratio = 0 turns the rule off.
    """
    cuts = []
    for i, distance in enumerate(distances):
        neighbours = np.concatenate([distances[max(0, i - window) : i], distances[i + 1 : i + 1 + window]])
        local = float(np.median(neighbours)) if len(neighbours) else 0.0
        adaptive = adaptive_ratio > 0 and distance >= min_distance and distance >= adaptive_ratio * local
        if distance > threshold or adaptive:
            cuts.append(i)
    return cuts


def longest_clean_segment(num_frames: int, cuts: list[int]) -> tuple[int, int]:
    """Longest run of sampled frames with no cut inside, as [start, end) frame positions.

    A cut at step i separates frame i from frame i+1. Ties go to the earliest segment.
    """
    bounds = [0] + [cut + 1 for cut in sorted(cuts)] + [num_frames]
    segments = [(bounds[k], bounds[k + 1]) for k in range(len(bounds) - 1)]
    return max(segments, key=lambda segment: (segment[1] - segment[0], -segment[0]))
