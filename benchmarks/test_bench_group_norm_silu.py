"""GroupNorm+SiLU with the time-embedding add, fused against eager, at the U-Net's shapes."""

import pytest
import torch
from conftest import DEVICE, IMPLS, ops, skip_unless_runnable

GN_CASES = [((128, 128, 32, 32), "fwd"), ((128, 128, 32, 32), "fwd+bwd"), ((128, 256, 16, 16), "fwd+bwd"),
            ((1, 128, 32, 32), "fwd"), ((16, 256, 16, 16), "fwd")]  # fmt: skip


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape, phase", GN_CASES, ids=[f"{s}-{p}" for s, p in GN_CASES])
def test_group_norm_silu(measure, impl, shape, phase):
    skip_unless_runnable(impl)
    grad = phase != "fwd"
    x = torch.randn(shape, device=DEVICE, requires_grad=grad)
    w = torch.ones(shape[1], device=DEVICE, requires_grad=grad)
    b = torch.zeros(shape[1], device=DEVICE, requires_grad=grad)
    add = torch.randn(shape[:2], device=DEVICE, requires_grad=grad)
    dy = torch.randn(shape, device=DEVICE)

    def fn():
        y = ops(impl).group_norm_silu(x, 32, w, b, 1e-5, add=add)
        if grad:
            y.backward(dy)
        return y

    n = x.numel() * 4
    measure(f"group_norm_silu+add {phase} {shape}", fn, bytes=2 * n if phase == "fwd" else 5 * n)
