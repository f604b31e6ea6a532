"""One reverse step (DDPM), fused against eager, at sampling batches 16 to 256."""

import pytest
import torch
from conftest import DEVICE, IMPLS, STEP, buffers, ops, skip_unless_runnable


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch", [16, 64, 256])
def test_posterior_step(measure, impl, batch):
    skip_unless_runnable(impl)
    shape = (batch, 3, 32, 32)
    x, out, z = (torch.randn(shape, device=DEVICE) for _ in range(3))
    t = torch.randint(1, 1000, (batch,), device=DEVICE)
    step = buffers(*STEP)
    measure(f"posterior_step {shape}", lambda: ops(impl).posterior_step(x, out, t, z, *step), bytes=4 * x.numel() * 4)
