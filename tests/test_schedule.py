import math

import pytest
import torch

from ddpm_fast.schedule import cosine_beta_schedule, extract, linear_beta_schedule, make_betas, schedule_buffers


def closed_forms(betas: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every buffer from its definition, element by element in Python floats."""
    out = {k: [] for k in ("alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
                           "posterior_variance", "posterior_mean_coef1", "posterior_mean_coef2")}  # fmt: skip
    abar = 1.0
    for beta in betas.tolist():
        prev, abar = abar, abar * (1.0 - beta)
        out["alphas_cumprod"].append(abar)
        out["sqrt_recip_alphas_cumprod"].append(1.0 / math.sqrt(abar))
        out["sqrt_recipm1_alphas_cumprod"].append(math.sqrt(1.0 / abar - 1.0))
        out["posterior_variance"].append(beta * (1.0 - prev) / (1.0 - abar))
        out["posterior_mean_coef1"].append(beta * math.sqrt(prev) / (1.0 - abar))
        out["posterior_mean_coef2"].append((1.0 - prev) * math.sqrt(1.0 - beta) / (1.0 - abar))
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}


def test_linear_is_the_papers():
    betas = linear_beta_schedule(1000)
    assert betas.dtype == torch.float64
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    torch.testing.assert_close(betas.diff(), torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64))


def test_cosine_matches_its_alphas_cumprod():
    T, s = 1000, 0.008
    betas = cosine_beta_schedule(T)
    f = [math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2 for t in range(T + 1)]
    abar = torch.tensor([f[t + 1] / f[0] for t in range(T)], dtype=torch.float64)
    # Where no beta is clipped (all but the last few), the product of alphas is f(t)/f(0).
    unclipped = betas < 0.999
    assert unclipped[:-5].all() and betas.max() <= 0.999
    torch.testing.assert_close(torch.cumprod(1 - betas, 0)[unclipped], abar[unclipped], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_buffers_match_closed_forms(schedule):
    betas = make_betas(schedule, 1000)
    bufs = schedule_buffers(betas)
    assert all(v.dtype == torch.float32 and v.shape == (1000,) for v in bufs.values())
    for name, expected in closed_forms(betas).items():
        torch.testing.assert_close(bufs[name].double(), expected, rtol=2e-6, atol=1e-30, msg=name)
    total = bufs["sqrt_alphas_cumprod"].double() ** 2 + bufs["sqrt_one_minus_alphas_cumprod"].double() ** 2
    torch.testing.assert_close(total, torch.ones(1000, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    pv = closed_forms(betas)["posterior_variance"]
    assert bufs["posterior_variance"][0] == 0
    torch.testing.assert_close(bufs["posterior_log_variance_clipped"].double()[1:], pv[1:].log(), rtol=1e-6, atol=1e-6)
    assert bufs["posterior_log_variance_clipped"][0] == bufs["posterior_log_variance_clipped"][1]
    torch.testing.assert_close(bufs["posterior_log_variance"], bufs["posterior_log_variance_clipped"])


def test_fixed_large_variance_is_beta():
    betas = make_betas("linear", 100)
    bufs = schedule_buffers(betas, "fixed_large")
    torch.testing.assert_close(bufs["posterior_log_variance"][1:], betas[1:].log().float())
    assert bufs["posterior_log_variance"][0] == bufs["posterior_log_variance_clipped"][1]


def test_extract_gathers_per_sample():
    a = torch.arange(10.0)
    out = extract(a, torch.tensor([3, 0, 9]), (3, 2, 4, 4))
    assert out.shape == (3, 1, 1, 1) and out.flatten().tolist() == [3.0, 0.0, 9.0]


@pytest.mark.parametrize(
    "args, match",
    [(("quadratic", 100), "beta_schedule"), (("linear", 1), "timesteps"), (("linear", 10.0), "timesteps")],
)
def test_bad_schedule_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        make_betas(*args)


def test_bad_variance_type():
    with pytest.raises(ValueError, match="variance_type"):
        schedule_buffers(make_betas("linear", 10), "learned")


# -- own betas, with diffusers' names and meanings ----------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(beta_schedule="linear", beta_start=5e-5, beta_end=0.03),
        dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        dict(beta_schedule="cosine"),
        dict(beta_schedule="linear", trained_betas=torch.linspace(1e-3, 0.2, 50).tolist()),
    ],
)
def test_own_betas_are_diffusers_and_the_checkpoint_rebuilds_them(kwargs):
    """DDPM(beta_start=, beta_end=, trained_betas=) gives the alphas_cumprod of diffusers'
    DDPMScheduler with the same arguments; the state_dict and the run's config carry them."""
    from diffusers import DDPMScheduler

    from ddpm_fast import DDPM, interop
    from ddpm_fast.unet import UNet, UNetConfig

    T = 50
    unet = UNet(UNetConfig(in_channels=1, image_size=8, ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(),
                           num_groups=4))  # fmt: skip
    ddpm = DDPM(unet, image_size=8, channels=1, timesteps=T, **kwargs)
    name = {"cosine": "squaredcos_cap_v2"}.get(kwargs["beta_schedule"], kwargs["beta_schedule"])
    theirs = DDPMScheduler(num_train_timesteps=T, **{**kwargs, "beta_schedule": name})
    torch.testing.assert_close(ddpm.alphas_cumprod, theirs.alphas_cumprod, rtol=1e-5, atol=1e-7)
    # The diffusers config we write reads back to the same schedule, and diffusers reads it too.
    config = interop.scheduler_config(ddpm)
    assert DDPMScheduler.from_config(config).alphas_cumprod.allclose(theirs.alphas_cumprod, rtol=1e-5, atol=1e-7)
    import json
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(config, f)
    again = DDPM(unet, image_size=8, channels=1, **interop._scheduler_kwargs(f.name))
    torch.testing.assert_close(again.alphas_cumprod, ddpm.alphas_cumprod, rtol=0, atol=0)


def test_bad_betas_are_refused_by_name():
    with pytest.raises(ValueError, match="beta_start must be a number in"):
        make_betas("linear", 10, beta_start=0.0)
    with pytest.raises(ValueError, match="beta_end must be a number in"):
        make_betas("linear", 10, beta_end=1.5)
    with pytest.raises(ValueError, match=r"trained_betas must hold one beta per timestep \(10\)"):
        make_betas("linear", 10, trained_betas=[0.1] * 9)
    with pytest.raises(ValueError, match="trained_betas must all be in"):
        make_betas("linear", 3, trained_betas=[0.1, 0.0, 0.2])
    with pytest.raises(TypeError, match="trained_betas must be a sequence"):
        make_betas("linear", 3, trained_betas="abc")
    with pytest.raises(ValueError, match="beta_schedule must be one of"):
        make_betas("sigmoid", 10)
