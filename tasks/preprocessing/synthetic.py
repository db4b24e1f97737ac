"""The embedded default dataset: short real H.264 MP4s of coloured shapes moving over textures.

Every video is drawn from a seeded RNG and encoded single-threaded, so the same parameters give
the same bytes (DVC sees an unchanged output). The caption states what moves and which way, which is
what a tiny text-to-video model can learn. A few rows are deliberately bad so that the filter
stage has real work on the demo: static shots, a hard scene cut, an exact duplicate file, an
empty caption and a re-crawled (duplicate) videoid. Beside the videos, an image-text set of
single frames of the same world (generate_images) stands in for LAION.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np

from eval.caption_probe import DIRECTIONS, PALETTE, SHAPES, TEXTURES  # the world the caption probe reads back
from tasks.storage.previews import write_mp4

# Which rows are deliberately bad (index modulo the period).
STATIC_EVERY, CUT_EVERY = 16, 16
CUT_OFFSET = 8


def never_drawn(color: str, shape: str, direction: str) -> bool:
    """A quarter of the colour x shape x direction combinations no video shows, so that
    evaluate's captions protocol can test composition on prompts no caption had. Every colour
    still moves every way and every shape too (with another shape, or colour), so each word of
    an unseen prompt was seen, only not together."""
    return (list(PALETTE).index(color) + SHAPES.index(shape)) % len(DIRECTIONS) == list(DIRECTIONS).index(direction)


def texture(kind: str, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A dim background pattern (h, w, 3) in [0, 255], twice as wide/tall so it can pan."""
    ys, xs = np.mgrid[0 : 2 * height, 0 : 2 * width].astype(np.float32)
    tint = rng.uniform(40, 110, size=3).astype(np.float32)
    period = rng.uniform(6, 14)
    if kind == "striped":
        pattern = 0.5 + 0.5 * np.sin(2 * np.pi * (xs + ys * rng.uniform(-0.5, 0.5)) / period)
    elif kind == "checkered":
        pattern = ((xs // period + ys // period) % 2).astype(np.float32)
    elif kind == "dotted":
        pattern = ((np.sin(2 * np.pi * xs / period) * np.sin(2 * np.pi * ys / period)) > 0.6).astype(np.float32)
    else:
        pattern = (xs + ys) / (2 * (height + width))
    return np.clip(tint * (0.8 + 0.2 * pattern[..., None]), 0, 255)


def draw_shape(frame: np.ndarray, shape: str, color: tuple[int, int, int], cy: float, cx: float, size: float) -> None:
    height, width = frame.shape[:2]
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    if shape == "circle":
        mask = (ys - cy) ** 2 + (xs - cx) ** 2 <= size**2
    elif shape == "square":
        mask = (np.abs(ys - cy) <= size) & (np.abs(xs - cx) <= size)
    else:  # triangle pointing up: inside when below the two slanted edges and above the base
        mask = (ys <= cy + size) & (np.abs(xs - cx) <= (ys - (cy - size)) * 0.6)
    frame[mask] = color


def draw_scene(rng: np.random.Generator, height: int, width: int, num_frames: int) -> dict:
    """What one shot shows: the shape, its colour, direction, background, size, speed and lane."""
    color, shape = list(PALETTE)[rng.integers(len(PALETTE))], SHAPES[rng.integers(len(SHAPES))]
    directions = [direction for direction in DIRECTIONS if not never_drawn(color, shape, direction)]
    return {
        "color": color,
        "shape": shape,
        "direction": directions[rng.integers(len(directions))],
        "texture": TEXTURES[rng.integers(len(TEXTURES))],
        "size": rng.uniform(0.16, 0.24) * min(height, width),
        "speed": rng.uniform(0.8, 1.0) * min(height, width) / num_frames,
        # across the motion: where the shape's path lies (a share of the frame), so that where a
        # shape is is not given by its direction alone and a control map carries news
        "lane": rng.uniform(0.3, 0.7),
    }


def render(
    height: int, width: int, num_frames: int, rng: np.random.Generator, *, static: bool, cut_at: int | None
) -> tuple[np.ndarray, str]:
    """(num_frames, h, w, 3) uint8 frames and their caption."""

    scenes = [draw_scene(rng, height, width, num_frames), draw_scene(rng, height, width, num_frames)]
    backgrounds = [texture(s["texture"], height, width, rng) for s in scenes]
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for t in range(num_frames):
        k = 1 if cut_at is not None and t >= cut_at else 0
        s, background = scenes[k], backgrounds[k]
        dy, dx = DIRECTIONS[s["direction"]]
        step = 0 if static else (t - (cut_at if k else 0))
        # The shape travels from one side to the other along its lane; the background pans gently.
        cy = height * (0.5 if dy else s["lane"]) + dy * (step * s["speed"] - 0.35 * height)
        cx = width * (0.5 if dx else s["lane"]) + dx * (step * s["speed"] - 0.35 * width)
        pan = 0 if static else int(step * 0.5)
        frame = background[pan : pan + height, pan : pan + width].astype(np.uint8).copy()
        draw_shape(frame, s["shape"], PALETTE[s["color"]], cy, cx, s["size"])
        frames[t] = frame
    # The caption tells the longer scene: the filter keeps a cut video's longest clean segment,
    # and a caption of the other scene would train (and probe) the wrong colour and direction.
    s = scenes[1] if cut_at is not None and num_frames - cut_at > cut_at else scenes[0]
    motion = "stays still" if static else f"moves {s['direction']}"
    return frames, f"a {s['color']} {s['shape']} {motion} on a {s['texture']} background"


def iso_duration(seconds: float) -> str:
    """WebVid's ISO-8601 duration: 15.4 -> 'PT00H00M15S'."""
    total = int(round(seconds))
    return f"PT{total // 3600:02d}H{total % 3600 // 60:02d}M{total % 60:02d}S"


def generate(
    videos_root: Path, *, num_videos: int, seconds: float, fps: int, height: int, width: int, seed: int
) -> list[dict]:
    """Write the videos under videos_root and return the raw CSV rows (duplicates included)."""
    num_frames = max(2, int(round(seconds * fps)))
    rows = []
    for index in range(num_videos):
        rng = np.random.default_rng([seed, index])
        videoid = f"synth{index:05d}"
        page_dir = f"{index // 100:03d}"
        static = index % STATIC_EVERY == STATIC_EVERY - 1
        cut_at = int(num_frames * 0.4) if index % CUT_EVERY == CUT_OFFSET else None
        frames, caption = render(height, width, num_frames, rng, static=static, cut_at=cut_at)
        path = videos_root / page_dir / f"{videoid}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_mp4(frames, path, fps)
        rows.append(_row(videoid, page_dir, caption, num_frames / fps))
    if num_videos >= 4:
        # An exact copy of video 1 under a new id: the filter's content hash must catch it.
        copy_id, page_dir = f"synth{num_videos:05d}", rows[1]["page_dir"]
        shutil.copyfile(videos_root / page_dir / "synth00001.mp4", videos_root / page_dir / f"{copy_id}.mp4")
        rows.append(_row(copy_id, page_dir, rows[1]["name"] + " again", num_frames / fps))
        # A caption that says nothing: the filter rejects it.
        rows[3] = {**rows[3], "name": ""}
        # A re-crawled videoid: the earlier row's caption is replaced by the later one (prepare).
        rows.insert(2, {**rows[2], "name": "an outdated caption from an earlier crawl"})
    return rows


def _row(videoid: str, page_dir: str, caption: str, seconds: float) -> dict:
    return {
        "videoid": videoid,
        "contentUrl": f"synthetic://{page_dir}/{videoid}.mp4",
        "duration": iso_duration(seconds),
        "page_dir": page_dir,
        "name": caption,
    }


# The image-text set (joint image-video training, section 3.1): single frames of the same world,
# captioned as a still image is ("a red circle on a striped background"), in img2dataset's
# WebDataset layout. Deliberately bad samples, so the filter has image work too: a truncated
# JPEG, a sample without a caption file, and one too small to train on.
TRUNCATED_IMAGE, UNCAPTIONED_IMAGE, TINY_IMAGE = 5, 9, 13


def render_image(height: int, width: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """(h, w, 3) uint8 and its caption: a shape anywhere in the central area of a background."""
    s = draw_scene(rng, height, width, num_frames=1)
    frame = texture(s["texture"], height, width, rng)[:height, :width].astype(np.uint8).copy()
    cy, cx = height * rng.uniform(0.3, 0.7), width * rng.uniform(0.3, 0.7)
    draw_shape(frame, s["shape"], PALETTE[s["color"]], cy, cx, s["size"])
    return frame, f"a {s['color']} {s['shape']} on a {s['texture']} background"


def generate_images(images_root: Path, *, num_images: int, height: int, width: int, seed: int, per_shard: int = 1000) -> int:
    """Write the image-text set as NNNNN.tar shards (+ their metadata Parquet); returns the
    number of samples written (bad ones included)."""
    from PIL import Image

    from tasks.storage.image_text import ImageSample, write_webdataset_shard

    images_root.mkdir(parents=True, exist_ok=True)
    samples = []
    for index in range(num_images):
        rng = np.random.default_rng([seed, 1_000_003, index])  # a stream of its own: the videos' RNGs are [seed, index]
        size = (height, width) if index != TINY_IMAGE else (height // 4, width // 4)
        frame, caption = render_image(*size, rng)
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="JPEG", quality=95)
        data = buffer.getvalue()
        if index == TRUNCATED_IMAGE:
            data = data[: len(data) // 2]
        key = f"{index // per_shard:05d}{index % per_shard:04d}"  # img2dataset's keys: shard, then position
        samples.append(ImageSample(key, data, ".jpg", None if index == UNCAPTIONED_IMAGE else caption, url=f"synthetic://images/{key}.jpg"))
    for shard in range(0, num_images, per_shard):
        write_webdataset_shard(images_root / f"{shard // per_shard:05d}.tar", samples[shard : shard + per_shard])
    return len(samples)
