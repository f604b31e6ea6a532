"""The eager ops against the paper's equations, computed by hand in float64."""

import pytest
import torch

from ddpm_fast import reference
from ddpm_fast.schedule import POSTERIOR_STEP_BUFFERS, make_betas, schedule_buffers

T = 1000


@pytest.fixture(scope="module")
def bufs():
    return schedule_buffers(make_betas("linear", T))


@pytest.fixture(scope="module")
def betas64():
    return make_betas("linear", T)


def step_args(bufs, variance="posterior_log_variance"):
    names = (*POSTERIOR_STEP_BUFFERS[:-1], variance)
    return [bufs[n] for n in names]


def test_q_sample_is_eq_4(bufs, betas64):
    x0, noise = torch.randn(3, 2, 5, 5), torch.randn(3, 2, 5, 5)
    t = torch.tensor([0, 500, 999])
    abar = torch.cumprod(1 - betas64, 0)[t].reshape(3, 1, 1, 1)
    expected = abar.sqrt() * x0.double() + (1 - abar).sqrt() * noise.double()
    out = reference.q_sample(x0, t, noise, bufs["sqrt_alphas_cumprod"], bufs["sqrt_one_minus_alphas_cumprod"])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


def test_posterior_step_is_eq_11(bufs, betas64):
    """Unclipped epsilon prediction: mean = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t) (eq. 11),
    plus sigma_t z with sigma_t^2 = beta~_t (eq. 7), and no noise at t = 0."""
    x_t, eps, z = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    t = torch.tensor([0, 1, 731])
    b = betas64[t].reshape(3, 1, 1, 1)
    abar = torch.cumprod(1 - betas64, 0)
    abar_t, abar_prev = abar[t].reshape(3, 1, 1, 1), torch.cat([abar.new_ones(1), abar])[t].reshape(3, 1, 1, 1)
    mean = (x_t.double() - b / (1 - abar_t).sqrt() * eps.double()) / (1 - b).sqrt()
    sigma = (b * (1 - abar_prev) / (1 - abar_t)).sqrt() * (t > 0).reshape(3, 1, 1, 1)
    out = reference.posterior_step(x_t, eps, t, z, *step_args(bufs), clip_denoised=False)
    torch.testing.assert_close(out.double(), mean + sigma * z.double(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_posterior_step_clips_predicted_x0(bufs, betas64, prediction_type):
    x0 = torch.rand(2, 1, 3, 3) * 4 - 2  # partly outside [-1, 1]
    eps, z = torch.randn_like(x0), torch.randn_like(x0)
    t = torch.tensor([10, 400])
    abar = torch.cumprod(1 - betas64, 0)
    abar_t = abar[t].reshape(2, 1, 1, 1)
    abar_prev = abar[t - 1].reshape(2, 1, 1, 1)
    b = betas64[t].reshape(2, 1, 1, 1)
    x_t = (abar_t.sqrt() * x0.double() + (1 - abar_t).sqrt() * eps.double()).float()
    output = {"epsilon": eps, "sample": x0,
              "v_prediction": (abar_t.sqrt() * eps.double() - (1 - abar_t).sqrt() * x0.double()).float()}  # fmt: skip
    x0c = x0.double().clamp(-1, 1)
    mean = b * abar_prev.sqrt() / (1 - abar_t) * x0c + (1 - abar_prev) * (1 - b).sqrt() / (1 - abar_t) * x_t.double()
    sigma = (b * (1 - abar_prev) / (1 - abar_t)).sqrt()
    out = reference.posterior_step(x_t, output[prediction_type], t, z, *step_args(bufs), prediction_type)
    torch.testing.assert_close(out.double(), mean + sigma * z.double(), rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("use_clipped_model_output", [False, True])
def test_ddim_step_deterministic_and_stochastic(bufs, use_clipped_model_output):
    """eq. 12 with the clipped x_0 and either the model's eps (diffusers' default) or the eps
    that the clipped x_0 implies (GLIDE's)."""
    abar = bufs["alphas_cumprod"].double()
    x_t, eps, z = torch.randn(2, 1, 3, 3) * 3, torch.randn(2, 1, 3, 3), torch.randn(2, 1, 3, 3)
    t, t_prev = torch.tensor([999, 20]), torch.tensor([899, -1])
    a_t = abar[t].reshape(2, 1, 1, 1)
    a_p = torch.tensor([abar[899].item(), 1.0], dtype=torch.float64).reshape(2, 1, 1, 1)
    x0 = ((x_t.double() - (1 - a_t).sqrt() * eps.double()) / a_t.sqrt()).clamp(-1, 1)
    assert (x0.abs() == 1).any()  # the clip is exercised
    e = (x_t.double() - a_t.sqrt() * x0) / (1 - a_t).sqrt() if use_clipped_model_output else eps.double()
    for eta in (0.0, 1.0):
        sigma = eta * ((1 - a_p) / (1 - a_t) * (1 - a_t / a_p)).sqrt()
        expected = a_p.sqrt() * x0 + (1 - a_p - sigma**2).clamp(min=0).sqrt() * e + sigma * z.double()
        out = reference.ddim_step(x_t, eps, t, t_prev, z, bufs["alphas_cumprod"], eta=eta,
                                  use_clipped_model_output=use_clipped_model_output)  # fmt: skip
        torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)


def test_group_norm_silu_by_hand():
    x, w, b, a = torch.randn(2, 6, 3, 5) * 3 + 1, torch.randn(6), torch.randn(6), torch.randn(2, 6)
    h = (x + a[:, :, None, None]).double().reshape(2, 3, -1)
    h = (h - h.mean(-1, keepdim=True)) / (h.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    h = h.reshape(2, 6, 3, 5) * w.double()[:, None, None] + b.double()[:, None, None]
    expected = h * torch.sigmoid(h)
    out = reference.group_norm_silu(x, 3, w, b, 1e-5, add=a)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


def test_attention_by_hand():
    q, k, v = torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 5)
    s = torch.einsum("bhid,bhjd->bhij", q.double(), k.double()) / 2.0
    expected = torch.einsum("bhij,bhjd->bhid", s.softmax(-1), v.double())
    torch.testing.assert_close(reference.attention(q, k, v).double(), expected, rtol=1e-5, atol=1e-6)


def test_bad_inputs_name_the_argument(bufs):
    x = torch.randn(2, 3, 4, 4)
    qs = (bufs["sqrt_alphas_cumprod"], bufs["sqrt_one_minus_alphas_cumprod"])
    with pytest.raises(ValueError, match="^t must lie in"):
        reference.q_sample(x, torch.tensor([0, T]), x, *qs)
    with pytest.raises(ValueError, match="^t must have shape"):
        reference.q_sample(x, torch.tensor([0, 1, 2]), x, *qs)
    with pytest.raises(TypeError, match="^t must be an integer"):
        reference.q_sample(x, torch.tensor([0.0, 1.0]), x, *qs)
    with pytest.raises(ValueError, match="^noise must have the shape"):
        reference.q_sample(x, torch.tensor([0, 1]), x[:, :2], *qs)
    with pytest.raises(TypeError, match="^x0 must be float32"):
        reference.q_sample(x.double(), torch.tensor([0, 1]), x, *qs)
    with pytest.raises(ValueError, match="^prediction_type"):
        reference.posterior_step(x, x, torch.tensor([0, 1]), None, *step_args(bufs), "score")
    with pytest.raises(ValueError, match="^model_output must have the shape"):
        reference.posterior_step(x, x[:1], torch.tensor([0, 1]), None, *step_args(bufs))
    with pytest.raises(ValueError, match="^t_prev must be smaller"):
        reference.ddim_step(x, x, torch.tensor([5, 5]), torch.tensor([4, 5]), None, bufs["alphas_cumprod"])
    with pytest.raises(ValueError, match="^eta"):
        reference.ddim_step(x, x, torch.tensor([5, 5]), torch.tensor([4, 4]), None, bufs["alphas_cumprod"], eta=2.0)
    with pytest.raises(ValueError, match="^num_groups"):
        reference.group_norm_silu(x, 2, None, None)
    with pytest.raises(ValueError, match="^weight must have 3"):
        reference.group_norm_silu(x, 3, torch.ones(4), None)
    with pytest.raises(ValueError, match="^x must have at least 3"):
        reference.group_norm_silu(x[0, 0], 1, None, None)
    with pytest.raises(ValueError, match="^k must have the shape"):
        reference.attention(x, x[:, :, :3], x)
    with pytest.raises(TypeError, match="^v has dtype"):
        reference.attention(x, x, x.half())
