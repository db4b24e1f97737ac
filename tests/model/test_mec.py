"""MEC (eq. 3-5): the shift, and that every path changes the output and receives gradient."""

from dataclasses import replace

import pytest
import torch

from model.mec import MEC, MECPaths, TemporalShift

PATHS = ("factorized_temporal", "spatial_temporal", "channel", "motion")


def test_shift_moves_exactly_the_intended_channels_by_one_frame():
    torch.manual_seed(0)
    z = torch.randn(2, 16, 5, 3, 4)  # c = 16: fold = 2
    shifted = TemporalShift(16)(z)
    # channels 0-1 take the next frame (zero after the last), 2-3 the previous (zero before the first)
    torch.testing.assert_close(shifted[:, 0:2, :-1], z[:, 0:2, 1:])
    assert shifted[:, 0:2, -1].abs().max() == 0
    torch.testing.assert_close(shifted[:, 2:4, 1:], z[:, 2:4, :-1])
    assert shifted[:, 2:4, 0].abs().max() == 0
    torch.testing.assert_close(shifted[:, 4:], z[:, 4:])  # the rest is untouched


def randomised(module: torch.nn.Module) -> torch.nn.Module:
    """Random weights everywhere, so no zero-initialised layer hides a path."""
    torch.manual_seed(1)
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0, 0.3)
    return module


@pytest.mark.parametrize("path", PATHS)
def test_each_path_changes_the_output_and_receives_gradient(path):
    torch.manual_seed(0)
    z = torch.randn(2, 32, 6, 8, 8)
    full = randomised(MEC(32, 48))
    without = MEC(32, 48, replace(MECPaths(), **{path: False}))
    without.load_state_dict(full.state_dict(), strict=False)  # same weights, one path fewer
    assert (full(z) - without(z)).abs().max() > 1e-3

    full(z).square().mean().backward()
    owner = {"factorized_temporal": full.temporal, "spatial_temporal": full.ste, "channel": full.ce, "motion": full.me}[path]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in owner.parameters())


def test_excite_is_the_mean_of_the_equations_outputs():
    """z_hat * (1 + mean M) is the mean of eq. 3, 4, 5's z_hat + z_hat * M."""
    torch.manual_seed(0)
    mec, z = randomised(MEC(32, 32)), torch.randn(2, 32, 4, 5, 5)
    z_hat = mec.shift(z)
    outputs = [z_hat + z_hat * path(z_hat) for path in (mec.ste, mec.ce, mec.me)]
    torch.testing.assert_close(mec.excite(z), torch.stack(outputs).mean(0), atol=1e-6, rtol=1e-5)


def test_with_every_path_off_mec_is_a_per_frame_2d_conv():
    torch.manual_seed(0)
    off = MECPaths(factorized_temporal=False, spatial_temporal=False, channel=False, motion=False)
    mec, z = MEC(8, 12, off), torch.randn(2, 8, 4, 6, 6)
    conv2d = torch.nn.Conv2d(8, 12, 3, padding=1)
    conv2d.load_state_dict({"weight": mec.spatial.weight[:, :, 0], "bias": mec.spatial.bias})
    expected = torch.stack([conv2d(z[:, :, i]) for i in range(4)], dim=2)
    torch.testing.assert_close(mec(z), expected, atol=1e-5, rtol=1e-5)


def test_single_frames_skip_every_temporal_path():
    torch.manual_seed(0)
    mec, z = randomised(MEC(8, 12)), torch.randn(3, 8, 1, 6, 6)
    torch.testing.assert_close(mec(z), mec.spatial(z))


def test_motion_excitation_sees_motion():
    """Eq. 5: for a static clip the motion m_t = K * s_{t+1} - s_t is the same for every step but
    the last, so the gate is equal across those frames; a moving clip gives different gates."""
    torch.manual_seed(0)
    me = randomised(MEC(16, 16)).me
    frame = torch.randn(1, 16, 1, 8, 8)
    static = frame.expand(1, 16, 5, 8, 8).contiguous()
    gate = me(static)  # M_M: (b, c, t, 1, 1)
    torch.testing.assert_close(gate[:, :, 1:-1], gate[:, :, :-2], atol=1e-6, rtol=0)
    moving = torch.cat([frame.roll(shifts=step, dims=-1) for step in range(5)], dim=2)
    moving_gate = me(moving)
    assert (moving_gate[:, :, 1] - moving_gate[:, :, 0]).abs().max() > 1e-3


def test_table_5_names_select_the_paths():
    assert MECPaths.from_names("2d+1d, ste,ce,me") == MECPaths()
    assert MECPaths.from_names("ste,ce,me") == MECPaths(factorized_temporal=False)  # Table 5, row 1
    assert MECPaths.from_names("") == MECPaths(False, False, False, False)  # plain 2-D convolutions
    with pytest.raises(ValueError, match="unknown MEC path"):
        MECPaths.from_names("2d,ste")
