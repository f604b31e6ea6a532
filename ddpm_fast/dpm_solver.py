"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models", Algorithm 2 with the midpoint form), as diffusers' DPMSolverMultistepScheduler
runs it with its defaults: algorithm_type "dpmsolver++", solver_order 2, solver_type "midpoint",
lower_order_final, timestep_spacing "linspace", final_sigmas_type "zero", no thresholding.

Each step i maps x at timestep t_i to x at t_{i+1} (t_S: sigma = 0, the data) through the data
prediction x0_i = p_i x + q_i out (the model output converted, any prediction type):

    x_next = a_i x + b_i x0_i + c_i x0_{i-1}

with sigma_i = sqrt((1 - abar) / abar) at t_i, alpha_i = 1 / sqrt(1 + sigma_i^2), s_i = sigma_i alpha_i,
lambda_i = log(alpha_i / s_i), h = lambda_{i+1} - lambda_i, e = alpha_{i+1} (exp(-h) - 1):
    a = s_{i+1} / s_i;  first order (the first and the last step): b = -e, c = 0;
    second order: r = (lambda_i - lambda_{i-1}) / h, b = -e (1 + 1 / (2 r)), c = e / (2 r).
The coefficients are computed here once per sampling run, in float64 on the schedule's device
(no value goes back to the host: no sync); the step that applies them per pixel is one fused
kernel (ddpm_fast.kernels.dpm_solver_step) with an eager twin.
"""

import numpy as np
import torch

from ddpm_fast import checks

COLUMNS = ("p", "q", "a", "b", "c")  # the coefficient table's columns, in order


def dpm_solver_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """The model's timesteps, as DPMSolverMultistepScheduler.set_timesteps spaces them ("linspace")."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be an int in [1, {num_timesteps}], got {steps!r}")
    ts = np.linspace(0, num_timesteps - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    return [int(t) for t in ts]


def dpm_solver_coefficients(alphas_cumprod: torch.Tensor, timesteps: list[int], prediction_type: str) -> torch.Tensor:
    """The (steps, 5) float32 table of (p, q, a, b, c) per step (see the module's docstring), on
    alphas_cumprod's device, computed there in float64 without reading a value back to the host:
    a sampling run starts without waiting for the GPU."""
    checks.check_prediction_type(prediction_type)
    abar = alphas_cumprod.detach().to(torch.float64)[torch.tensor(timesteps, device=alphas_cumprod.device)]
    sigma = torch.cat([torch.sqrt((1.0 - abar) / abar), abar.new_zeros(1)])  # sigma = 0 after the last step
    alpha = torch.rsqrt(sigma * sigma + 1.0)
    s = sigma * alpha
    lam = torch.log(alpha) - torch.log(s)  # +inf where s = 0
    alpha_s, s_s, alpha_t, s_t = alpha[:-1], s[:-1], alpha[1:], s[1:]
    if prediction_type == "epsilon":
        p, q = 1.0 / alpha_s, -s_s / alpha_s
    elif prediction_type == "sample":
        p, q = torch.zeros_like(alpha_s), torch.ones_like(alpha_s)
    else:  # v_prediction
        p, q = alpha_s, -s_s
    h = lam[1:] - lam[:-1]
    e = alpha_t * torch.expm1(-h)  # -alpha_t at the last step (h = inf)
    a = s_t / s_s
    r = torch.cat([h.new_ones(1), lam[1:-1] - lam[:-2]]) / h  # (lambda_i - lambda_{i-1}) / h_i
    n = len(timesteps)
    first = torch.zeros(n, dtype=torch.bool, device=h.device)
    first[0] = first[-1] = True  # the first step has no previous x0; lower_order_final
    b = torch.where(first, -e, -e * (1.0 + 0.5 / r))
    c = torch.where(first, torch.zeros_like(e), 0.5 * e / r)
    return torch.stack([p, q, a, b, c], dim=1).to(torch.float32)
