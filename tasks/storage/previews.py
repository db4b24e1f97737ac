"""Sample videos as artifacts: an H.264 MP4 and a looping GIF preview of the same frames."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image


def write_preview(frames: np.ndarray, folder: Path, stem: str, fps: int) -> list[Path]:
    """`stem`.mp4 and `stem`.gif of (t, h, w, 3) uint8 frames in `folder`; returns both paths."""
    folder.mkdir(parents=True, exist_ok=True)
    write_mp4(frames, folder / f"{stem}.mp4", fps)
    images = [Image.fromarray(frame) for frame in frames]
    images[0].save(folder / f"{stem}.gif", save_all=True, append_images=images[1:], duration=1000 // fps, loop=0)
    return [folder / f"{stem}.mp4", folder / f"{stem}.gif"]


def write_mp4(frames: np.ndarray, path: Path, fps: int | Fraction) -> None:
    """H.264 (yuv420p) MP4 whose bytes depend on the frames only: one encoder thread, and no
    macroblock-tree rate control, which gave 4 different files for the same frames in 5 writes in
    a busy process, and 1 to 5 differing videos of 64 between demo runs of prepare."""
    options = {"crf": "18", "preset": "veryfast", "x264-params": "no-mbtree=1"}
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps, options=options)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
