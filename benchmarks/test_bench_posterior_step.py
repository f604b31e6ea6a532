"""One reverse step (DDPM) at sampling batches 1 to 256: fused against eager and torch.compile."""

import pytest
import torch
from conftest import DEVICE, DTYPE_IDS, IMPLS, STEP, buffers, op, skip_unless_runnable

CASES = [(1, torch.float32), (16, torch.float32), (256, torch.float32), (256, torch.bfloat16)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch, dtype", CASES, ids=[f"{b}-{DTYPE_IDS[d]}" for b, d in CASES])
def test_posterior_step(measure, impl, batch, dtype):
    skip_unless_runnable(impl)
    shape = (batch, 3, 32, 32)
    x, out, z = (torch.randn(shape, device=DEVICE, dtype=dtype) for _ in range(3))
    t = torch.randint(1, 1000, (batch,), device=DEVICE)
    step = buffers(*STEP)
    posterior_step = op(impl, "posterior_step")
    measure(f"posterior_step {shape} {DTYPE_IDS[dtype]}", lambda: posterior_step(x, out, t, z, *step, check_t=False),
            bytes=4 * x.numel() * x.element_size())  # fmt: skip
