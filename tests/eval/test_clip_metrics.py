"""CLIPSIM and frame consistency on a tiny random-init open_clip model against a direct
computation (open_clip's own transform and encoders, plain cosine loops), on real frames."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from eval.clip_metrics import build_tiny_clip, clip_input, clipsim, frame_consistency, frame_embeddings, text_embeddings


@pytest.fixture(scope="module")
def tiny_clip():
    return build_tiny_clip(seed=0)


def open_clip_transform_reference(frame: np.ndarray, model) -> torch.Tensor:
    """open_clip's eval transform, built by open_clip itself, on a PIL image."""
    import open_clip

    transform = open_clip.image_transform(model.visual.image_size, is_train=False)
    return transform(Image.fromarray(frame))


def test_frame_preparation_matches_open_clips_transform(tiny_clip, fixture_clip):
    model, _ = tiny_clip
    ours = clip_input(fixture_clip[:2], model)
    reference = torch.stack([open_clip_transform_reference(frame, model) for frame in fixture_clip[:2]])
    # PIL's and torch's bicubic antialiased resizes differ by about a grey level
    assert ours.shape == reference.shape and (ours - reference).abs().mean() < 0.02


def test_clipsim_and_consistency_match_a_direct_computation(tiny_clip, fixture_clip_reader):
    model, tokenizer = tiny_clip
    videos = np.stack([fixture_clip_reader("h264_340x256_28fps.mp4"), fixture_clip_reader("pancake_426x240_30fps.mkv")])
    captions = ["a person on a street", "pancakes in a pan"]
    frames = frame_embeddings(model, videos, micro_batch=5)  # micro-batches must not change anything
    texts = text_embeddings(model, tokenizer, captions)

    expected_sim, expected_fc = [], []
    with torch.no_grad():
        for video, caption in zip(videos, captions):
            image = model.encode_image(clip_input(video, model))
            text = model.encode_text(tokenizer([caption]))[0]
            cosines = [F.cosine_similarity(image[t], text, dim=0).item() for t in range(len(video))]
            expected_sim.append(np.mean(cosines))
            expected_fc.append(np.mean([F.cosine_similarity(image[t], image[t + 1], dim=0).item() for t in range(len(video) - 1)]))
    np.testing.assert_allclose(clipsim(texts, frames).numpy(), expected_sim, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(frame_consistency(frames).numpy(), expected_fc, rtol=1e-5, atol=1e-6)


def test_a_still_video_is_perfectly_consistent(tiny_clip, fixture_clip):
    model, _ = tiny_clip
    still = np.repeat(fixture_clip[:1], 6, axis=0)[None]
    assert frame_consistency(frame_embeddings(model, still)).item() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="at least 2 frames"):
        frame_consistency(frame_embeddings(model, still[:, :1]))
