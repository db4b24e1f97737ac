"""The FVD / IS networks load from torchscript files and are called with StyleGAN-V's conventions;
wrong files fail with the setting to fix; the smoke stand-in tells videos apart."""

import numpy as np
import pytest
import torch

from eval.frechet import FeatureStats, stats_distance
from eval.video_features import FeatureNetError, RandomVideoNet, fvd_network, is_network


class RecordingI3D(torch.nn.Module):
    """A torchscript-able network with the I3D torchscript's signature that records its call."""

    def __init__(self) -> None:
        super().__init__()
        self.projection = torch.nn.Linear(3, 400)

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False) -> torch.Tensor:
        assert x.dtype == torch.uint8 and rescale and resize and return_features
        return self.projection(x.float().mean(dim=(2, 3, 4)))


class SoftmaxC3D(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.softmax(x.float().mean(dim=(1, 3, 4))[:, :1].repeat(1, 101), dim=1)


def test_torchscript_weights_load_and_are_called_like_stylegan_v(tmp_path, fixture_clip):
    network = torch.jit.script(RecordingI3D())
    network.save(str(tmp_path / "i3d_torchscript.pt"))
    torch.jit.script(SoftmaxC3D()).save(str(tmp_path / "c3d_ucf101.pt"))
    video = torch.from_numpy(fixture_clip).permute(3, 0, 1, 2)[None]  # uint8 (1, 3, t, h, w)

    fvd, fvd_id = fvd_network(str(tmp_path / "i3d_torchscript.pt"), "evaluate.i3d_weights", seed=0)
    assert len(fvd_id) == 64  # the file's sha256, recorded with every FVD
    torch.testing.assert_close(fvd(video), network(video, rescale=True, resize=True, return_features=True))
    inception, _ = is_network(str(tmp_path / "c3d_ucf101.pt"), "evaluate.c3d_weights", seed=0)
    assert inception(video).shape == (1, 101)


def test_wrong_or_missing_files_name_the_setting(tmp_path):
    with pytest.raises(FeatureNetError, match=r"i3d_torchscript.pt: weight file not found; set evaluate.i3d_weights"):
        fvd_network(str(tmp_path / "i3d_torchscript.pt"), "evaluate.i3d_weights", seed=0)
    torch.save({"weight": torch.zeros(2)}, tmp_path / "state.pt")
    with pytest.raises(FeatureNetError, match=r"state.pt: not a torchscript file .* evaluate.i3d_weights"):
        fvd_network(str(tmp_path / "state.pt"), "evaluate.i3d_weights", seed=0)
    torch.jit.script(RecordingI3D()).save(str(tmp_path / "not_c3d.pt"))
    inception, _ = is_network(str(tmp_path / "not_c3d.pt"), "evaluate.c3d_weights", seed=0)
    with pytest.raises(FeatureNetError, match="is it StyleGAN-V's c3d_ucf101.pt"):  # an I3D given as the C3D
        inception(torch.zeros(1, 3, 16, 32, 32, dtype=torch.uint8))


def test_the_smoke_stand_in_separates_different_videos(fixture_clip_reader):
    net = RandomVideoNet(400, seed=0)
    street = np.stack([fixture_clip_reader("h264_340x256_28fps.mp4", skip=4 * k) for k in range(6)])
    pancakes = np.stack([fixture_clip_reader("pancake_426x240_30fps.mkv", skip=4 * k) for k in range(6)])

    def stats(videos):
        s = FeatureStats(400)
        s.update(net(torch.from_numpy(videos).permute(0, 4, 1, 2, 3), return_features=True).numpy())
        return s

    same, other = stats_distance(stats(street), stats(street)), stats_distance(stats(street), stats(pancakes))
    assert abs(same) < 1e-4 and other > 1.0
    assert torch.equal(RandomVideoNet(400, seed=0).projection, net.projection)  # seeded: the same net in every worker
