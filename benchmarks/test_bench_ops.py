"""Each fused op against its eager twin, forward and backward, at the paper's U-Net shapes
(batch 128 for training, 16 to 256 for sampling)."""

import pytest
import torch
from conftest import DEVICE, IMPLS, skip_unless_runnable

from ddpm_fast import kernels, reference
from ddpm_fast.schedule import make_betas, schedule_buffers

BUFS = schedule_buffers(make_betas("linear", 1000))
STEP = ("sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_mean_coef1", "posterior_mean_coef2",
        "posterior_log_variance")  # fmt: skip


def ops(impl):
    return kernels if impl == "fused" else reference


def buffers(*names):
    return [BUFS[n].to(DEVICE) for n in names]


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


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch", [16, 64, 256])
def test_posterior_step(measure, impl, batch):
    skip_unless_runnable(impl)
    shape = (batch, 3, 32, 32)
    x, out, z = (torch.randn(shape, device=DEVICE) for _ in range(3))
    t = torch.randint(1, 1000, (batch,), device=DEVICE)
    step = buffers(*STEP)
    measure(f"posterior_step {shape}", lambda: ops(impl).posterior_step(x, out, t, z, *step), bytes=4 * x.numel() * 4)


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
