"""The exported models on disk: the training stages' output folders (weights + config.json) read
back as frozen networks for sampling, and the decoders' save format."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from diffusers import AutoencoderKL

from model.controlnet import ControlledUNet, StyleAdapter, VideoControlNet
from model.mec import MECPaths
from model.moe_attention import merge_experts
from model.presets import ControlNetConfig, UNetConfig
from model.tcm_vae import TCMDecoder, TCMVAEConfig
from model.unet import VersVideoUNet
from model.weights import WeightsError, file_digest, load_into, load_state_dict
from tasks.storage.atomic import save_safetensors, write_json

IMAGE_DECODER = "image_decoder"  # models/decoder/image_decoder/: the fine-tuned image decoder
# The decoders' names in train_decoder's and evaluate's tables (reports/reconstruction.json, eval.json)
TCM_VAE = "tcm_vae"  # the decoder train_decoder exports at the top of its folder
FINETUNED_IMAGE_DECODER = "image_decoder_finetuned"  # exported to IMAGE_DECODER/
TCM_VAE_WITHOUT_REFINEMENT = "tcm_vae_no_refinement"  # the TCMs alone (eq. 13), no refinement UNet R
IMAGE_VAE = "image_vae"  # the image VAE's own decoder, untouched (not exported: the cache's VAE)


def decoder_folder(output_dir: Path, name: str) -> Path:
    """Where train_decoder writes decoder `name` (its name in reports/reconstruction.json): the
    TCM-VAE at the top of models/decoder/, each baseline (Table 3's rows) in a folder beside it."""
    if name == TCM_VAE:
        return output_dir
    return output_dir / (IMAGE_DECODER if name == FINETUNED_IMAGE_DECODER else name)


def trained_decoders(output_dir: Path) -> dict[str, Path]:
    """The decoders train_decoder exported under `output_dir`, by name, the TCM-VAE first."""
    found = {TCM_VAE: output_dir}
    for folder in sorted(path for path in output_dir.iterdir() if (path / "model.safetensors").is_file()):
        found[FINETUNED_IMAGE_DECODER if folder.name == IMAGE_DECODER else folder.name] = folder
    return found


def image_vae_decoder(vae: AutoencoderKL) -> TCMDecoder:
    """The image VAE's own decoder, frame by frame and untouched: Table 3's vanilla image decoder."""
    return TCMDecoder(vae, TCMVAEConfig(temporal_compensation=False, refinement=False)).requires_grad_(False).eval()


def save_decoder(decoder: TCMDecoder, folder: Path) -> None:
    """models/decoder/: the decoder's weights + what rebuilds it (the image VAE's architecture)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors({name: tensor.detach().cpu().contiguous() for name, tensor in decoder.state_dict().items()}, folder / "model.safetensors")
    write_json({"tcm_vae": dataclasses.asdict(decoder.config), "image_vae": decoder.image_vae_config}, folder / "config.json")


def load_decoder(folder: str | Path) -> TCMDecoder:
    """A decoder saved by `save_decoder` (the TCM-VAE or a fine-tuned image decoder), frozen."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    vae = AutoencoderKL.from_config(config["image_vae"])
    variant = config["tcm_vae"]
    decoder = TCMDecoder(vae, TCMVAEConfig(**{**variant, "mec_paths": MECPaths(**variant["mec_paths"])}))
    load_into(decoder, load_state_dict(folder / "model.safetensors", "train_decoder output"), folder / "model.safetensors")
    return decoder.requires_grad_(False).eval()


def load_unet(folder: str | Path) -> tuple[VersVideoUNet, str]:
    """(frozen merged-expert UNet, preset name) from the train_unet stage's output folder."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: run the train_unet stage first (versvideo stage train_unet)")
    saved = json.loads(config_path.read_text())
    fields = dict(saved["unet"])
    fields["mec_paths"] = MECPaths(**fields["mec_paths"])
    fields.update({key: tuple(fields[key]) for key in ("channel_mult", "attention_levels")})
    unet = VersVideoUNet(UNetConfig(**fields))
    if saved.get("merged_experts"):
        merge_experts(unet)  # the saved layout: one FFN per MoE layer (section 2.2)
    weights = folder / "model.safetensors"
    load_into(unet, load_state_dict(weights, "train_unet output"), weights)
    return unet.requires_grad_(False).eval(), saved["preset"]


def trained_clip_shape(folder: str | Path) -> tuple[int, int, int]:
    """(frames, height, width) of the clips the UNet in `folder` was trained on: generation's default."""
    clip = json.loads((Path(folder) / "config.json").read_text()).get("clip")
    if clip is None:
        raise ValueError(f"{folder}/config.json records no training clip shape (exported by an older train_unet): rerun train_unet, or pass --frames, --height and --width")
    return clip["frames"], clip["height"], clip["width"]


def load_controlnet(folder: str | Path, unet: VersVideoUNet, unet_dir: str | Path) -> tuple[ControlledUNet, dict]:
    """(the UNet steered by the ControlNet and style adapter saved in `folder`, its config.json).

    Refuses a ControlNet trained against other UNet weights: its residuals were learnt for them."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: run the train_controlnet stage first (versvideo stage train_controlnet)")
    saved = json.loads(config_path.read_text())
    unet_weights = Path(unet_dir) / "model.safetensors"
    if saved["unet_sha256"] != file_digest(unet_weights):
        raise WeightsError(f"{folder}: this ControlNet was trained on other UNet weights than {unet_weights}; retrain it (versvideo stage train_controlnet) or use the UNet it was trained on")
    fields = dict(saved["controlnet"])
    controlnet = VideoControlNet(unet, ControlNetConfig(adapter_channels=tuple(fields["adapter_channels"]), style_tokens=fields["style_tokens"]))
    style = StyleAdapter(saved["style"]["embed_dim"], unet.config.context_dim, fields["style_tokens"])
    weights = folder / "model.safetensors"
    state = load_state_dict(weights, "train_controlnet output")
    load_into(controlnet, {k.removeprefix("controlnet."): v for k, v in state.items() if k.startswith("controlnet.")}, weights)
    load_into(style, {k.removeprefix("style."): v for k, v in state.items() if k.startswith("style.")}, weights)
    return ControlledUNet(unet, controlnet.requires_grad_(False).eval(), style.requires_grad_(False).eval()), saved
