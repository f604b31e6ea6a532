"""ddpm_fast.ema: the weights' moving average, against diffusers' EMAModel."""

import pytest
import torch

from ddpm_fast.ema import EMA


@pytest.mark.parametrize("power", [2 / 3, 3 / 4])
def test_ema_warmup_follows_diffusers_ema_model(power):
    """EMA(warmup=True) averages as diffusers' EMAModel(use_ema_warmup=True) does, step by step;
    without warmup the decay stays as given (the first update a copy either way)."""
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    ours = EMA(net, 0.999, warmup=True, power=power)
    theirs = EMAModel(net.parameters(), decay=0.999, use_ema_warmup=True, inv_gamma=1.0, power=power)
    plain = EMA(net, 0.999)
    for _ in range(30):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        ours.update(net)
        theirs.step(net.parameters())
        plain.update(net)
        for a, b in zip(ours.module.parameters(), theirs.shadow_params):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert ours.current_decay() == pytest.approx(1 - (1 + 30) ** -power) and plain.current_decay() == 0.999
    # the warmed-up average sits near the weights of late steps; the plain one near the first copy
    last = torch.cat([p.flatten() for p in net.parameters()])
    near = torch.cat([p.flatten() for p in ours.module.parameters()])
    far = torch.cat([p.flatten() for p in plain.module.parameters()])
    assert (near - last).norm() < (far - last).norm()
    with pytest.raises(ValueError, match="decay must be in"):
        EMA(net, 1.0)
