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


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch, dtype", CASES, ids=[f"{b}-{DTYPE_IDS[d]}" for b, d in CASES])
def test_dpm_solver_step(measure, impl, batch, dtype):
    """One DPM-Solver++(2M) second-order step: x0 from the model output, then a x + b x0 + c x0_prev."""
    from ddpm_fast.dpm_solver import dpm_solver_coefficients, dpm_solver_timesteps

    skip_unless_runnable(impl)
    shape = (batch, 3, 32, 32)
    x, out = (torch.randn(shape, device=DEVICE, dtype=dtype) for _ in range(2))
    x0_prev = torch.randn(shape, device=DEVICE)
    coefs = dpm_solver_coefficients(buffers("alphas_cumprod")[0], dpm_solver_timesteps(1000, 20), "epsilon")
    coefs, i = coefs.to(DEVICE), torch.full((batch,), 5, device=DEVICE)
    step = op(impl, "dpm_solver_step")
    measure(f"dpm_solver_step {shape} {DTYPE_IDS[dtype]}", lambda: step(x, out, x0_prev, i, coefs, check_step=False),
            bytes=x.numel() * (3 * x.element_size() + 8))  # fmt: skip
