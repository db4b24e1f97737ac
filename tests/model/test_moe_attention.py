"""MoE-STA (eq. 6-8): routing without a router, expert averaging, merging."""

from dataclasses import replace

import pytest
import torch

from model.moe_attention import FeedForward, MoEFeedForward, SpatialTemporalTransformer, average_experts, merge_experts
from model.presets import get_preset
from model.unet import VersVideoUNet
from tasks.config.params import clip_shape


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


def label_experts(moe: MoEFeedForward) -> MoEFeedForward:
    """Expert i outputs the constant i, whatever its input: the output names the expert."""
    with torch.no_grad():
        moe.w1.zero_(), moe.w2.zero_(), moe.b1.zero_()
        moe.b2.copy_(torch.arange(moe.num_experts, dtype=torch.float32)[:, None].expand_as(moe.b2))
    return moe.train()


def tokens_per_expert(labels: torch.Tensor, experts: int) -> torch.Tensor:
    """(B, L) expert labels -> (B, experts) token counts."""
    return torch.stack([torch.bincount(row, minlength=experts) for row in labels])


@pytest.mark.parametrize("length, experts", [(12, 4), (10, 4), (3, 4), (16, 32), (45, 32), (180, 32), (24, 4)])
def test_each_expert_gets_floor_or_ceil_of_its_share_of_every_sequence(length, experts):
    """Eq. 6 without idle experts: L tokens over N experts, ceil(L/N) or floor(L/N) each, in every
    sequence of every forward; a fresh shuffle per sequence; and over forwards every expert is
    sometimes one of those with the extra token (with L < N: sometimes one with a token at all)."""
    moe = label_experts(MoEFeedForward(dim=2, num_experts=experts, mult=1))
    torch.manual_seed(0)
    had_more = torch.zeros(experts, dtype=torch.bool)
    for _ in range(20):
        labels = moe(torch.randn(5, length, 2))[..., 0].round().long()
        counts = tokens_per_expert(labels, experts)
        assert set(counts.flatten().tolist()) <= {length // experts, -(-length // experts)}
        assert (counts.sum(1) == length).all()  # every token went to exactly one expert
        assert not torch.equal(labels[0], labels[1])
        had_more |= (counts[0] == -(-length // experts))
    assert had_more.all()


@pytest.mark.parametrize("preset", ["smoke", "L", "H"])
def test_no_expert_is_idle_at_the_presets_real_token_counts(preset):
    """Every MoE layer of the preset's UNet, on its training clips' latent grid (Table 4: 32x32 for L,
    40x72 for H): the spatial layers see h*w tokens (L: 1024, 256, 64 and 16 in the middle
    block; H: 2880, 720, 180 and 45) and give each of the 32 experts ceil or floor of its share.
    Narrow channels and two frames keep it fast: neither changes a layer's sequence length; the
    temporal layers' real lengths (8, 16, 24 frames over 2 or 4 experts) are divisible."""
    config = replace(get_preset(preset).unet, base_channels=32)
    torch.manual_seed(0)
    unet = VersVideoUNet(config).train()
    seen = []
    for module in unet.modules():
        if isinstance(module, MoEFeedForward):
            label_experts(module).register_forward_hook(lambda moe, inputs, out: seen.append((moe.num_experts, out[..., 0].round().long())))
    frames, height, width = clip_shape(preset)
    assert frames % config.temporal_experts == 0
    with torch.no_grad():
        unet(torch.randn(1, config.in_channels, 2, height // 8, width // 8), torch.tensor([500]), torch.randn(1, 77, config.context_dim))
    spatial = {labels.shape[1] for experts, labels in seen if experts == config.spatial_experts}
    assert spatial == {"smoke": {64, 16, 4}, "L": {1024, 256, 64, 16}, "H": {2880, 720, 180, 45}}[preset]
    for experts, labels in seen:
        length = labels.shape[1]
        assert set(tokens_per_expert(labels, experts).flatten().tolist()) <= {length // experts, -(-length // experts)}


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
