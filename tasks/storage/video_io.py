"""Video files: the WebVid path convention, probing, and clip decoding with decord.

decord is used for every frame we keep: it decodes only up to the frames asked for, in one
batched `get_batch` call, and resizes inside the decoder (`VideoReader(width=, height=)`), which is
much cheaper than converting full-size frames to RGB and resizing afterwards. PyAV is used only to
read container and codec names from the header.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import av
import decord
import numpy as np
import torch
import torch.nn.functional as F

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm")


class VideoError(Exception):
    """A video that cannot be used; `reason` is the machine-readable rejection reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def video_relative_path(page_dir: str, videoid: str) -> str:
    """{page_dir}/{videoid}.mp4, the file a CSV row names relative to videos_root.

    A videoid that already ends in a video extension (`clip.mkv`) is used as the file name, so a
    CSV can list containers other than MP4 (UCF-101's AVI, Matroska).
    """
    name = str(videoid)
    if not name.lower().endswith(VIDEO_EXTENSIONS):
        name += ".mp4"
    if os.path.isabs(str(page_dir)):
        raise VideoError("path_outside_root", f"{page_dir}/{name}: page_dir is an absolute path; it must be relative to videos_root")
    return os.path.join(str(page_dir), name)


def video_path(videos_root: str | Path, page_dir: str, videoid: str) -> Path:
    """{videos_root}/{page_dir}/{videoid}.mp4, refusing paths that leave videos_root."""
    return path_under(videos_root, video_relative_path(page_dir, videoid))


def path_under(root: str | Path, relative: str, follow_links: bool = False) -> Path:
    """root/relative, refusing one that leaves root: by `..`, or (unless follow_links) by a symlink
    (the file's or a folder's) pointing elsewhere. Without follow_links both sides are resolved
    (realpath), so a root that is itself a link to a big disk is fine, and a link inside the root
    to another file inside it is too."""
    candidate = Path(os.path.normpath(os.path.join(os.path.abspath(root), relative)))
    resolve = os.path.abspath if follow_links else os.path.realpath
    real_root = resolve(root)
    if os.path.commonpath([real_root, resolve(candidate)]) != real_root:
        raise VideoError("path_outside_root", f"{relative} resolves outside videos_root (via '..' or a symlink)")
    return candidate


def relative_to_root(text: str, videos_root: str) -> str:
    """A message with the files under videos_root named relative to it: the stages' outputs
    are then the same bytes in every checkout, on every machine (DVC hashes them), and whether
    the videos were read in place or from a local copy of a bucket's."""
    return text.replace(os.path.join(os.path.abspath(videos_root), ""), "")


@dataclass(frozen=True)
class Probe:
    container: str
    codec: str
    num_frames: int
    fps: float
    height: int  # as decoded (rotation applied), not as coded
    width: int

    @property
    def duration_s(self) -> float:
        return self.num_frames / self.fps if self.fps > 0 else 0.0


def probe_video(path: Path) -> Probe:
    """Container/codec from the header (PyAV); frame count, fps and size from decord."""
    if not path.exists():
        raise VideoError("missing_file", f"{path} does not exist")
    if path.stat().st_size == 0:
        raise VideoError("unreadable", f"{path} is empty (0 bytes)")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError("unreadable", f"{path} has no video stream")
            stream = container.streams.video[0]
            container_name = container.format.name
            codec = stream.codec_context.name
        reader = decord.VideoReader(str(path), num_threads=1)
        num_frames, fps = len(reader), float(reader.get_avg_fps())
        height, width = reader[0].shape[:2]
        del reader
    except VideoError:
        raise
    except Exception as error:  # PyAV / decord raise many types for a broken file
        raise VideoError("unreadable", f"{path}: {type(error).__name__}: {_first_line(error)}") from None
    return Probe(container_name, codec, num_frames, fps, int(height), int(width))


def clip_stride(source_fps: float, target_fps: float) -> int:
    """Source frames between two clip frames, e.g. 29.97 -> 8 fps gives 4, 6 -> 8 fps gives 1."""
    return max(1, round(source_fps / target_fps))


def window_length(frames: int, stride: int) -> int:
    """Source frames one clip spans."""
    return (frames - 1) * stride + 1


def cover_size(height: int, width: int, out_height: int, out_width: int) -> tuple[int, int]:
    """Smallest aspect-preserving size that covers out_height x out_width (resize-then-crop)."""
    scale = max(out_height / height, out_width / width)
    return max(out_height, math.ceil(height * scale - 1e-6)), max(out_width, math.ceil(width * scale - 1e-6))


def open_reader(path: Path, height: int, width: int) -> decord.VideoReader:
    """A decord reader that decodes straight to height x width (resizing inside the decoder)."""
    try:
        return decord.VideoReader(str(path), width=width, height=height, num_threads=1)
    except Exception as error:
        raise VideoError("undecodable", f"{path}: {type(error).__name__}: {_first_line(error)}") from None


def read_frames(reader: decord.VideoReader, path: Path, indices: list[int] | np.ndarray, height: int, width: int) -> np.ndarray:
    """Frames at `indices` as (n, height, width, 3) uint8, in one batched `get_batch`."""
    try:
        frames = reader.get_batch(list(map(int, indices))).asnumpy()
        reader.seek(0)  # decord keeps decoded buffers alive until the reader moves (REFERENCE.md)
    except Exception as error:
        raise VideoError("undecodable", f"{path}: {type(error).__name__}: {_first_line(error)}") from None
    if frames.shape[1:3] != (height, width):  # e.g. rotated sources: decord sizes before rotating
        frames = resize_frames(frames, height, width)
    return frames


def decode_frames(path: Path, indices: list[int] | np.ndarray, height: int, width: int) -> np.ndarray:
    """Frames at `indices`, decoded straight to (n, height, width, 3) uint8 by decord."""
    return read_frames(open_reader(path, height, width), path, indices, height, width)


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """(n, h, w, 3) uint8 -> (n, height, width, 3) uint8, antialiased bilinear."""
    tensor = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    tensor = F.interpolate(tensor, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return tensor.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def center_crop(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """(..., h, w, 3) -> (..., height, width, 3), centred."""
    h, w = frames.shape[-3:-1]
    top, left = (h - height) // 2, (w - width) // 2
    return frames[..., top : top + height, left : left + width, :]


# decord prefixes its messages with the wall-clock time ("[07:40:50] src/video/..."): dropped, so
# the same broken file gets the same message (rejected.parquet is hashed by DVC)
_LOG_TIME = re.compile(r"\[\d{2}:\d{2}:\d{2}\] ")


def _first_line(error: BaseException) -> str:
    text = _LOG_TIME.sub("", str(error)).strip().splitlines()
    return text[0][:300] if text else ""
