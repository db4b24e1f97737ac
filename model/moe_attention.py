"""MoE spatial-temporal attention (MoE-STA), paper section 2.2, eq. 6-8, appendix B, Figure 7.

A transformer block on video features (b, c, t, h, w):
    spatial self-attention   on ((b t), (h w), d)
    cross-attention          on ((b t), (h w), d) to the text context (b, 77, 768)
    spatial MoE FFN          N experts (32 in L and H)
    temporal self-attention  on ((b h w), t, d), with a sinusoidal temporal position encoding
    temporal MoE FFN         M experts (4 in L and H)

MoE without a router (eq. 6): during training each sequence's tokens are shuffled, split into N
groups of ceil(L/N) or floor(L/N) tokens, and each group goes through its own expert, drawn per
forward; outputs are un-shuffled. After every optimizer step
the experts are pulled toward each other (eq. 7-8, `average_experts`). For inference
`merge_experts` turns each MoE layer into one FFN holding the experts' mean, so MoE costs
nothing at inference; an unmerged layer in eval mode already computes exactly that FFN.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def geglu(projected: torch.Tensor) -> torch.Tensor:
    """LDM's gated GELU: the projection's two halves are a value and its gate."""
    value, gate = projected.chunk(2, dim=-1)
    return value * F.gelu(gate)


class FeedForward(nn.Module):
    """LDM's transformer FFN, d -> GEGLU(2 x mult*d) -> d: what a merged MoE layer becomes."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * dim * mult)
        self.fc2 = nn.Linear(dim * mult, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(geglu(self.fc1(x)))


class MoEFeedForward(nn.Module):
    """N expert FFNs with weights stacked on a leading expert axis (one batched matmul)."""

    def __init__(self, dim: int, num_experts: int, mult: int = 4) -> None:
        super().__init__()
        hidden = dim * mult
        self.num_experts = num_experts
        # Every expert starts from the same initialisation: experts that already agree stay
        # close under eq. 7-8, and the merged FFN starts as a usable FFN.
        template = FeedForward(dim, mult)

        def stacked(tensor: torch.Tensor) -> nn.Parameter:  # (n, ...) contiguous copies of one init
            return nn.Parameter(tensor.detach().unsqueeze(0).repeat(num_experts, *([1] * tensor.ndim)).contiguous())

        self.w1 = stacked(template.fc1.weight.T)  # (n, d, 2 hidden): x @ w1, then GEGLU
        self.b1 = stacked(template.fc1.bias)  # (n, 2 hidden)
        self.w2 = stacked(template.fc2.weight.T)  # (n, hidden, d)
        self.b2 = stacked(template.fc2.bias)  # (n, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, d)
        if not self.training:
            # Eval: the mean expert, i.e. exactly the FFN merge_experts() would build.
            w1, b1, w2, b2 = (p.mean(dim=0) for p in (self.w1, self.b1, self.w2, self.b2))
            return geglu(x @ w1 + b1) @ w2 + b2
        batch, length, dim = x.shape
        n = self.num_experts
        group = math.ceil(length / n)
        # Eq. 6: shuffle (one permutation per sequence), split into n groups of `group` tokens.
        order = torch.argsort(torch.rand(batch, length, device=x.device), dim=1)  # (B, L)
        shuffled = torch.gather(x, 1, order[..., None].expand(-1, -1, dim))
        # When n does not divide L, the group * n - L < n padding slots are dealt round-robin
        # (token k to group k mod n), so each group holds ceil(L/n) or floor(L/n) tokens;
        # padding the end of "n g" groups instead left whole experts idle (16 of 32 on a 4x4
        # grid). Which expert takes which group is drawn anew in every forward (`experts`), so
        # no expert is the one that always gets the short group.
        shuffled = F.pad(shuffled, (0, 0, 0, group * n - length))
        groups = rearrange(shuffled, "b (g n) d -> n (b g) d", n=n)  # expert-major: one batched matmul
        experts = torch.randperm(n, device=x.device)  # expert i takes group experts[i]
        hidden = geglu(torch.baddbmm(self.b1[:, None], groups[experts], self.w1))
        out = torch.baddbmm(self.b2[:, None], hidden, self.w2)[torch.argsort(experts)]  # back in group order
        out = rearrange(out, "n (b g) d -> b (g n) d", b=batch)[:, :length]
        return torch.empty_like(out).scatter_(1, order[..., None].expand(-1, -1, dim), out)  # un-shuffle

    @torch.no_grad()
    def average_experts(self, exchange_rate: float) -> None:
        """Eq. 7-8: E_i <- (1 - lambda) E_i + lambda * mean_{j != i} E_j, for every expert at once."""
        n = self.num_experts
        if n < 2:
            return
        for param in (self.w1, self.b1, self.w2, self.b2):
            others_mean = (param.sum(dim=0, keepdim=True) - param) / (n - 1)
            param.mul_(1 - exchange_rate).add_(others_mean, alpha=exchange_rate)

    @torch.no_grad()
    def merged(self) -> FeedForward:
        """FFN_S = (1/N) sum_i E_{S,i} (section 2.2, inference)."""
        dim, hidden = self.w2.shape[2], self.w2.shape[1]
        ffn = FeedForward(dim, hidden // dim).to(device=self.w1.device, dtype=self.w1.dtype)
        ffn.fc1.weight.copy_(self.w1.mean(dim=0).T)
        ffn.fc1.bias.copy_(self.b1.mean(dim=0))
        ffn.fc2.weight.copy_(self.w2.mean(dim=0).T)
        ffn.fc2.bias.copy_(self.b2.mean(dim=0))
        return ffn


def make_ffn(dim: int, num_experts: int, mult: int = 4) -> nn.Module:
    return MoEFeedForward(dim, num_experts, mult) if num_experts > 1 else FeedForward(dim, mult)


class Attention(nn.Module):
    """Multi-head attention through scaled_dot_product_attention (flash / memory-efficient kernels)."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = (rearrange(p, "b l (h e) -> b h l e", h=self.heads) for p in (self.to_q(x), self.to_k(context), self.to_v(context)))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(rearrange(out, "b h l e -> b l (h e)"))


def temporal_position_encoding(length: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Sinusoidal encoding (length, dim) of frame indices: works for any number of frames."""
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    encoding = torch.zeros(length, dim, device=device)
    encoding[:, 0::2] = torch.sin(position * frequency)
    encoding[:, 1::2] = torch.cos(position * frequency)[:, : dim // 2]
    return encoding.to(dtype)


class SpatialTemporalTransformer(nn.Module):
    """One MoE-STA block on (b, c, t, h, w), residual around the whole block (LDM style)."""

    def __init__(self, channels: int, heads: int, context_dim: int, spatial_experts: int, temporal_experts: int, ff_mult: int = 4) -> None:
        super().__init__()
        self.norm_in = nn.GroupNorm(32 if channels % 32 == 0 else 1, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.norm_self, self.attn_self = nn.LayerNorm(channels), Attention(channels, heads)
        self.norm_cross, self.attn_cross = nn.LayerNorm(channels), Attention(channels, heads, context_dim)
        self.norm_ff_s, self.ff_spatial = nn.LayerNorm(channels), make_ffn(channels, spatial_experts, ff_mult)
        self.norm_temporal, self.attn_temporal = nn.LayerNorm(channels), Attention(channels, heads)
        self.norm_ff_t, self.ff_temporal = nn.LayerNorm(channels), make_ffn(channels, temporal_experts, ff_mult)
        self.proj_out = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj_out.weight)  # the block starts as the identity (LDM's zero_module)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        tokens = self.proj_in(rearrange(self.norm_in(x), "b c t h w -> (b t) (h w) c"))
        frame_context = context.repeat_interleave(t, dim=0)  # (b t, 77, d_ctx)
        tokens = tokens + self.attn_self(self.norm_self(tokens))
        tokens = tokens + self.attn_cross(self.norm_cross(tokens), frame_context)
        tokens = tokens + self.ff_spatial(self.norm_ff_s(tokens))
        if t > 1:  # temporal attention; with t = 1 (image batches) it is a no-op
            tokens = rearrange(tokens, "(b t) (h w) c -> (b h w) t c", b=b, h=h)
            position = temporal_position_encoding(t, c, tokens.device, tokens.dtype)  # tells frames apart
            tokens = tokens + self.attn_temporal(self.norm_temporal(tokens + position))
            tokens = tokens + self.ff_temporal(self.norm_ff_t(tokens))
            tokens = rearrange(tokens, "(b h w) t c -> (b t) (h w) c", b=b, h=h)
        out = rearrange(self.proj_out(tokens), "(b t) (h w) c -> b c t h w", b=b, h=h)
        return x + out


def average_experts(model: nn.Module, exchange_rate: float = 0.001) -> None:
    """Eq. 7-8 on every MoE layer of `model`; the training loop calls this after each optimizer step."""
    for module in model.modules():
        if isinstance(module, MoEFeedForward):
            module.average_experts(exchange_rate)


def merge_experts(model: nn.Module) -> nn.Module:
    """Replace every MoE layer by one FFN holding its experts' mean (in place); returns model."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MoEFeedForward):
                setattr(parent, name, child.merged())
    return model
