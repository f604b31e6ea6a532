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
