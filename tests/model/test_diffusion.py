"""Schedule, v-parameterisation, text dropout, and DDIM parity with diffusers (test-only reference)."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from model.diffusion import TIMESTEP_SAMPLINGS, Schedule, ddim_sample, ddim_timesteps, draw_timesteps, drop_text, v_errors, v_loss
from model.presets import DiffusionConfig
from tasks.config.params import TIMESTEP_SAMPLINGS as PARAMS_TIMESTEP_SAMPLINGS


def reference_scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        steps_offset=1,
        set_alpha_to_one=False,
        clip_sample=False,
    )


def test_schedule_is_ldm_linear():
    schedule = Schedule()
    expected = torch.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(schedule.betas, expected)
    torch.testing.assert_close(schedule.alphas_cumprod.float(), reference_scheduler().alphas_cumprod, rtol=1e-6, atol=1e-7)
    assert schedule.alphas_cumprod[-1] < 0.005  # z_T is close to pure noise (section 2.1)


def test_v_parameterisation_round_trips():
    schedule = Schedule()
    torch.manual_seed(0)
    x0, eps = torch.randn(4, 4, 3, 5, 5), torch.randn(4, 4, 3, 5, 5)
    t = torch.tensor([0, 250, 600, 999])
    z_t, v = schedule.add_noise(x0, eps, t), schedule.velocity(x0, eps, t)
    torch.testing.assert_close(schedule.x0_from_v(z_t, v, t), x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(schedule.eps_from_v(z_t, v, t), eps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v, reference_scheduler().get_velocity(x0, eps, t), atol=1e-5, rtol=1e-5)


def test_text_dropout_rate():
    context, empty = torch.ones(20000, 2, 3), torch.zeros(1, 2, 3)
    dropped = drop_text(context, empty, 0.1, torch.Generator().manual_seed(0))
    share = (dropped[:, 0, 0] == 0).float().mean().item()
    assert share == pytest.approx(0.1, abs=0.01)
    assert torch.equal(drop_text(context[:5], empty, 0.0), context[:5])
    assert drop_text(context[:5], empty, 1.0).abs().sum() == 0


def test_v_loss_is_zero_for_the_exact_v_predictor():
    schedule, x0 = Schedule(), torch.randn(3, 4, 2, 4, 4)
    generator = torch.Generator().manual_seed(0)
    seen = {}

    def oracle(z_t, t, context):  # knows x0, so it can return the exact v
        eps = (z_t - schedule._coefficients(t, z_t)[0] * x0) / schedule._coefficients(t, z_t)[1]
        seen["t"] = t
        return schedule.velocity(x0, eps, t)

    assert v_loss(oracle, schedule, x0, torch.zeros(3, 1, 1), generator) < 1e-8
    assert seen["t"].shape == (3,)


def test_cubic_timesteps_favour_high_noise_as_t2i_adapter_draws_them():
    """t = (1 - u^3) T: P(t < s T) = P(u^3 > 1 - s) = 1 - (1 - s)^(1/3), so a quarter of the draws
    fall below t = 0.58 T (uniform: 58 %), and the mean is 3/4 T (uniform: 1/2 T)."""
    generator = torch.Generator().manual_seed(0)
    cubic = draw_timesteps(200_000, 1000, "cubic", generator).double()
    uniform = draw_timesteps(200_000, 1000, "uniform", generator).double()
    assert cubic.min() >= 0 and cubic.max() <= 999 and cubic.dtype == uniform.dtype
    assert abs(cubic.mean().item() / 1000 - 0.75) < 0.005 and abs(uniform.mean().item() / 1000 - 0.5) < 0.005
    assert abs((cubic < 578).double().mean().item() - (1 - 0.422 ** (1 / 3))) < 0.005
    assert PARAMS_TIMESTEP_SAMPLINGS == TIMESTEP_SAMPLINGS  # params' spelling of the choices
    with pytest.raises(ValueError, match="unknown timestep sampling 'logit'; choose one of uniform, cubic"):
        draw_timesteps(2, 1000, "logit")


def test_timesteps_match_diffusers():
    reference = reference_scheduler()
    reference.set_timesteps(30)
    assert ddim_timesteps(1000, 30).tolist() == reference.timesteps.tolist()


@pytest.mark.parametrize("guidance", [1.0, 7.5])
def test_ddim_matches_diffusers_step_by_step(guidance):
    torch.manual_seed(0)
    weight = torch.randn(4, 4) * 0.1

    def model(z, t, context):  # a fixed, nonlinear "network" of z, t and the context
        mixed = torch.einsum("oc,bcthw->bothw", weight, z)
        return torch.tanh(mixed + context.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)) * (1 + t.view(-1, 1, 1, 1, 1) / 1000)

    noise = torch.randn(2, 4, 3, 4, 4)
    context, empty = torch.randn(2, 5, 8), torch.zeros(1, 5, 8)
    ours = []
    final = ddim_sample(model, Schedule(DiffusionConfig()), noise, context, empty, steps=30, guidance_scale=guidance, callback=lambda i, z: ours.append(z))

    reference = reference_scheduler()
    reference.set_timesteps(30)
    z = noise
    for index, t in enumerate(reference.timesteps):
        batch_t = torch.full((2,), int(t))
        v = model(z, batch_t, context)
        if guidance != 1.0:
            v_uncond = model(z, batch_t, empty.expand_as(context))
            v = v_uncond + guidance * (v - v_uncond)
        z = reference.step(v, t, z, eta=0.0).prev_sample
        torch.testing.assert_close(ours[index], z, atol=1e-5, rtol=1e-5, msg=f"step {index} (t={int(t)})")
    torch.testing.assert_close(final, z, atol=1e-5, rtol=1e-5)


def test_per_sample_v_errors_average_to_the_v_loss_of_the_same_draws():
    schedule, x0 = Schedule(), torch.randn(3, 4, 2, 4, 4)
    model = lambda z_t, t, context: 0.3 * z_t  # noqa: E731
    noise, timesteps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1)), torch.tensor([5, 500, 990])
    errors = v_errors(model, schedule, x0, torch.zeros(3, 1, 1), noise, timesteps)
    assert errors.shape == (3,)
    expected = ((0.3 * schedule.add_noise(x0, noise, timesteps) - schedule.velocity(x0, noise, timesteps)) ** 2).mean(dim=(1, 2, 3, 4))
    torch.testing.assert_close(errors, expected)
