"""Parameter counts for `versvideo model-summary`, built on the meta device (no memory, no weights).

The paper's Table 4 "Total Parameters during Inference" (500 M for L, 2 B for H) matches, to
within 3 %, the merged UNet + image VAE + CLIP ViT-L/14 text encoder + the unified ControlNet (a
trainable copy of the UNet's encoder and middle block with one zero-initialised 1x1 conv per
skip connection and the four condition adapters, section 2.4). Without the ControlNet the totals fall 19 % (L) and 29 % (H)
short, so the paper's figure must include it; both totals are reported.
"""

from __future__ import annotations

import open_clip
import torch
from torch import nn

from model.controlnet import VideoControlNet
from model.image_vae import build_image_vae
from model.moe_attention import merge_experts
from model.presets import get_preset
from model.unet import VersVideoUNet

PAPER_TOTAL_INFERENCE = {"L": 500_000_000, "H": 2_000_000_000}


def count(*modules: nn.Module) -> int:
    return sum(parameter.numel() for module in modules for parameter in module.parameters())


def text_encoder_parameters(model_name: str = "ViT-L-14") -> int:
    with torch.device("meta"):
        clip = open_clip.create_model(model_name, pretrained=None, device="meta")
    return sum(p.numel() for name, p in clip.named_parameters() if not name.startswith("visual."))


def model_summary(preset_name: str) -> dict:
    preset = get_preset(preset_name)
    with torch.device("meta"):
        unet = VersVideoUNet(preset.unet)
        vae = build_image_vae()
    unet_training = count(unet)
    merge_experts(unet)
    unet_inference = count(unet)
    # smoke pairs with tiny random-init encoders (the latent-cache stage); L and H with SD's VAE
    # and CLIP ViT-L/14, whose 768-wide tokens are the UNet's context.
    full_size = preset.unet.context_dim == 768
    vae_parameters = count(vae) if full_size else 0
    text_parameters = text_encoder_parameters() if full_size else 0
    controlnet = count(VideoControlNet(unet, preset.controlnet))  # on the meta device too
    total = unet_inference + vae_parameters + text_parameters
    summary = {
        "preset": preset_name,
        "unet_training_with_experts": unet_training,
        "unet_inference_merged": unet_inference,
        "image_vae": vae_parameters,
        "text_encoder": text_parameters,
        "controlnet": controlnet,
        "total_inference_text_to_video": total,
        "total_inference_with_controlnet": total + controlnet,
        "experts": {"spatial": preset.unet.spatial_experts, "temporal": preset.unet.temporal_experts},
    }
    if preset_name in PAPER_TOTAL_INFERENCE:
        paper = PAPER_TOTAL_INFERENCE[preset_name]
        summary["paper_total_inference"] = paper
        summary["ratio_text_to_video_vs_paper"] = round(total / paper, 3)
        summary["ratio_with_controlnet_vs_paper"] = round((total + controlnet) / paper, 3)
    return summary
