"""MiDaS DPT-Hybrid (depth condition): parity with MiDaS's own DPTDepthModel, as ControlNet's
annotator code ships it (controlnet_aux), loaded from a file that model saved: the real file's
key layout, read by our loader."""

import cv2
import numpy as np
import pytest
import torch

from model.midas import load_midas, random_midas
from model.weights import WeightsError
from tests.conftest import read_fixture_clip


@pytest.fixture(scope="module")
def midas_file(tmp_path_factory):
    """A DPT-Hybrid as MiDaS builds it (seeded random weights), saved as MiDaS saves its checkpoint;
    the head's last bias is raised so its ReLU output is not all zero. Returns (path, reference)."""
    from controlnet_aux.midas.midas.dpt_depth import DPTDepthModel

    torch.manual_seed(0)
    reference = DPTDepthModel(path=None, backbone="vitb_rn50_384", non_negative=True).eval()
    with torch.no_grad():
        reference.scratch.output_conv[4].bias.fill_(0.5)
    path = tmp_path_factory.mktemp("midas") / "dpt_hybrid-midas-501f0c75.pt"
    torch.save(reference.state_dict(), path)
    return path, reference


def fixture_images() -> torch.Tensor:
    """Two real frames at 64x96 (a 4x6 token grid: the position embeddings are resized, not square), in [-1, 1]."""
    frames = read_fixture_clip("pancake_426x240_30fps.mkv", frames=2, size=96)
    frames = np.stack([cv2.resize(frame, (96, 64), interpolation=cv2.INTER_AREA) for frame in frames])
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def test_loads_midas_file_and_matches_midas_depth_model(midas_file):
    path, reference = midas_file
    network = load_midas(path, "train_controlnet.midas_weights")
    images = fixture_images()
    with torch.no_grad():
        expected, depth = reference(images), network(images)
    assert depth.shape == (2, 64, 96) and float(expected.std()) > 0
    torch.testing.assert_close(depth, expected, atol=1e-4, rtol=1e-4)
    assert not any(parameter.requires_grad for parameter in network.parameters())


def test_checkpoint_wrapper_and_bad_files_name_the_file_and_key(midas_file, tmp_path):
    path, reference = midas_file
    state = torch.load(path, weights_only=True)
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"model": state, "optimizer": {}}, wrapped)  # MiDaS's training checkpoint layout
    assert torch.equal(load_midas(wrapped, "k").head[4].bias, reference.scratch.output_conv[4].bias)

    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(WeightsError, match=r"other\.pt: not MiDaS DPT-Hybrid weights .*set train_controlnet\.midas_weights"):
        load_midas(tmp_path / "other.pt", "train_controlnet.midas_weights")
    torch.save({name: tensor for name, tensor in state.items() if name != "scratch.refinenet2.out_conv.bias"}, tmp_path / "cut.pt")
    with pytest.raises(WeightsError, match=r"cut\.pt: missing key 'fusion\.1\.out_conv\.bias'"):
        load_midas(tmp_path / "cut.pt", "k")
    state["pretrained.act_postprocess4.4.weight"] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "shape.pt")
    with pytest.raises(WeightsError, match=r"key 'pretrained\.act_postprocess4\.4\.weight' \(-> 'reassemble4\.1\.weight'\) has shape \(3, 3\)"):
        load_midas(tmp_path / "shape.pt", "k")
    with pytest.raises(WeightsError, match="weight file not found; set train_controlnet.midas_weights"):
        load_midas(tmp_path / "absent.pt", "train_controlnet.midas_weights")


def test_random_stand_in_is_seeded():
    first, second = random_midas(3), random_midas(3)
    assert torch.equal(first.head[0].weight, second.head[0].weight)
    assert not torch.equal(first.head[0].weight, random_midas(4).head[0].weight)
