"""Sample videos as artifacts: an H.264 MP4 and a looping GIF preview of the same frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from tasks.synthetic import write_mp4


def write_preview(frames: np.ndarray, folder: Path, stem: str, fps: int) -> list[Path]:
    """`stem`.mp4 and `stem`.gif of (t, h, w, 3) uint8 frames in `folder`; returns both paths."""
    folder.mkdir(parents=True, exist_ok=True)
    write_mp4(frames, folder / f"{stem}.mp4", fps)
    images = [Image.fromarray(frame) for frame in frames]
    images[0].save(folder / f"{stem}.gif", save_all=True, append_images=images[1:], duration=1000 // fps, loop=0)
    return [folder / f"{stem}.mp4", folder / f"{stem}.gif"]
