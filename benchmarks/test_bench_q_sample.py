"""q_sample, fused against eager, forward and backward, at the training batch of the paper's U-Net."""

import pytest
import torch
from conftest import DEVICE, IMPLS, buffers, ops, skip_unless_runnable


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("phase", ["fwd", "fwd+bwd"])
def test_q_sample(measure, impl, phase):
    skip_unless_runnable(impl)
    shape = (128, 3, 32, 32)
    x0 = torch.randn(shape, device=DEVICE, requires_grad=phase != "fwd")
    noise, t = torch.randn(shape, device=DEVICE), torch.randint(0, 1000, (128,), device=DEVICE)
    coefs = buffers("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod")
    n = x0.numel() * 4

    def fn():
        out = ops(impl).q_sample(x0, t, noise, *coefs)
        if phase != "fwd":
            out.backward(torch.ones_like(out))
        return out

    measure(f"q_sample {phase} {shape}", fn, bytes=3 * n if phase == "fwd" else 5 * n)
