"""HED networks: both public weight files load by their own key names, and the edge maps match
the reference annotators' recipes (ControlNet 1.1's cv2.resize + sigmoid(mean); sniklaus's BGR,
Caffe means and fused sigmoid), computed independently from the raw weights."""

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from model.hed import STAGES, ControlNetHED, HEDBsds500, load_hed
from model.weights import WeightsError


def random_state(module: torch.nn.Module, seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: scale * torch.randn(tensor.shape, generator=generator) for name, tensor in module.state_dict().items()}


def test_controlnet_hed_file_loads_and_matches_the_annotator_recipe(tmp_path, fixture_clip):
    state = random_state(ControlNetHED(), 0, scale=0.02)  # small enough that the sigmoid is not saturated
    state["norm"] = torch.tensor([120.0, 110.0, 100.0]).view(1, 3, 1, 1)
    torch.save(state, tmp_path / "ControlNetHED.pth")
    network = load_hed(tmp_path / "ControlNetHED.pth", "train_controlnet.hed_weights")
    frame = fixture_clip[0]  # (64, 64, 3) uint8 RGB
    with torch.no_grad():
        ours = network(torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 255.0)[0, 0].numpy()

    # the annotator: RGB 0..255 minus norm; five blocks (max-pool before blocks 2-5); each
    # projection resized to the frame with cv2.INTER_LINEAR; sigmoid of their mean
    h = torch.from_numpy(frame).permute(2, 0, 1)[None].float() - state["norm"]
    projections = []
    with torch.no_grad():
        for block, (_, _, convs) in enumerate(STAGES, start=1):
            if block > 1:
                h = F.max_pool2d(h, 2, 2)
            for k in range(convs):
                h = F.relu(F.conv2d(h, state[f"block{block}.convs.{k}.weight"], state[f"block{block}.convs.{k}.bias"], padding=1))
            projection = F.conv2d(h, state[f"block{block}.projection.weight"], state[f"block{block}.projection.bias"])[0, 0].numpy()
            projections.append(cv2.resize(projection, (64, 64), interpolation=cv2.INTER_LINEAR))
    reference = 1 / (1 + np.exp(-np.mean(np.stack(projections, axis=2), axis=2)))
    assert 0.01 < reference.std() and 0.05 < reference.mean() < 0.95
    np.testing.assert_allclose(ours, reference, atol=1e-4)


def test_bsds500_file_loads_by_its_module_names_and_matches_the_reference(tmp_path, fixture_clip):
    ours_layout = random_state(HEDBsds500(), 1)
    # the published file names modules `moduleVggOne...`; newer copies `netVggOne...`
    save_file({name.replace("net", "module", 1): tensor for name, tensor in ours_layout.items()}, tmp_path / "network-bsds500.safetensors")
    network = load_hed(tmp_path / "network-bsds500.safetensors", "train_controlnet.hed_weights")
    frame = fixture_clip[1]
    with torch.no_grad():
        ours = network(torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 255.0)[0, 0]
        # sniklaus: BGR 0..255 minus the Caffe means; VGG stages; scores bilinear to full size; fused
        x = torch.from_numpy(frame[:, :, ::-1].copy()).permute(2, 0, 1)[None].float() - torch.tensor([104.00698793, 116.66876762, 122.67891434]).view(1, 3, 1, 1)
        scores = []
        for index, name in enumerate(("One", "Two", "Thr", "Fou", "Fiv")):
            layers = network.get_submodule(f"netVgg{name}")
            x = layers(x)
            scores.append(F.interpolate(network.get_submodule(f"netScore{name}")(x), size=(64, 64), mode="bilinear", align_corners=False))
        reference = torch.sigmoid(F.conv2d(torch.cat(scores, 1), ours_layout["netCombine.0.weight"], ours_layout["netCombine.0.bias"]))[0, 0]
    assert torch.allclose(ours, reference, atol=1e-5)


def test_an_unknown_file_names_the_setting(tmp_path):
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(WeightsError, match="train_controlnet.hed_weights"):
        load_hed(tmp_path / "other.pth", "train_controlnet.hed_weights")
    with pytest.raises(WeightsError, match="not found; set train_controlnet.hed_weights"):
        load_hed(tmp_path / "missing.pth", "train_controlnet.hed_weights")
