"""Attention over the 16x16 feature map (256 tokens, 256 channels), fused against eager."""

import pytest
import torch
from conftest import DEVICE, IMPLS, ops, skip_unless_runnable

ATTN_CASES = [((128, 1, 256, 256), "fwd"), ((128, 1, 256, 256), "fwd+bwd"), ((16, 1, 256, 256), "fwd")]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape, phase", ATTN_CASES, ids=[f"{s}-{p}" for s, p in ATTN_CASES])
def test_attention(measure, impl, shape, phase, dtype):
    skip_unless_runnable(impl)
    if dtype == torch.float16 and DEVICE.type == "cpu":
        pytest.skip("float16 matmuls on a CPU say nothing about the GPU")
    grad = phase != "fwd"
    q, k, v = (torch.randn(shape, device=DEVICE, dtype=dtype, requires_grad=grad) for _ in range(3))
    do = torch.randn(shape, device=DEVICE, dtype=dtype)

    def fn():
        o = ops(impl).attention(q, k, v)
        if grad:
            o.backward(do)
        return o

    B, H, L, d = shape
    flops = 4 * B * H * L * L * d * (1 if phase == "fwd" else 3.5)  # backward: 5 matmuls to the forward's 2
    measure(f"attention {phase} {shape} {str(dtype)[6:]}", fn, flops=flops)
