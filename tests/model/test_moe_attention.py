"""MoE-STA (eq. 6-8): routing without a router, expert averaging, merging."""

import pytest
import torch

from model.moe_attention import FeedForward, MoEFeedForward, SpatialTemporalTransformer, average_experts, merge_experts


def test_eq_7_8_on_known_weights():
    moe = MoEFeedForward(dim=1, num_experts=3, mult=1)  # scalars per expert (GEGLU: w1 is 1 x 2)
    with torch.no_grad():
        for param in (moe.w1, moe.b1, moe.w2, moe.b2):
            param.copy_(torch.tensor([1.0, 2.0, 4.0]).view(3, *([1] * (param.ndim - 1))).expand_as(param))
    average_experts(moe, exchange_rate=0.1)
    # E_0 = 0.9 * 1 + 0.1 * (2 + 4) / 2 = 1.2;  E_1 = 0.9 * 2 + 0.1 * (1 + 4) / 2 = 2.05;  E_2 = 0.9 * 4 + 0.1 * 1.5 = 3.75
    for param in (moe.w1, moe.b1, moe.w2, moe.b2):
        torch.testing.assert_close(param.reshape(3, -1), torch.tensor([[1.2], [2.05], [3.75]]).expand(3, param[0].numel()))


def test_averaging_keeps_the_mean_and_shrinks_the_spread():
    torch.manual_seed(0)
    moe = MoEFeedForward(8, 4)
    with torch.no_grad():
        moe.w1.add_(torch.randn_like(moe.w1))
    mean, spread = moe.w1.mean(0).clone(), float(moe.w1.std(0).mean())
    average_experts(moe, 0.001)
    torch.testing.assert_close(moe.w1.mean(0), mean)  # merged model unchanged by the exchange
    # (1 - lambda) - lambda / (N - 1) = 1 - lambda * N / (N - 1) per step
    assert float(moe.w1.std(0).mean()) == pytest.approx(spread * (1 - 0.001 * 4 / 3), rel=1e-5)


@pytest.mark.parametrize("length, experts, counts", [(12, 4, [3, 3, 3, 3]), (10, 4, [1, 3, 3, 3]), (3, 4, [0, 1, 1, 1])])
def test_each_token_goes_to_exactly_one_expert_in_random_groups(length, experts, counts):
    moe = MoEFeedForward(dim=2, num_experts=experts, mult=1).train()
    with torch.no_grad():  # expert i outputs the constant i: the output names the expert
        moe.w1.zero_(), moe.w2.zero_(), moe.b1.zero_()
        moe.b2.copy_(torch.arange(experts, dtype=torch.float32)[:, None].expand(experts, 2))
    torch.manual_seed(0)
    out = moe(torch.randn(5, length, 2))
    assigned = out[..., 0].round().long()
    for row in assigned:  # every sequence: group sizes as eq. 6 (last groups short when uneven)
        assert sorted(torch.bincount(row, minlength=experts).tolist()) == sorted(counts)
    assert not torch.equal(assigned[0], assigned[1])  # a fresh shuffle per sequence


def test_identical_experts_equal_a_plain_ffn_whatever_the_shuffle():
    torch.manual_seed(0)
    moe, x = MoEFeedForward(8, 4).train(), torch.randn(3, 11, 8)
    ffn = moe.merged()  # experts start identical
    torch.testing.assert_close(moe(x), ffn(x), atol=1e-6, rtol=1e-5)  # un-shuffled back in place


def test_eval_mode_unmerged_equals_merged():
    torch.manual_seed(0)
    block = SpatialTemporalTransformer(32, heads=4, context_dim=16, spatial_experts=4, temporal_experts=2)
    with torch.no_grad():
        for param in block.parameters():
            param.add_(0.05 * torch.randn_like(param))  # experts (and proj_out) differ
    x, context = torch.randn(2, 32, 3, 4, 4), torch.randn(2, 7, 16)
    unmerged = block.eval()(x, context)
    merged = merge_experts(block)
    assert isinstance(merged.ff_spatial, FeedForward) and isinstance(merged.ff_temporal, FeedForward)
    torch.testing.assert_close(merged(x, context), unmerged, atol=1e-5, rtol=1e-5)
