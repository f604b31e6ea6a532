"""Attention over the 16x16 feature map (256 tokens, 256 channels) with q, k, v laid out as the
U-Net's AttnBlock passes them (views of one projection's output): fused against eager,
torch.compile and scaled_dot_product_attention (flash / memory-efficient backends, d = 256)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import CUDA, DEVICE, DTYPE_IDS, IMPLS, op, skip_unless_runnable

CASES = [(128, "fwd", torch.float16), (128, "fwd+bwd", torch.float16), (128, "fwd", torch.bfloat16),
         (128, "fwd+bwd", torch.bfloat16), (128, "fwd+bwd", torch.float32), (16, "fwd", torch.float16)]  # fmt: skip
if not CUDA:  # half matmuls on a CPU say nothing about a GPU
    CASES = [(16, "fwd", torch.float32), (16, "fwd+bwd", torch.float32)]


@pytest.mark.parametrize("impl", IMPLS + ["sdpa"])
@pytest.mark.parametrize("batch, phase, dtype", CASES, ids=[f"{b}-{p}-{DTYPE_IDS[d]}" for b, p, d in CASES])
def test_attention(measure, impl, batch, phase, dtype):
    skip_unless_runnable(impl)
    L, d = 256, 256
    grad = phase != "fwd"
    qkv = torch.randn(batch, L, 3 * d, device=DEVICE, dtype=dtype)
    q, k, v = (t.unsqueeze(1).requires_grad_(grad) for t in qkv.chunk(3, dim=-1))  # (B, 1, L, d) views
    do = torch.randn(batch, 1, L, d, device=DEVICE, dtype=dtype)
    attention = F.scaled_dot_product_attention if impl == "sdpa" else op(impl, "attention")

    def fn():
        o = attention(q, k, v)
        if grad:
            o.backward(do)
        return o

    flops = 4 * batch * L * L * d * (1 if phase == "fwd" else 3.5)  # backward: 5 matmuls to the forward's 2
    measure(f"attention {phase} ({batch}, 1, {L}, {d}) {DTYPE_IDS[dtype]}", fn, flops=flops, dtype=dtype)
