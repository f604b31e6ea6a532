"""Learned variance ("learned_range", Nichol & Dhariwal 2021): the reverse step as diffusers'
DDPMScheduler computes it (eager and fused), the fused step against its float64 twin, and the
hybrid loss L_simple + 0.001 L_vlb against improved-diffusion's formulas re-derived in NumPy."""

import math

import numpy as np
import pytest
import torch
from helpers import DEVICE, DTYPES, TOL, generator, twin64

from ddpm_fast import DDPM, FastDDPM, UNet, UNetConfig, kernels, reference, vlb
from ddpm_fast.schedule import POSTERIOR_STEP_BUFFERS, make_betas, schedule_buffers

pytestmark = pytest.mark.on_device
TINY = UNetConfig(in_channels=3, out_channels=6, image_size=8, ch=16, ch_mult=(1, 2), num_res_blocks=1,
                  attn_resolutions=(4,), num_groups=4, dropout=0.0)  # fmt: skip


def learned(cls, prediction_type="epsilon", timesteps=50):
    torch.manual_seed(0)
    ddpm = cls(UNet(TINY), image_size=8, timesteps=timesteps, variance_type="learned_range",
               beta_schedule="cosine", prediction_type=prediction_type)  # fmt: skip
    with torch.no_grad():
        for p in ddpm.model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return ddpm.eval()


@pytest.mark.parametrize("cls", [DDPM, FastDDPM])
def test_the_reverse_step_is_diffusers_learned_range(cls, monkeypatch):
    """p_sample of a 6-channel model (prediction, variance values) against DDPMScheduler's step with
    variance_type="learned_range" on the same model output and noise, at t = T - 1 ... 0."""
    from diffusers import DDPMScheduler

    monkeypatch.setenv("DDPM_FAST_KERNELS", "triton" if cls is FastDDPM else "eager")
    ddpm = learned(cls)
    sched = DDPMScheduler(num_train_timesteps=50, beta_schedule="squaredcos_cap_v2", variance_type="learned_range")
    x = torch.randn(2, 3, 8, 8)
    for t in (49, 20, 1, 0):
        tt = torch.full((2,), t)
        with torch.no_grad():
            out = ddpm.model(x, tt)
        ours = ddpm.p_sample(x, tt, noise=torch.randn(2, 3, 8, 8, generator=generator(t)))
        theirs = sched.step(out.cpu(), t, x.cpu(), generator=torch.Generator().manual_seed(t)).prev_sample
        if DEVICE.type == "cpu":  # (on a GPU diffusers draws its noise from another stream)
            torch.testing.assert_close(ours.cpu(), theirs, rtol=2e-5, atol=2e-5)
        x = ours
    with pytest.raises(ValueError, match="needs a model with 6 output channels"):
        DDPM(UNet(UNetConfig(**{**TINY.__dict__, "out_channels": 3})), image_size=8, variance_type="learned_range")


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_fused_learned_step_matches_its_float64_twin(dtype, monkeypatch):
    """The variance channels as the U-Net's output holds them (the second half of a 2C tensor,
    a strided view), odd sizes, every t kind (0 has no noise)."""
    monkeypatch.setenv("DDPM_FAST_KERNELS", "triton")
    b = schedule_buffers(make_betas("linear", 100), "learned_range")
    bufs = [b[n].to(DEVICE) for n in POSTERIOR_STEP_BUFFERS]
    out = torch.randn(4, 10, 5, 7).to(dtype)
    eps, v = out[:, :5], out[:, 5:].float().tanh().to(dtype)
    x, z, t = torch.randn(4, 5, 5, 7).to(dtype), torch.randn(4, 5, 5, 7), torch.tensor([0, 1, 50, 99])
    kwargs = dict(model_variance=v, max_log_variance=b["log_betas"].to(DEVICE))
    fused = kernels.posterior_step(x, eps, t, z, *bufs, **kwargs)
    ref64 = twin64(reference.posterior_step, x, eps, t, z, *bufs, **kwargs)
    torch.testing.assert_close(fused.double(), ref64, **TOL[dtype])
    fixed = reference.posterior_step(x, eps, t, z, *bufs)
    assert not torch.allclose(fused.float()[1:], fixed.float()[1:], atol=1e-3)  # the variance took part
    with pytest.raises(ValueError, match="model_variance and max_log_variance go together"):
        kernels.posterior_step(x, eps, t, z, *bufs, model_variance=v)


def _improved_diffusion_vb(x0, x_t, t, eps, v, betas):
    """improved-diffusion's _vb_terms_bpd (gaussian_diffusion.py) with its losses.py, in NumPy
    float64, for an epsilon model: q_posterior_mean_variance, p_mean_variance (learned_range),
    normal_kl, discretized_gaussian_log_likelihood."""
    alphas_cumprod = np.cumprod(1.0 - betas)
    prev = np.append(1.0, alphas_cumprod[:-1])
    post_var = betas * (1.0 - prev) / (1.0 - alphas_cumprod)
    post_log_var_clipped = np.log(np.append(post_var[1], post_var[1:]))
    coef1 = betas * np.sqrt(prev) / (1.0 - alphas_cumprod)
    coef2 = (1.0 - prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod)

    def ex(a):
        return a[t][:, None, None, None]

    pred_x0 = np.sqrt(1.0 / ex(alphas_cumprod)) * x_t - np.sqrt(1.0 / ex(alphas_cumprod) - 1) * eps
    true_mean = ex(coef1) * x0 + ex(coef2) * x_t
    frac = (v + 1) / 2
    log_var = frac * np.log(ex(betas)) + (1 - frac) * ex(post_log_var_clipped)
    mean = ex(coef1) * pred_x0 + ex(coef2) * x_t
    lv1 = ex(post_log_var_clipped)
    kl = 0.5 * (-1.0 + log_var - lv1 + np.exp(lv1 - log_var) + (true_mean - mean) ** 2 * np.exp(-log_var))
    kl = kl.mean(axis=(1, 2, 3)) / np.log(2.0)

    def cdf(y):
        return 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (y + 0.044715 * y**3)))

    inv = np.exp(-0.5 * log_var)
    plus, minus = cdf(inv * (x0 - mean + 1 / 255)), cdf(inv * (x0 - mean - 1 / 255))
    inner = np.where(x0 > 0.999, np.log(np.maximum(1 - minus, 1e-12)), np.log(np.maximum(plus - minus, 1e-12)))
    logp = np.where(x0 < -0.999, np.log(np.maximum(plus, 1e-12)), inner)
    nll = -logp.mean(axis=(1, 2, 3)) / np.log(2.0)
    return np.where(t == 0, nll, kl)


@pytest.mark.on_cpu
def test_the_hybrid_loss_is_improved_diffusions():
    """loss() = mean over samples of (MSE + (T / 1000) L_t), L_t from improved-diffusion's
    formulas; its variance term trains the variance channels only (stop-gradient mean)."""
    ddpm = learned(DDPM).train()
    x0 = (torch.rand(4, 3, 8, 8) * 2 - 1).clamp(-0.9, 0.9)
    x0[0, 0, 0] = -1.0  # the decoder's open-ended edge bins
    x0[0, 0, 1] = 1.0
    t, noise = torch.tensor([0, 1, 17, 49]), torch.randn(4, 3, 8, 8)
    x_t = ddpm.q_sample(x0, t, noise)
    out = ddpm.model(x_t, t)
    eps, v = out[:, :3], out[:, 3:]
    betas = make_betas("cosine", 50).numpy()
    vb = _improved_diffusion_vb(x0.double().numpy(), x_t.double().numpy(), t.numpy(), eps.detach().double().numpy(),
                                v.detach().double().numpy(), betas)  # fmt: skip
    mse = ((eps - noise) ** 2).mean(dim=(1, 2, 3)).detach().double().numpy()
    expected = float((mse + vb * 50 / 1000).mean())
    assert np.all(vb > 0) and math.isfinite(expected)
    loss = ddpm.loss(x0, t=t, noise=noise)
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    # the variance term's gradient reaches the variance values, not the prediction
    e, w = eps.detach().requires_grad_(), v.detach().requires_grad_()
    vlb.vb_term(ddpm, x0, x_t, t, e, w).sum().backward()
    assert e.grad is None and w.grad is not None and w.grad.abs().sum() > 0


@pytest.mark.on_cpu
def test_ddim_and_dpm_solver_sample_a_learned_variance_model_from_its_prediction():
    ddpm = learned(DDPM)
    for images in (ddpm.ddim_sample(2, steps=3, progress=False), ddpm.dpm_solver_sample(2, steps=3, progress=False),
                   ddpm.sample(2, progress=False)):  # fmt: skip
        assert images.shape == (2, 3, 8, 8) and torch.isfinite(images).all()
