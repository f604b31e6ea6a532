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
The coefficients are computed here once per sampling run, in float64 on the host; the step that
applies them per pixel is one fused kernel (ddpm_fast.kernels.dpm_solver_step) with an eager twin.
"""

import math

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


def _alpha_sigma(sigma: float) -> tuple[float, float]:
    alpha = 1.0 / math.sqrt(sigma * sigma + 1.0)
    return alpha, sigma * alpha


def dpm_solver_coefficients(alphas_cumprod: torch.Tensor, timesteps: list[int], prediction_type: str) -> torch.Tensor:
    """The (steps, 5) float32 table of (p, q, a, b, c) per step (see the module's docstring)."""
    checks.check_prediction_type(prediction_type)
    abar = alphas_cumprod.detach().double().cpu()
    sigmas = [math.sqrt((1.0 - float(abar[t])) / float(abar[t])) for t in timesteps] + [0.0]
    n = len(timesteps)
    rows = []
    lambdas = []
    for i in range(n + 1):
        alpha, s = _alpha_sigma(sigmas[i])
        lambdas.append(math.log(alpha) - math.log(s) if s > 0 else math.inf)
    for i in range(n):
        alpha_s, s_s = _alpha_sigma(sigmas[i])
        alpha_t, s_t = _alpha_sigma(sigmas[i + 1])
        if prediction_type == "epsilon":
            p, q = 1.0 / alpha_s, -s_s / alpha_s
        elif prediction_type == "sample":
            p, q = 0.0, 1.0
        else:  # v_prediction
            p, q = alpha_s, -s_s
        h = lambdas[i + 1] - lambdas[i]
        e = alpha_t * math.expm1(-h)  # -alpha_t at the last step (sigma = 0, h = inf)
        a = s_t / s_s
        if i == 0 or i == n - 1:  # the first step has no previous x0; lower_order_final
            b, c = -e, 0.0
        else:
            r = (lambdas[i] - lambdas[i - 1]) / h
            b, c = -e * (1.0 + 0.5 / r), 0.5 * e / r
        rows.append((p, q, a, b, c))
    return torch.tensor(rows, dtype=torch.float64).to(torch.float32)
