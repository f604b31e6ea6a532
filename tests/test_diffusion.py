import pytest
import torch
from torch.utils.data import DataLoader

from ddpm_fast import DDPM, UNet, UNetConfig
from ddpm_fast.data import digits_dataset

TINY = UNetConfig(in_channels=3, image_size=8, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                  num_groups=4, dropout=0.0)  # fmt: skip


def randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Non-zero weights everywhere, so the output depends on every layer."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return model


def tiny_ddpm(**kwargs) -> DDPM:
    return DDPM(randomise(UNet(TINY)), image_size=8, channels=3, timesteps=50, **kwargs)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_loss_is_the_simple_objective(prediction_type):
    ddpm = tiny_ddpm(prediction_type=prediction_type)
    x0, noise, t = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8), torch.tensor([0, 17, 49])
    x_t = ddpm.q_sample(x0, t, noise)
    a = ddpm.sqrt_alphas_cumprod[t].reshape(3, 1, 1, 1)
    s = ddpm.sqrt_one_minus_alphas_cumprod[t].reshape(3, 1, 1, 1)
    target = {"epsilon": noise, "sample": x0, "v_prediction": a * noise - s * x0}[prediction_type]
    expected = (ddpm.model(x_t, t) - target).pow(2).mean()
    torch.testing.assert_close(ddpm.loss(x0, t=t, noise=noise), expected)


@pytest.mark.parametrize("batch", [1, 3, 7])
def test_p_sample_shapes_and_no_noise_at_t0(batch):
    ddpm = tiny_ddpm()
    x = torch.randn(batch, 3, 8, 8)
    t0 = torch.zeros(batch, dtype=torch.long)
    a, b = ddpm.p_sample(x, t0, noise=torch.randn_like(x)), ddpm.p_sample(x, t0, noise=torch.randn_like(x))
    assert a.shape == x.shape
    torch.testing.assert_close(a, b)  # t = 0 returns the posterior mean: the noise is ignored


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_seeded_sampling_is_reproducible(variance_type):
    ddpm = tiny_ddpm(variance_type=variance_type).eval()
    a = ddpm.sample(3, generator=torch.Generator().manual_seed(1), progress=False)
    b = ddpm.sample(3, generator=torch.Generator().manual_seed(1), progress=False)
    c = ddpm.sample(3, generator=torch.Generator().manual_seed(2), progress=False)
    assert a.shape == (3, 3, 8, 8) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.abs().max() <= 1.5  # clipped x_0 keeps the samples near [-1, 1]


def test_ddim_sampling_is_reproducible_and_deterministic_at_eta_0():
    ddpm = tiny_ddpm().eval()
    a = ddpm.ddim_sample(2, steps=5, generator=torch.Generator().manual_seed(0), progress=False)
    b = ddpm.ddim_sample(2, steps=5, generator=torch.Generator().manual_seed(0), progress=False)
    c = ddpm.ddim_sample(2, steps=5, eta=1.0, generator=torch.Generator().manual_seed(0), progress=False)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="^image_size 12 must be divisible by 8"):
        DDPM(UNet(image_size=32), image_size=12)
    with pytest.raises(ValueError, match="^channels is 1"):
        DDPM(UNet(TINY), image_size=8, channels=1)
    with pytest.raises(ValueError, match="^beta_schedule"):
        DDPM(UNet(TINY), image_size=8, beta_schedule="sigmoid")
    with pytest.raises(ValueError, match="^prediction_type"):
        DDPM(UNet(TINY), image_size=8, prediction_type="score")
    ddpm = tiny_ddpm()
    with pytest.raises(ValueError, match="^t must lie in \\[0, 50\\)"):
        ddpm.p_sample(torch.randn(2, 3, 8, 8), torch.tensor([0, 50]))
    with pytest.raises(ValueError, match="^t must lie in"):
        ddpm.q_sample(torch.randn(2, 3, 8, 8), torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="^x0 must have shape \\(B, 3, 8, 8\\)"):
        ddpm.loss(torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match="^steps"):
        ddpm.ddim_sample(1, steps=0)


@pytest.mark.slow
def test_training_drives_the_loss_down():
    """A small U-Net on the 8x8 digits: a few hundred steps of Adam take L_simple well below
    where it starts (about 1: the zero-initialised model predicts eps = 0)."""
    torch.manual_seed(0)
    cfg = UNetConfig(in_channels=1, image_size=8, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                     num_groups=4, dropout=0.0)  # fmt: skip
    ddpm = DDPM(UNet(cfg), image_size=8, channels=1, timesteps=200)
    opt = torch.optim.Adam(ddpm.parameters(), lr=2e-3)
    loader = DataLoader(digits_dataset(8), batch_size=32, shuffle=True, drop_last=True)
    losses = []
    while len(losses) < 300:
        for x0, _ in loader:
            loss = ddpm.loss(x0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if len(losses) == 300:
                break
    first, last = sum(losses[:5]) / 5, sum(losses[-50:]) / 50
    assert first > 0.8 and last < 0.4 * first, (first, last)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_min_snr_gamma_weighs_the_loss_as_diffusers_training_scripts_do(prediction_type):
    """snr_gamma=5: each sample's MSE times min(SNR, 5) / SNR (epsilon), / (SNR + 1) (v) or
    min(SNR, 5) (sample), SNR from diffusers' compute_snr; the same on the fused path."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    from ddpm_fast import FastDDPM

    ddpm = tiny_ddpm(prediction_type=prediction_type, snr_gamma=5.0)
    x0, noise, t = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.tensor([0, 3, 17, 49])
    sched = DDPMScheduler(num_train_timesteps=50, prediction_type=prediction_type)
    # diffusers' examples/text_to_image/train_text_to_image.py, --snr_gamma
    snr = compute_snr(sched, t)
    weights = torch.stack([snr, 5.0 * torch.ones_like(t)], dim=1).min(dim=1)[0]
    if prediction_type == "epsilon":
        weights = weights / snr
    elif prediction_type == "v_prediction":
        weights = weights / (snr + 1)
    target = {"epsilon": noise, "sample": x0, "v_prediction": sched.get_velocity(x0, noise, t)}[prediction_type]
    pred = ddpm.model(ddpm.q_sample(x0, t, noise), t)
    expected = ((pred - target) ** 2).mean(dim=(1, 2, 3)) * weights
    got = ddpm.loss(x0, t=t, noise=noise)
    torch.testing.assert_close(got, expected.mean(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, tiny_ddpm(prediction_type=prediction_type).loss(x0, t=t, noise=noise))
    fast = FastDDPM(UNet(TINY), image_size=8, channels=3, timesteps=50, prediction_type=prediction_type, snr_gamma=5.0)
    fast.load_state_dict(ddpm.state_dict())
    torch.testing.assert_close(fast.loss(x0, t=t, noise=noise), expected.mean(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="snr_gamma must be a positive number"):
        tiny_ddpm(snr_gamma=0)
