"""Reference evaluation protocols: every choice that moves a published number, fixed by name.

FVD and IS are only comparable between runs that sample, crop, count and divide the same way
(reproductions of Latte and LaVie report 170 vs 220+ and 526 vs 690 from such choices). So each
protocol that claims to reproduce a published table is written down here once, as data, and the
evaluate stage records all of it beside every number it computes. A run that has to deviate (a
smaller sample budget, a list with too few usable videos) says so in `deviations` and is not
`follows_reference`.

stylegan-v     StyleGAN-V's `fvd2048_16f` on UCF-101, the FVD column of the paper's Table 2 (and
               of Tables 3 and 5): the real set is the first 2048 videos of a seeded shuffle of
               the chosen lists, each read as 16 consecutive native frames from a seeded random
               offset (videos shorter than 16 frames are discarded, as StyleGAN-V's
               `discard_short_videos`); 2048 generated videos whose class labels are drawn from the
               real list's own label distribution; covariances divided by n (`get_mean_cov`).
ucf101-is10k   The video Inception Score of the TGAN lineage on UCF-101 (the IS column of Table 2):
               10,000 generated videos, labels drawn as above, the UCF-101 C3D on 16 frames,
               10 splits after numpy RandomState(42) shuffling (StyleGAN-V's `compute_isv`).
msrvtt-paper   The paper's MSR-VTT protocol (section 4, Table 1): the 2990 test videos of
               test_videodatainfo.json, one seeded caption each as the prompt; 16 frames per
               generated video (the first 16 when the model makes more, as the paper does for
               VersVideo-H's 24), resized and centre-cropped to 256x256; CLIPSIM averaged over all
               2990 x 16 = 47,840 frames; FVD against 16 consecutive native frames from a seeded
               random offset of each test video with at least 16 frames.

Frames, sizes and counts apply to real and generated videos alike: generated videos are resized
to cover the scoring size and centre-cropped, exactly as real ones, so a model trained at
320x576 is scored at the protocol's 256x256 and not at its own resolution.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ReferenceProtocol:
    name: str
    reproduces: str  # the published metric / table it reproduces
    dataset: str  # ucf101 | msrvtt
    metrics: tuple[str, ...]  # what it reports: fvd, is, clipsim
    generated_videos: int
    real_videos: int  # 0: no real set (IS)
    frames: int  # frames scored per video, real and generated
    real_frames: str  # how real frames are read (recorded, and what `frame_window` implements)
    height: int  # scoring size: resize to cover, centre crop
    width: int
    covariance_ddof: int  # FVD: 0 divides by n (StyleGAN-V), 1 by n - 1 (np.cov)
    prompts: str  # how prompts are chosen per generated video
    is_splits: int = 10

    def record(self) -> dict:
        """The definition as eval.json stores it."""
        return {**asdict(self), "metrics": list(self.metrics)}


REAL_WINDOW = "16 consecutive native frames (stride 1) from a seeded random offset; shorter videos discarded"

REFERENCE_PROTOCOLS: dict[str, ReferenceProtocol] = {
    protocol.name: protocol
    for protocol in (
        ReferenceProtocol(
            "stylegan-v", "StyleGAN-V fvd2048_16f on UCF-101 (FVD of the paper's Tables 2, 3, 5)", "ucf101", ("fvd",),
            generated_videos=2048, real_videos=2048, frames=16, real_frames=REAL_WINDOW, height=256, width=256, covariance_ddof=0,
            prompts="class labels drawn uniformly from the real lists' videos (their label distribution), seeded; one prompt per class",
        ),
        ReferenceProtocol(
            "ucf101-is10k", "video IS of the UCF-101 C3D on 10,000 samples (IS of the paper's Tables 2, 3, 5)", "ucf101", ("is",),
            generated_videos=10_000, real_videos=0, frames=16, real_frames="none (IS needs no real videos)", height=256, width=256,
            covariance_ddof=0, prompts="class labels drawn uniformly from the lists' videos (their label distribution), seeded; one prompt per class",
        ),
        ReferenceProtocol(
            "msrvtt-paper", "the paper's MSR-VTT zero-shot protocol (CLIPSIM and FVD of Table 1)", "msrvtt", ("clipsim", "fvd"),
            generated_videos=2990, real_videos=2990, frames=16, real_frames=REAL_WINDOW, height=256, width=256, covariance_ddof=0,
            prompts="one caption per test video, drawn seeded by video id from its 20",
        ),
    )
}


def seeded_offset(key: str, seed: int, frames_available: int, window: int) -> int:
    """The first frame of a `window`-frame run inside `frames_available` frames, drawn per video
    from (seed, key): the same video gets the same offset in any order, on any worker."""
    choices = frames_available - window + 1
    if choices < 1:
        raise ValueError(f"{key}: {frames_available} frames, fewer than the {window} the protocol needs")
    return int.from_bytes(hashlib.sha256(f"offset/{seed}/{key}".encode()).digest()[:8], "big") % choices
