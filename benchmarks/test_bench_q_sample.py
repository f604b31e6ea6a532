"""q_sample at the training batch of the paper's U-Net, forward and backward, float32 and
bfloat16, NCHW and channels_last: fused against eager and torch.compile."""

import pytest
import torch
from conftest import DEVICE, DTYPE_IDS, IMPLS, buffers, op, skip_unless_runnable

CASES = [("fwd", torch.float32, "nchw"), ("fwd+bwd", torch.float32, "nchw"), ("fwd", torch.bfloat16, "nchw"),
         ("fwd+bwd", torch.bfloat16, "nchw"), ("fwd", torch.float32, "nhwc")]  # fmt: skip


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("phase, dtype, layout", CASES, ids=[f"{p}-{DTYPE_IDS[d]}-{m}" for p, d, m in CASES])
def test_q_sample(measure, impl, phase, dtype, layout):
    skip_unless_runnable(impl)
    shape = (128, 3, 32, 32)
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    x0 = torch.randn(shape, device=DEVICE, dtype=dtype).contiguous(memory_format=fmt).requires_grad_(phase != "fwd")
    noise = torch.randn(shape, device=DEVICE, dtype=dtype).contiguous(memory_format=fmt)
    t = torch.randint(0, 1000, (128,), device=DEVICE)
    grad = torch.ones_like(x0)
    coefs = buffers("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod")
    q_sample = op(impl, "q_sample")

    def fn():
        out = q_sample(x0, t, noise, *coefs, check_t=False)
        if phase != "fwd":
            out.backward(grad)
        return out

    n = x0.numel() * x0.element_size()
    measure(f"q_sample {phase} {shape} {DTYPE_IDS[dtype]} {layout}", fn, bytes=3 * n if phase == "fwd" else 5 * n)
