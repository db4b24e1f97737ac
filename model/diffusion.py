"""Diffusion math (paper section 2.1, Table 4): the LDM "linear" schedule, v-parameterisation,
text dropout for classifier-free guidance, and a DDIM sampler (a plain function).

Schedule: betas = linspace(sqrt(0.00085), sqrt(0.012), 1000) ** 2 (LDM / VideoCrafter; diffusers
calls it "scaled_linear"); alpha_bar_t = prod_{k <= t} (1 - beta_k), eq. 1.
v-parameterisation (Salimans & Ho): with z_t = sqrt(a) x0 + sqrt(1 - a) eps,
    v = sqrt(a) eps - sqrt(1 - a) x0,  x0 = sqrt(a) z_t - sqrt(1 - a) v,  eps = sqrt(1 - a) z_t + sqrt(a) v.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from model.presets import DiffusionConfig

# model(z_t, timesteps, context) -> v prediction
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Schedule:
    def __init__(self, config: DiffusionConfig = DiffusionConfig()) -> None:
        self.config = config
        betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, config.num_train_timesteps, dtype=torch.float64) ** 2
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # alpha_bar_t, float64

    def _coefficients(self, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha_bar = self.alphas_cumprod.to(timesteps.device)[timesteps].to(like.dtype)
        shape = (-1,) + (1,) * (like.ndim - 1)
        return alpha_bar.sqrt().view(shape), (1 - alpha_bar).sqrt().view(shape)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Eq. 1: z_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps."""
        a, s = self._coefficients(timesteps, x0)
        return a * x0 + s * noise

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The v target: sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0."""
        a, s = self._coefficients(timesteps, x0)
        return a * noise - s * x0

    def x0_from_v(self, z_t: torch.Tensor, v: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        a, s = self._coefficients(timesteps, z_t)
        return a * z_t - s * v

    def eps_from_v(self, z_t: torch.Tensor, v: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        a, s = self._coefficients(timesteps, z_t)
        return s * z_t + a * v


def drop_text(context: torch.Tensor, empty_context: torch.Tensor, probability: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each sample's text context by the empty prompt's with `probability` (CFG training)."""
    keep = torch.rand(context.shape[0], generator=generator, device=context.device) >= probability
    return torch.where(keep[:, None, None], context, empty_context.expand_as(context).to(context.dtype))


# How training draws timesteps: "uniform" (DDPM), or "cubic", T2I-Adapter's non-uniform sampling
# t = (1 - u^3) T, u ~ U[0, 1): most draws at high noise, where a video's layout and motion are
# decided, so a condition that sets them (an edge map) is learnt in fewer steps
TIMESTEP_SAMPLINGS = ("uniform", "cubic")


def draw_timesteps(count: int, num_train_timesteps: int, sampling: str = "uniform", generator: torch.Generator | None = None,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """`count` training timesteps in [0, num_train_timesteps), drawn as `sampling` says."""
    if sampling == "uniform":
        return torch.randint(0, num_train_timesteps, (count,), device=device, generator=generator)
    if sampling == "cubic":
        u = torch.rand(count, device=device, generator=generator, dtype=torch.float64)
        return ((1 - u**3) * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)
    raise ValueError(f"unknown timestep sampling {sampling!r}; choose one of {', '.join(TIMESTEP_SAMPLINGS)}")


def v_loss(model: Denoiser, schedule: Schedule, x0: torch.Tensor, context: torch.Tensor, generator: torch.Generator | None = None,
           timestep_sampling: str = "uniform") -> torch.Tensor:
    """MSE between the predicted and the true v at drawn timesteps (the training loss)."""
    timesteps = draw_timesteps(x0.shape[0], schedule.config.num_train_timesteps, timestep_sampling, generator, x0.device)
    noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    return v_errors(model, schedule, x0, context, noise, timesteps).mean()  # every sample has the same size


def v_errors(model: Denoiser, schedule: Schedule, x0: torch.Tensor, context: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Each sample's v-loss (b,) at the given noise and timesteps: the same draws under two
    contexts tell how much the prediction depends on what the context says."""
    prediction = model(schedule.add_noise(x0, noise, timesteps), timesteps, context)
    return (prediction.float() - schedule.velocity(x0, noise, timesteps).float()).pow(2).flatten(1).mean(dim=1)


def ddim_timesteps(num_train_timesteps: int, steps: int, offset: int = 1) -> torch.Tensor:
    """LDM ("leading") spacing, descending: 1000 steps / 30 -> 958, 925, ..., 34, 1 (steps_offset 1)."""
    stride = num_train_timesteps // steps
    return (torch.arange(steps) * stride + offset).flip(0)


@torch.no_grad()
def ddim_sample(
    model: Denoiser,
    schedule: Schedule,
    noise: torch.Tensor,
    context: torch.Tensor,
    empty_context: torch.Tensor | None = None,
    steps: int = 30,
    guidance_scale: float = 7.5,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from `noise` with classifier-free guidance.

    Conditional and unconditional predictions come from one batched forward per step:
    v = v_uncond + guidance_scale * (v_cond - v_uncond). The step after the last timestep uses
    alpha_bar_0 (diffusers' set_alpha_to_one=False), no clipping.
    """
    timesteps = ddim_timesteps(schedule.config.num_train_timesteps, steps)
    stride = schedule.config.num_train_timesteps // steps
    alphas = schedule.alphas_cumprod
    guided = empty_context is not None and guidance_scale != 1.0
    z = noise
    for index, t in enumerate(timesteps.tolist()):
        batch_t = torch.full((z.shape[0],), t, device=z.device, dtype=torch.long)
        if guided:
            both = model(torch.cat([z, z]), torch.cat([batch_t, batch_t]), torch.cat([empty_context.expand_as(context).to(context.dtype), context]))
            v_uncond, v_cond = both.chunk(2)
            v = v_uncond + guidance_scale * (v_cond - v_uncond)
        else:
            v = model(z, batch_t, context)
        alpha_t = alphas[t]
        alpha_prev = alphas[t - stride] if t - stride >= 0 else alphas[0]
        x0 = alpha_t.sqrt() * z - (1 - alpha_t).sqrt() * v
        eps = (1 - alpha_t).sqrt() * z + alpha_t.sqrt() * v
        z = (alpha_prev.sqrt() * x0 + (1 - alpha_prev).sqrt() * eps).to(noise.dtype)
        if callback is not None:
            callback(index, z)
    return z
