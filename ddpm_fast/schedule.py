"""Beta schedules and every buffer derived from them.

Everything is computed in float64 and returned as float32, so that products like
sqrt(1 / alphas_cumprod - 1) near t = T - 1 keep their digits. Names follow Ho et al.'s
code (and diffusers / denoising-diffusion-pytorch), so users find what they expect.
"""

import math

import torch

BETA_SCHEDULES = ("linear", "cosine")
# The schedule buffers one ancestral reverse step reads, in the order of posterior_step's arguments.
POSTERIOR_STEP_BUFFERS = (
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "posterior_log_variance",
)
VARIANCE_TYPES = ("fixed_small", "fixed_large")


def linear_beta_schedule(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Ho et al. (2020): betas evenly spaced from 1e-4 to 0.02 (float64)."""
    return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)


def cosine_beta_schedule(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal (2021), eq. 17: alphas_cumprod(t) = f(t) / f(0),
    f(t) = cos(((t / T + s) / (1 + s)) * pi / 2) ** 2, betas clipped at max_beta (float64)."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alphas_cumprod = f / f[0]
    return (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(max=max_beta)


def make_betas(beta_schedule: str, timesteps: int) -> torch.Tensor:
    if not isinstance(timesteps, int) or isinstance(timesteps, bool) or timesteps < 2:
        raise ValueError(f"timesteps must be an int >= 2, got {timesteps!r}")
    if beta_schedule == "linear":
        return linear_beta_schedule(timesteps)
    if beta_schedule == "cosine":
        return cosine_beta_schedule(timesteps)
    raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")


def schedule_buffers(betas: torch.Tensor, variance_type: str = "fixed_small") -> dict[str, torch.Tensor]:
    """Every quantity the forward and reverse processes need, indexed by t in [0, T).

    `posterior_log_variance` is the log variance of the reverse step for the chosen
    variance_type: fixed_small uses the true posterior variance beta~_t (eq. 7), clipped
    at t = 0 where it is 0; fixed_large uses beta_t, with beta~_1 at t = 0 (as Ho et al.).
    """
    if variance_type not in VARIANCE_TYPES:
        raise ValueError(f"variance_type must be one of {VARIANCE_TYPES}, got {variance_type!r}")
    betas = betas.to(torch.float64)
    if betas.ndim != 1 or betas.numel() < 2 or not bool(((betas > 0) & (betas < 1)).all()):
        raise ValueError("betas must be a 1-D tensor of at least 2 values in (0, 1)")
    alphas = 1.0 - betas
    alphas_cumprod = torch.cumprod(alphas, dim=0)
    alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])

    # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta~_t)   (eq. 6, 7)
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    # beta~_0 = 0: clip the log at t = 0 with beta~_1 (only the mean is used there).
    clipped = torch.cat([posterior_variance[1:2], posterior_variance[1:]])
    posterior_log_variance_clipped = torch.log(clipped)
    if variance_type == "fixed_small":
        posterior_log_variance = posterior_log_variance_clipped
    else:
        posterior_log_variance = torch.log(torch.cat([posterior_variance[1:2], betas[1:]]))

    buffers = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": torch.log(1.0 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1.0).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_log_variance_clipped,
        "posterior_log_variance": posterior_log_variance,
        "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod),
    }
    return {name: value.to(torch.float32) for name, value in buffers.items()}


def extract(a: torch.Tensor, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """a[t] for each sample, shaped (B, 1, 1, ...) to broadcast against `shape`; t of any integer
    dtype (gather takes int64 indices: int8 or uint8 t are widened)."""
    return a.gather(0, t.long()).reshape(t.shape[0], *((1,) * (len(shape) - 1)))
