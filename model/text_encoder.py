"""The frozen text encoder: an open_clip text tower whose per-token states are the UNet's
cross-attention context (ViT-L/14: 77 tokens x 768, as in Stable Diffusion v1).

The context is the transformer output after the final LayerNorm for every token position, not
the pooled, projected CLIP embedding: cross-attention needs one key/value per token. The tower is
open_clip's own `TextTransformer`, so a full open_clip CLIP checkpoint (or a text-only one) loads
by its native key names; the vision tower's keys in a full checkpoint are skipped, never built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.transformer import QuickGELU, TextTransformer
from torch import nn

from model.weights import WeightsError, load_into, load_state_dict

CONTEXT_LENGTH = 77
# The smoke preset's stand-in: CLIP's tokenizer and layout, 64 wide (the smoke UNet's context_dim).
TINY_TEXT_CONFIG = {"embed_dim": 64, "text_cfg": {"context_length": CONTEXT_LENGTH, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2}}
NOT_TEXT_KEYS = ("visual.", "logit_scale", "logit_bias")  # the rest of a full CLIP checkpoint


def clip_config(model_name: str, setting: str) -> tuple[str, dict[str, Any]]:
    """(name, open_clip config) for a bundled model name (`ViT-L-14`) or a path to a config JSON
    of the same format. The JSON is registered with open_clip, so its name works afterwards (also
    inside Ray workers that call this again). `setting` names where the user set model_name."""
    if model_name.endswith(".json"):
        if not Path(model_name).is_file():
            raise WeightsError(f"{model_name}: open_clip model config not found ({setting})")
        open_clip.add_model_config(model_name)
        model_name = Path(model_name).stem
    config = open_clip.get_model_config(model_name)
    if config is None:
        raise WeightsError(f"{setting}: unknown open_clip model {model_name!r} (a bundled name such as ViT-L-14, or a config JSON path)")
    return model_name, config


class TextEncoder(nn.Module):
    """token ids (b, 77) -> context (b, 77, width)."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        text_cfg = dict(config["text_cfg"])
        if "hf_model_name" in text_cfg:
            raise WeightsError("text encoder: Hugging Face text towers are not supported; use an open_clip native text tower (e.g. ViT-L-14)")
        self.tower = TextTransformer(
            context_length=text_cfg.get("context_length", CONTEXT_LENGTH),
            vocab_size=text_cfg.get("vocab_size", 49408),
            width=text_cfg["width"],
            heads=text_cfg["heads"],
            layers=text_cfg["layers"],
            mlp_ratio=text_cfg.get("mlp_ratio", 4.0),
            ls_init_value=text_cfg.get("ls_init_value"),
            output_dim=config["embed_dim"],  # the projection is unused here; kept so checkpoint keys match
            act_layer=QuickGELU if config.get("quick_gelu") else nn.GELU,
            output_tokens=True,
        )
        self.width = text_cfg["width"]
        self.context_length = self.tower.context_length

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        _, tokens = self.tower(token_ids)
        return tokens


def build_text_encoder(config: dict[str, Any], seed: int = 0) -> TextEncoder:
    """Random-init text encoder (open_clip's init), seeded so every stage rebuilds the same one."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return freeze(TextEncoder(config))
    finally:
        torch.random.set_rng_state(generator_state)


def load_text_encoder(model_name: str, weights: str | Path, model_setting: str, weights_setting: str) -> TextEncoder:
    """The text tower of `model_name` with weights from a local open_clip checkpoint."""
    _, config = clip_config(model_name, model_setting)
    encoder = TextEncoder(config)
    state = load_state_dict(weights, weights_setting)
    if any(name.startswith("text.") for name in state):  # CustomTextCLIP layout keeps the tower under text.
        state = {name.removeprefix("text."): tensor for name, tensor in state.items() if name.startswith("text.")}
    state = {name: tensor for name, tensor in state.items() if not name.startswith(NOT_TEXT_KEYS)}
    load_into(encoder.tower, state, weights)
    return freeze(encoder)


def freeze(encoder: TextEncoder) -> TextEncoder:
    encoder.requires_grad_(False)
    return encoder.eval()


def tokenizer_for(model_name: str):
    """open_clip's tokenizer for the model (CLIP's bundled BPE vocabulary; nothing is downloaded)."""
    return open_clip.get_tokenizer(model_name)
