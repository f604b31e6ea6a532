"""Beta schedules and every buffer derived from them.

Everything is computed in float64 and returned as float32, so that products like
sqrt(1 / alphas_cumprod - 1) near t = T - 1 keep their digits. Names follow Ho et al.'s
code (and diffusers / denoising-diffusion-pytorch), so users find what they expect.
"""

import math

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
BETA_START, BETA_END = 1e-4, 0.02  # Ho et al.'s, and diffusers' defaults
# The schedule buffers one ancestral reverse step reads, in the order of posterior_step's arguments.
POSTERIOR_STEP_BUFFERS = (
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "posterior_log_variance",
)
# Buffers a DDPM keeps out of its state_dict (added after checkpoints existed; derived from betas).
NOT_IN_STATE_DICT = ("log_betas",)
VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range")  # learned_range: Nichol & Dhariwal (2021)


def linear_beta_schedule(timesteps: int, beta_start: float = BETA_START, beta_end: float = BETA_END) -> torch.Tensor:
    """Ho et al. (2020): betas evenly spaced from beta_start (1e-4) to beta_end (0.02) (float64)."""
    return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)


def scaled_linear_beta_schedule(timesteps: int, beta_start: float = BETA_START, beta_end: float = BETA_END):
    """diffusers' "scaled_linear" (latent diffusion's): sqrt(betas) evenly spaced (float64)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, timesteps, dtype=torch.float64) ** 2


def cosine_beta_schedule(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal (2021), eq. 17: alphas_cumprod(t) = f(t) / f(0),
    f(t) = cos(((t / T + s) / (1 + s)) * pi / 2) ** 2, betas clipped at max_beta (float64)."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alphas_cumprod = f / f[0]
    return (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(max=max_beta)


def _check_beta(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
    return float(value)


def make_betas(beta_schedule: str, timesteps: int, beta_start: float = BETA_START, beta_end: float = BETA_END,
               trained_betas=None) -> torch.Tensor:  # fmt: skip
    """The betas (float64), with diffusers' names and meanings: `trained_betas` (a sequence or
    1-D tensor of `timesteps` values in (0, 1)) when given, whatever beta_schedule says; else
    beta_schedule "linear" or "scaled_linear" from beta_start to beta_end, or "cosine"
    (diffusers' "squaredcos_cap_v2"), which has no start or end."""
    if not isinstance(timesteps, int) or isinstance(timesteps, bool) or timesteps < 2:
        raise ValueError(f"timesteps must be an int >= 2, got {timesteps!r}")
    if beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")
    beta_start, beta_end = _check_beta("beta_start", beta_start), _check_beta("beta_end", beta_end)
    if trained_betas is not None:
        return check_trained_betas(trained_betas, timesteps)
    if beta_schedule == "linear":
        return linear_beta_schedule(timesteps, beta_start, beta_end)
    if beta_schedule == "scaled_linear":
        return scaled_linear_beta_schedule(timesteps, beta_start, beta_end)
    return cosine_beta_schedule(timesteps)


def check_trained_betas(trained_betas, timesteps: int) -> torch.Tensor:
    """trained_betas as a float64 tensor, refused by name unless 1-D, `timesteps` long, in (0, 1)."""
    try:
        betas = torch.as_tensor(trained_betas, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(
            f"trained_betas must be a sequence or 1-D tensor of numbers, got {type(trained_betas).__name__}"
        ) from e
    if betas.ndim != 1 or betas.numel() != timesteps:
        raise ValueError(f"trained_betas must hold one beta per timestep ({timesteps}), got shape {tuple(betas.shape)}")
    if not bool(((betas > 0) & (betas < 1)).all()):
        raise ValueError("trained_betas must all be in (0, 1)")
    return betas


def schedule_buffers(betas: torch.Tensor, variance_type: str = "fixed_small") -> dict[str, torch.Tensor]:
    """Every quantity the forward and reverse processes need, indexed by t in [0, T).

    `posterior_log_variance` is the log variance of the reverse step for the chosen
    variance_type: fixed_small uses the true posterior variance beta~_t (eq. 7), clipped
    at t = 0 where it is 0; fixed_large uses beta_t, with beta~_1 at t = 0 (as Ho et al.);
    learned_range keeps fixed_small's, the low end of the range the model interpolates in
    (log beta~_t to log beta_t: `log_betas`).
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
    if variance_type in ("fixed_small", "learned_range"):
        posterior_log_variance = posterior_log_variance_clipped
    else:
        posterior_log_variance = torch.log(torch.cat([posterior_variance[1:2], betas[1:]]))

    buffers = {
        "betas": betas,
        "log_betas": betas.log(),
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
