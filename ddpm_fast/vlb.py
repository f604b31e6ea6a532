"""The variational bound term of the hybrid loss L_hybrid = L_simple + lambda L_vlb (Nichol &
Dhariwal 2021, section 3.1, lambda = 0.001), as improved-diffusion computes it
(improved_diffusion/losses.py and gaussian_diffusion.py, `_vb_terms_bpd` with a frozen mean).

For each sample with timestep t, from the model's variance values v and its prediction with the
gradient stopped (so that L_vlb trains the variance only, as in the paper):
    model mean  mu = coef1 x0(pred) + coef2 x_t (unclipped), log var = frac log beta_t +
                (1 - frac) log beta~_t, frac = (v + 1) / 2
    t > 0:      KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)), averaged over pixels, in bits
    t = 0:      -log p(x_0 | x_1) under the discretised Gaussian decoder (256 bins on [-1, 1])
L_vlb's estimate from one uniform t is T times that term, so lambda L_vlb = (T / 1000) term:
improved-diffusion's RESCALED_MSE, the setting its hybrid-loss runs use. Eager PyTorch: a few
elementwise ops per training step beside the U-Net, not a sampling step.
"""

import math

import torch

from ddpm_fast.reference import predict_start
from ddpm_fast.schedule import extract

HYBRID_LAMBDA = 0.001


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """The standard normal CDF, as improved-diffusion approximates it (tanh form)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log p(x) of images x in [-1, 1] (256 levels) under N(means, exp(log_scales)^2) binned to
    each level's width 2/255, the outermost bins open-ended."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def vb_term(ddpm, x0, x_t, t, prediction, variance):
    """Per-sample L_t in bits per dimension (float32, shape (B,)): the KL for t > 0, the decoder
    NLL at t = 0; `prediction` enters with its gradient stopped."""
    shape = x0.shape
    x0, x_t, variance = x0.float(), x_t.float(), variance.float()
    coef1, coef2 = (extract(ddpm.get_buffer(n), t, shape) for n in ("posterior_mean_coef1", "posterior_mean_coef2"))
    min_log = extract(ddpm.posterior_log_variance_clipped, t, shape)
    max_log = extract(ddpm.log_betas, t, shape)
    frac = (variance + 1.0) / 2.0
    model_log_variance = frac * max_log + (1.0 - frac) * min_log
    sr, srm1 = (extract(ddpm.get_buffer(n), t, shape) for n in ("sqrt_recip_alphas_cumprod",
                                                                  "sqrt_recipm1_alphas_cumprod"))  # fmt: skip
    pred_x0 = predict_start(x_t, prediction.detach().float(), sr, srm1, ddpm.prediction_type)
    model_mean = coef1 * pred_x0 + coef2 * x_t
    true_mean = coef1 * x0 + coef2 * x_t
    kl = normal_kl(true_mean, min_log, model_mean, model_log_variance).mean(dim=(1, 2, 3)) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_variance)
    nll = nll.mean(dim=(1, 2, 3)) / math.log(2.0)
    return torch.where(t == 0, nll, kl)
