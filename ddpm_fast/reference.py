"""The eager PyTorch twin of every fused op: the specification and the baseline.

Each public function here has the signature of its kernel in ddpm_fast.kernels. Tests
compare the kernels with these, benchmarks time the kernels against these. They are
written the plain way on purpose. Elementwise ops compute in float32 and round once
to the input dtype, as the kernels do (in float64 for float64 inputs, which only the tests'
float64 reference passes: users' entry points take float32, float16 and bfloat16).

Timesteps: `t` is validated (one host sync) unless `check_t=False`, which callers that drew
t themselves or checked it once pass inside their loops; unchecked, t is clamped into the
schedule first, as the kernels' gathers clamp it, so no value of t reads out of bounds.

The second half holds the eager twins of the kernels' own halves (forward with its saved
statistics, backward): what the custom ops in ddpm_fast.kernels run where Triton does not.
"""

import torch
import torch.nn.functional as F

from ddpm_fast import checks
from ddpm_fast.schedule import extract

LOG2E = 1.4426950408889634


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    """The precision an eager twin computes in: float32, or float64 for float64 inputs."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def gather(a: torch.Tensor, t: torch.Tensor, shape, dtype=torch.float32) -> torch.Tensor:
    """extract(a, t, shape) in `dtype`: a[t] per sample."""
    return extract(a, t, shape).to(dtype)


def clamp_t(t: torch.Tensor, num_timesteps: int, check_t: bool, low: int = 0) -> torch.Tensor:
    """t (as int64: gather's index dtype) once checked; clamped into [low, num_timesteps) when the
    caller skipped the check."""
    t = t.long()
    return t if check_t else t.clamp(low, num_timesteps - 1)


def q_sample(x0, t, noise, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, check_t=True):
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps   (Ho et al., eq. 4), t per sample."""
    checks.check_q_sample(x0, t, noise, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, check_t)
    t = clamp_t(t, sqrt_alphas_cumprod.shape[0], check_t)
    acc = acc_dtype(x0)
    a = gather(sqrt_alphas_cumprod, t, x0.shape, acc)
    b = gather(sqrt_one_minus_alphas_cumprod, t, x0.shape, acc)
    return (a * x0.to(acc) + b * noise.to(acc)).to(x0.dtype)


def predict_start(x_t, model_output, sqrt_recip, sqrt_recipm1, prediction_type):
    """x_0 from the model's output, all in float32; sqrt_recip = 1/sqrt(abar_t),
    sqrt_recipm1 = sqrt(1/abar_t - 1), both shaped to broadcast."""
    if prediction_type == "epsilon":  # eq. 4 solved for x_0
        return sqrt_recip * x_t - sqrt_recipm1 * model_output
    if prediction_type == "sample":
        return model_output
    # v = sqrt(abar) eps - sqrt(1 - abar) x_0  =>  x_0 = sqrt(abar) x_t - sqrt(1 - abar) v
    return (x_t - sqrt_recipm1 * model_output) / sqrt_recip


def draw_noise(x_t: torch.Tensor, noise, generator) -> torch.Tensor:
    """z for a reverse step: `noise` if given, else float32 standard normals from `generator`
    (torch's default generator when None, or one per sample: see randn) on x_t's device, in the
    order every path draws them."""
    if noise is not None:
        return noise
    return randn(x_t.shape, generator, x_t.device)


def randn(shape, generator, device) -> torch.Tensor:
    """torch.randn(shape) from `generator`: one torch.Generator (None: torch's default), or a list
    of them, one per sample along dim 0 (diffusers' convention): sample i then draws from
    generator[i] alone, so its values do not depend on the batch it is drawn in. That takes one
    draw per sample (a Python loop of torch.randn calls), the cost of per-image reproducibility."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"generator is a list of {len(generator)} generators for a batch of {shape[0]}: "
                             "pass one per image")  # fmt: skip
        return torch.stack([torch.randn(shape[1:], generator=g, device=device) for g in generator])
    return torch.randn(shape, generator=generator, device=device)


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
    noise_source="torch",
    check_t=True,
    model_variance=None,
    max_log_variance=None,
):
    """One ancestral step x_t -> x_{t-1} of Ho et al.'s Algorithm 2.

    x_0 is predicted from the model output and clipped to [-1, 1] when asked, the
    posterior mean is coef1 x_0 + coef2 x_t (eq. 7), and sigma_t z is added where
    t > 0, sigma_t = exp(posterior_log_variance[t] / 2). `noise` is z; when None it
    is drawn with torch.randn from `generator`. noise_source="philox" asks the fused kernel to
    draw z itself; this eager twin has no in-kernel generator and draws from torch's.

    Learned variance ("learned_range", Nichol & Dhariwal 2021, eq. 15): with `model_variance` v
    (the model's variance channels, x_t's shape) and `max_log_variance` (log beta, (T,)), the
    log variance is per element frac max_log_variance[t] + (1 - frac) posterior_log_variance[t],
    frac = (v + 1) / 2, as diffusers' DDPMScheduler and improved-diffusion compute it.
    """
    checks.check_posterior_step(
        x_t, model_output, t, noise, prediction_type,
        sqrt_recip_alphas_cumprod, sqrt_recipm1_alphas_cumprod,
        posterior_mean_coef1, posterior_mean_coef2, posterior_log_variance, check_t=check_t,
    )  # fmt: skip
    checks.check_learned_variance(x_t, model_variance, max_log_variance, posterior_log_variance)
    checks.check_noise_source(noise_source)
    noise = draw_noise(x_t, noise, generator)
    t = clamp_t(t, sqrt_recip_alphas_cumprod.shape[0], check_t)
    shape, acc = x_t.shape, acc_dtype(x_t)
    x = x_t.to(acc)
    x0 = predict_start(
        x,
        model_output.to(acc),
        gather(sqrt_recip_alphas_cumprod, t, shape, acc),
        gather(sqrt_recipm1_alphas_cumprod, t, shape, acc),
        prediction_type,
    )
    if clip_denoised:
        x0 = x0.clamp(-1.0, 1.0)
    mean = gather(posterior_mean_coef1, t, shape, acc) * x0 + gather(posterior_mean_coef2, t, shape, acc) * x
    log_variance = gather(posterior_log_variance, t, shape, acc)
    if model_variance is not None:
        frac = (model_variance.to(acc) + 1.0) / 2.0
        log_variance = frac * gather(max_log_variance, t, shape, acc) + (1.0 - frac) * log_variance
    std = torch.exp(0.5 * log_variance)
    nonzero = (t > 0).to(acc).reshape(-1, *((1,) * (len(shape) - 1)))
    return (mean + nonzero * std * noise.to(acc)).to(x_t.dtype)


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
    use_clipped_model_output=False,
    noise_source="torch",
    check_t=True,
):
    """One DDIM step x_t -> x_{t_prev} (Song et al. 2021, eq. 12), t_prev < 0 meaning x_0.

    sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev);
    x_prev = sqrt(abar_prev) x_0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z.
    x_0 is clipped when clip_denoised; eps is the model's own (use_clipped_model_output=False,
    diffusers' default) or recomputed from the clipped x_0 (True, as GLIDE). `noise` is z,
    drawn (from `generator`) only when eta > 0.
    """
    checks.check_ddim_step(x_t, model_output, t, t_prev, noise, alphas_cumprod, eta, prediction_type, check_t)
    checks.check_noise_source(noise_source)
    num_timesteps = alphas_cumprod.shape[0]
    t, t_prev = clamp_t(t, num_timesteps, check_t), clamp_t(t_prev, num_timesteps, check_t, low=-1)
    shape, acc = x_t.shape, acc_dtype(x_t)
    x = x_t.to(acc)
    abar = gather(alphas_cumprod, t, shape, acc)
    abar_prev = torch.where(t_prev >= 0, alphas_cumprod.to(acc).gather(0, t_prev.clamp(min=0)), 1.0).reshape(abar.shape)
    sqrt_recip = torch.rsqrt(abar)
    sqrt_recipm1 = torch.sqrt(1.0 / abar - 1.0)
    out = model_output.to(acc)
    x0_raw = predict_start(x, out, sqrt_recip, sqrt_recipm1, prediction_type)
    x0 = x0_raw.clamp(-1.0, 1.0) if clip_denoised else x0_raw
    if use_clipped_model_output:
        eps = (sqrt_recip * x - x0) / sqrt_recipm1
    elif prediction_type == "epsilon":
        eps = out
    else:
        eps = (sqrt_recip * x - x0_raw) / sqrt_recipm1
    sigma = eta * torch.sqrt((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev))
    prev = abar_prev.sqrt() * x0 + torch.sqrt((1.0 - abar_prev - sigma**2).clamp(min=0.0)) * eps
    if eta > 0:
        prev = prev + sigma * draw_noise(x_t, noise, generator).to(acc)
    return prev.to(x_t.dtype)


def dpm_solver_step(x_t, model_output, x0_prev, step, coefficients, clip_denoised=False, check_step=True):
    """One DPM-Solver++(2M) step (ddpm_fast.dpm_solver): x0 = p x_t + q model_output (clipped to
    [-1, 1] when clip_denoised), x_next = a x_t + b x0 + c x0_prev, with (p, q, a, b, c) the row
    `step` (per sample) of `coefficients`; x0_prev may be None where c = 0 (the first step), and
    is not read where c = 0. Returns (x_next in x_t's dtype, x0 in float32) for the next step."""
    checks.check_dpm_solver_step(x_t, model_output, x0_prev, step, coefficients, check_step)
    step = clamp_t(step, coefficients.shape[0], check_step)
    acc = acc_dtype(x_t)
    coef = coefficients.to(acc)[step].reshape(x_t.shape[0], 5, *((1,) * (x_t.ndim - 1)))
    p, q, a, b, c = coef.unbind(1)
    x = x_t.to(acc)
    x0 = p * x + q * model_output.to(acc)
    if clip_denoised:
        x0 = x0.clamp(-1.0, 1.0)
    x_next = a * x + b * x0
    if x0_prev is not None:
        x_next = x_next + torch.where(c != 0, c * x0_prev.to(acc), 0.0)
    return x_next.to(x_t.dtype), x0


def group_norm_silu(x, num_groups, weight=None, bias=None, eps=1e-5, add=None):
    """silu(GroupNorm(x + add[:, :, None, None]) * weight + bias) for x of shape (B, C, ...)."""
    checks.check_group_norm(x, num_groups, weight, bias, add, eps)
    if add is not None:
        x = x + add.reshape(*add.shape, *((1,) * (x.ndim - 2))).to(x.dtype)
    return F.silu(F.group_norm(x, num_groups, weight, bias, eps))


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5):
    """GroupNorm(x) * weight + bias: torch.nn.functional.group_norm (the same kernel family with
    the activation off: the attention block's norm)."""
    checks.check_group_norm(x, num_groups, weight, bias, None, eps)
    return F.group_norm(x, num_groups, weight, bias, eps)


def attention(q, k, v, scale=None):
    """softmax(q k^T * scale) v over the last two dims of (B, heads, L, d) inputs;
    scale defaults to d ** -0.5."""
    checks.check_attention(q, k, v)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, heads, L, L)
    return torch.matmul(torch.softmax(scores, dim=-1), v)


# -- eager twins of the kernels' halves (the custom ops run these where Triton does not) --------


def _grouped(x, add, num_groups):
    """x + add (per channel) in float32 as (B, G, CPG * HW), the kernels' view of a group."""
    B, C = x.shape[:2]
    xs = x.float().reshape(B, C, -1)
    if add is not None:
        xs = xs + add.float()[:, :, None]
    return xs.reshape(B, num_groups, -1)


def group_norm_act_fwd(x, num_groups, weight, bias, eps, add, silu):
    """(y, mean, rstd) as the GroupNorm kernels return them: statistics of x' = x + add over
    each group in float32, taken relative to the group's first value (the kernels' pivot), so
    the backward recomputes xhat = (x' - pivot - mean) * rstd the same way. y = act(xhat w + b)."""
    B, C = x.shape[:2]
    xs = _grouped(x, add, num_groups)
    xs = xs - xs[:, :, :1]  # minus the pivot
    mean = xs.mean(-1)
    rstd = torch.rsqrt((xs - mean[..., None]).square().mean(-1) + eps)
    xhat = ((xs - mean[..., None]) * rstd[..., None]).reshape(B, C, -1)
    h = xhat * weight.float()[:, None] + bias.float()[:, None]
    y = F.silu(h) if silu else h
    return y.reshape(x.shape).to(x.dtype), mean, rstd


def group_norm_act_bwd(dy, x, weight, bias, add, mean, rstd, num_groups, silu):
    """(dx, dweight, dbias, dadd) from the saved statistics; the formulas of the backward kernel:
    dh = dy silu'(h); dbias = sum dh, dweight = sum dh xhat over (B, HW);
    dx' = rstd (w dh - mean_g(w dh) - xhat mean_g(w dh xhat)); dadd = sum_HW dx'."""
    B, C = x.shape[:2]
    G = num_groups
    xs = _grouped(x, add, G)
    xhat = ((xs - xs[:, :, :1] - mean[..., None]) * rstd[..., None]).reshape(B, C, -1)
    w = weight.float()[:, None]
    dh = dy.float().reshape(B, C, -1)
    if silu:
        sig = torch.sigmoid(xhat * w + bias.float()[:, None])
        dh = dh * sig * (1 + (xhat * w + bias.float()[:, None]) * (1 - sig))
    dweight = (dh * xhat).sum((0, 2))
    dbias = dh.sum((0, 2))
    gdh = (dh * w).reshape(B, G, -1)
    xg = xhat.reshape(B, G, -1)
    dx = rstd[..., None] * (gdh - gdh.mean(-1, keepdim=True) - xg * (gdh * xg).mean(-1, keepdim=True))
    dx = dx.reshape(B, C, -1)
    dadd = dx.sum(-1)
    return dx.reshape(x.shape), dweight, dbias, dadd


def attention_fwd(q, k, v, scale):
    """(o, lse) as the attention kernel returns them: lse is the base-2 log-sum-exp of each
    row of scores, log2(sum_j exp(scale q.k_j)), in float32."""
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])
    return torch.matmul(p, v.float()).to(q.dtype), lse * LOG2E


def attention_bwd(do, q, k, v, o, lse, scale):
    """(dq, dk, dv) recomputed from the saved log-sum-exp, as the backward kernels do:
    P = exp(S - lse), dV = P^T dO, dS = P (dO V^T - rowsum(dO O)), dQ = scale dS K, dK = scale dS^T Q."""
    qf, kf, vf, dof = q.float(), k.float(), v.float(), do.float()
    p = torch.exp(torch.matmul(qf, kf.transpose(-1, -2)) * scale - lse[..., None] / LOG2E)
    dv = torch.matmul(p.transpose(-1, -2), dof)
    delta = (dof * o.float()).sum(-1, keepdim=True)
    ds = p * (torch.matmul(dof, vf.transpose(-1, -2)) - delta)
    dq = torch.matmul(ds, kf) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qf) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
