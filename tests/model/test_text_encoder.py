"""The text encoder: open_clip's tower, token states as context, loading full CLIP checkpoints."""

import json

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from model.text_encoder import TINY_TEXT_CONFIG, build_text_encoder, clip_config, load_text_encoder, tokenizer_for
from model.weights import WeightsError

TINY_CLIP = {"embed_dim": 64, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16}, "text_cfg": TINY_TEXT_CONFIG["text_cfg"]}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A full open_clip CLIP model (vision + text) saved as an open_clip checkpoint would be."""
    folder = tmp_path_factory.mktemp("clip")
    config = folder / "tiny-text-test.json"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(str(config))
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-text-test", pretrained=None).eval()
    weights = folder / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return str(config), weights, model


def test_context_is_clips_token_states_after_the_final_norm(tiny_clip):
    config, weights, model = tiny_clip
    encoder = load_text_encoder(config, weights, "cache_latents.text_model", "cache_latents.text_weights")
    tokens = tokenizer_for("ViT-L-14")(["a dog running on a beach", ""])
    with torch.no_grad():
        context = encoder(tokens)
        # CLIP's own path: the pooled embedding is the final-norm state at the end-of-text token, projected
        pooled = model.encode_text(tokens)
    assert context.shape == (2, 77, 64)
    eot = tokens.argmax(dim=-1)
    torch.testing.assert_close(context[torch.arange(2), eot] @ model.text_projection, pooled, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in encoder.parameters())


def test_causal_context_ignores_later_tokens(tiny_clip):
    """Token states before a change are unchanged (CLIP's text mask is causal): a sanity check
    that the tower runs with its attention mask."""
    config, weights, _ = tiny_clip
    encoder = load_text_encoder(config, weights, "cache_latents.text_model", "cache_latents.text_weights")
    tokens = tokenizer_for("ViT-L-14")(["a red car", "a red bus"])
    with torch.no_grad():
        context = encoder(tokens)
    torch.testing.assert_close(context[0, :3], context[1, :3])
    assert not torch.allclose(context[0, 3], context[1, 3])


def test_bad_text_checkpoints_name_the_file_and_key(tiny_clip, tmp_path):
    config, _, _ = tiny_clip
    with pytest.raises(WeightsError, match="missing.pt: weight file not found; set cache_latents.text_weights"):
        load_text_encoder(config, tmp_path / "missing.pt", "cache_latents.text_model", "cache_latents.text_weights")
    # a checkpoint of a wider text tower (ViT-B-32's 512) into the tiny tower
    wider = build_text_encoder({"embed_dim": 64, "text_cfg": {**TINY_TEXT_CONFIG["text_cfg"], "width": 32}})
    save_file({k: v.contiguous() for k, v in wider.tower.state_dict().items()}, str(tmp_path / "wider.safetensors"))
    with pytest.raises(WeightsError, match=r"wider.safetensors: key 'positional_embedding' has shape \(77, 32\)"):
        load_text_encoder(config, tmp_path / "wider.safetensors", "cache_latents.text_model", "cache_latents.text_weights")
    with pytest.raises(WeightsError, match="cache_latents.text_model: unknown open_clip model 'ViT-Q-99'"):
        load_text_encoder("ViT-Q-99", tmp_path / "wider.safetensors", "cache_latents.text_model", "cache_latents.text_weights")


def test_vit_l_14_text_tower_is_77_by_768():
    _, config = clip_config("ViT-L-14", "cache_latents.text_model")
    with torch.device("meta"):
        encoder = build_text_encoder(config)
    assert encoder.width == 768 and encoder.context_length == 77
    assert sum(p.numel() for p in encoder.tower.transformer.parameters()) == pytest.approx(85.05e6, rel=1e-2)
