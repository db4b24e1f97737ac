"""open_clip models from local weight files, and the filter's text-frame similarity scorer.

Nothing is downloaded: the architecture comes from open_clip's bundled config for `model_name`,
the weights from a local .safetensors file or a plain state-dict .pt/.bin read with
`torch.load(weights_only=True)`. A checkpoint that does not fit the architecture is an error
naming the file and the first mismatched key.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import open_clip
import pandas as pd
import torch
import torch.nn.functional as F

from model.text_encoder import clip_config
from model.weights import WeightsError, load_into, load_state_dict
from tasks.storage.object_store import local_folder
from tasks.storage.video_io import center_crop, cover_size, decode_frames

__all__ = ["ClipFrameScorer", "WeightsError", "clip_pixels", "load_clip"]


def load_clip(model_name: str, weights: str | Path, key: str = "filter.clip_weights"):
    """(model in eval mode, tokenizer) for an open_clip architecture and local weights.

    model_name is one of open_clip's bundled configs (`ViT-B-32`) or a path to a config JSON
    of the same format (registered here, so it also works inside Ray workers)."""
    model_name, _ = clip_config(model_name, f"{key.rsplit('.', 1)[0]}.clip_model")
    model = open_clip.create_model(model_name, pretrained=None)
    load_into(model, load_state_dict(weights, key), weights)
    return model.eval(), open_clip.get_tokenizer(model_name)


def clip_pixels(frames: np.ndarray, model: torch.nn.Module) -> torch.Tensor:
    """(n, h, w, 3) uint8 frames at the model's input size -> normalised (n, 3, s, s) float."""
    mean = torch.tensor(getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN)
    std = torch.tensor(getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD)
    pixels = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255.0
    return (pixels - mean[:, None, None]) / std[:, None, None]


class ClipFrameScorer:
    """Ray Data callable class: loads CLIP once per actor, scores the middle frame of each clean
    segment against its caption (cosine similarity, unscaled, as CLIPSIM)."""

    def __init__(self, model_name: str, weights: str, videos_root: str) -> None:
        torch.set_num_threads(1)
        self.videos_root = videos_root  # rows' paths are relative to it
        self.model, self.tokenizer = load_clip(model_name, weights)
        size = self.model.visual.image_size
        self.size = size[0] if isinstance(size, (tuple, list)) else int(size)

    @torch.no_grad()
    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        images = []
        for row in batch.itertuples():
            middle = (int(row.segment_start) + int(row.segment_end) - 1) // 2
            height, width = cover_size(int(row.height), int(row.width), self.size, self.size)
            with local_folder(self.videos_root, [row.path]) as root:  # a copy, when the videos are in object storage
                images.append(center_crop(decode_frames(Path(root) / row.path, [middle], height, width), self.size, self.size)[0])
        image_features = F.normalize(self.model.encode_image(clip_pixels(np.stack(images), self.model)), dim=-1)
        text_features = F.normalize(self.model.encode_text(self.tokenizer(list(batch["name"]))), dim=-1)
        scores = (image_features * text_features).sum(dim=-1).numpy().astype(np.float64)
        return pd.DataFrame({"row_index": batch["row_index"].to_numpy(), "clip_score": scores})
