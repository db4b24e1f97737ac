"""Reference protocol definitions: the published choices, and seeded frame offsets that depend on
the video and the seed only."""

import numpy as np
import pytest

from eval.protocols import REFERENCE_PROTOCOLS, seeded_offset


def test_the_definitions_are_the_references():
    stylegan = REFERENCE_PROTOCOLS["stylegan-v"]
    assert (stylegan.generated_videos, stylegan.real_videos, stylegan.frames, stylegan.covariance_ddof, stylegan.metrics) == (2048, 2048, 16, 0, ("fvd",))
    is10k = REFERENCE_PROTOCOLS["ucf101-is10k"]
    assert (is10k.generated_videos, is10k.real_videos, is10k.frames, is10k.is_splits, is10k.metrics) == (10_000, 0, 16, 10, ("is",))
    msrvtt = REFERENCE_PROTOCOLS["msrvtt-paper"]
    assert (msrvtt.generated_videos, msrvtt.frames, msrvtt.height, msrvtt.width) == (2990, 16, 256, 256)
    assert msrvtt.generated_videos * msrvtt.frames == 47_840  # the paper's CLIPSIM frame count
    assert set(msrvtt.metrics) == {"clipsim", "fvd"}
    assert all(protocol.record()["name"] == name for name, protocol in REFERENCE_PROTOCOLS.items())


def test_seeded_offsets_are_per_video_and_in_range():
    offsets = [seeded_offset(f"Class/v_Class_g{k:02d}_c01.avi", 0, 164, 16) for k in range(400)]
    assert min(offsets) >= 0 and max(offsets) <= 164 - 16
    assert len(set(offsets)) > 100  # spread over the video, not always the start
    assert np.mean(offsets) == pytest.approx((164 - 16) / 2, rel=0.15)
    assert seeded_offset("a", 0, 164, 16) == seeded_offset("a", 0, 164, 16)
    assert [seeded_offset("a", seed, 164, 16) for seed in range(5)] != [seeded_offset("a", 0, 164, 16)] * 5
    assert seeded_offset("exact", 3, 16, 16) == 0
    with pytest.raises(ValueError, match="15 frames, fewer than the 16"):
        seeded_offset("short", 0, 15, 16)
