"""The eager PyTorch twin of every fused op: the specification and the baseline.

Each function here has the signature of its kernel in ddpm_fast.kernels. Tests
compare the kernels with these, benchmarks time the kernels against these. They are
written the plain way on purpose. Elementwise ops compute in float32 and round once
to the input dtype, as the kernels do.
"""

import torch
import torch.nn.functional as F

from ddpm_fast import checks
from ddpm_fast.schedule import extract


def q_sample(x0, t, noise, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod):
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps   (Ho et al., eq. 4), t per sample."""
    checks.check_q_sample(x0, t, noise, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod)
    a = extract(sqrt_alphas_cumprod, t, x0.shape).float()
    b = extract(sqrt_one_minus_alphas_cumprod, t, x0.shape).float()
    return (a * x0.float() + b * noise.float()).to(x0.dtype)


def predict_start(x_t, model_output, sqrt_recip, sqrt_recipm1, prediction_type):
    """x_0 from the model's output, all in float32; sqrt_recip = 1/sqrt(abar_t),
    sqrt_recipm1 = sqrt(1/abar_t - 1), both shaped to broadcast."""
    if prediction_type == "epsilon":  # eq. 4 solved for x_0
        return sqrt_recip * x_t - sqrt_recipm1 * model_output
    if prediction_type == "sample":
        return model_output
    # v = sqrt(abar) eps - sqrt(1 - abar) x_0  =>  x_0 = sqrt(abar) x_t - sqrt(1 - abar) v
    return (x_t - sqrt_recipm1 * model_output) / sqrt_recip


def posterior_step(
    x_t,
    model_output,
    t,
    noise,
    sqrt_recip_alphas_cumprod,
    sqrt_recipm1_alphas_cumprod,
    posterior_mean_coef1,
    posterior_mean_coef2,
    posterior_log_variance,
    prediction_type="epsilon",
    clip_denoised=True,
    generator=None,
):
    """One ancestral step x_t -> x_{t-1} of Ho et al.'s Algorithm 2.

    x_0 is predicted from the model output and clipped to [-1, 1] when asked, the
    posterior mean is coef1 x_0 + coef2 x_t (eq. 7), and sigma_t z is added where
    t > 0, sigma_t = exp(posterior_log_variance[t] / 2). `noise` is z; when None it
    is drawn with torch.randn (from `generator` if given).
    """
    checks.check_posterior_step(
        x_t, model_output, t, noise, prediction_type,
        sqrt_recip_alphas_cumprod, sqrt_recipm1_alphas_cumprod,
        posterior_mean_coef1, posterior_mean_coef2, posterior_log_variance,
    )  # fmt: skip
    if noise is None:
        noise = torch.randn(x_t.shape, generator=generator, device=x_t.device)
    shape = x_t.shape
    x = x_t.float()
    x0 = predict_start(
        x,
        model_output.float(),
        extract(sqrt_recip_alphas_cumprod, t, shape).float(),
        extract(sqrt_recipm1_alphas_cumprod, t, shape).float(),
        prediction_type,
    )
    if clip_denoised:
        x0 = x0.clamp(-1.0, 1.0)
    mean = extract(posterior_mean_coef1, t, shape).float() * x0 + extract(posterior_mean_coef2, t, shape).float() * x
    std = torch.exp(0.5 * extract(posterior_log_variance, t, shape).float())
    nonzero = (t > 0).float().reshape(-1, *((1,) * (len(shape) - 1)))
    return (mean + nonzero * std * noise.float()).to(x_t.dtype)


def ddim_step(
    x_t,
    model_output,
    t,
    t_prev,
    noise,
    alphas_cumprod,
    eta=0.0,
    prediction_type="epsilon",
    clip_denoised=True,
    generator=None,
):
    """One DDIM step x_t -> x_{t_prev} (Song et al. 2021, eq. 12), t_prev = -1 meaning x_0.

    sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev);
    x_prev = sqrt(abar_prev) x_0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z, with eps
    recomputed from the (clipped) x_0. `noise` is z (only drawn when eta > 0).
    """
    checks.check_ddim_step(x_t, model_output, t, t_prev, noise, alphas_cumprod, eta, prediction_type)
    shape = x_t.shape
    x = x_t.float()
    abar = extract(alphas_cumprod, t, shape).float()
    abar_prev = torch.where(
        t_prev >= 0, alphas_cumprod.float().gather(0, t_prev.clamp(min=0)), torch.ones_like(alphas_cumprod[:1])
    ).reshape(abar.shape)
    sqrt_recip = torch.rsqrt(abar)
    sqrt_recipm1 = torch.sqrt(1.0 / abar - 1.0)
    x0 = predict_start(x, model_output.float(), sqrt_recip, sqrt_recipm1, prediction_type)
    if clip_denoised:
        x0 = x0.clamp(-1.0, 1.0)
    eps = (sqrt_recip * x - x0) / sqrt_recipm1
    sigma = eta * torch.sqrt((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev))
    out = abar_prev.sqrt() * x0 + torch.sqrt((1.0 - abar_prev - sigma**2).clamp(min=0.0)) * eps
    if eta > 0:
        if noise is None:
            noise = torch.randn(shape, generator=generator, device=x_t.device)
        out = out + sigma * noise.float()
    return out.to(x_t.dtype)


def group_norm_silu(x, num_groups, weight=None, bias=None, eps=1e-5, add=None):
    """silu(GroupNorm(x + add[:, :, None, None]) * weight + bias) for x of shape (B, C, ...)."""
    checks.check_group_norm(x, num_groups, weight, bias, add)
    if add is not None:
        x = x + add.reshape(*add.shape, *((1,) * (x.ndim - 2))).to(x.dtype)
    return F.silu(F.group_norm(x, num_groups, weight, bias, eps))


def attention(q, k, v, scale=None):
    """softmax(q k^T * scale) v over the last two dims of (B, heads, L, d) inputs;
    scale defaults to d ** -0.5."""
    checks.check_attention(q, k, v)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, heads, L, L)
    return torch.matmul(torch.softmax(scores, dim=-1), v)
