"""Fused q_sample: x_t = sqrt(abar[t_b]) x_0 + sqrt(1 - abar[t_b]) eps   (Ho et al., eq. 4).

Contract
- x0 and noise: any shape (B, ...), float32, float16 or bfloat16 (they may differ), any
  strides; t: integer tensor (B,) in [0, T); the two schedule buffers: float32 (T,).
  The output has x0's dtype and shape (contiguous). Arithmetic in float32, one rounding.
- Backward: d x0 = sqrt(abar[t_b]) g, d noise = sqrt(1 - abar[t_b]) g, in one kernel that
  reads g once (an expanded g from `loss = out.sum()` is read through its zero strides).
  No gradient flows to t or the schedule buffers (they are not parameters).
- Tested under TRITON_INTERPRET=1 against ddpm_fast.reference.q_sample per dtype, with
  odd shapes, non-contiguous inputs and expanded gradients; compiled for sm_80/sm_90.

Traffic per element (float32, bytes): fused forward reads x0 and eps and writes x_t: 12.
The eager twin runs a * x0, b * eps and their sum as three kernels (and two tiny gathers): 28. Backward: fused
reads g and writes both gradients: 12; eager autograd runs two multiplies: 16.

Grid: one program per (sample, block of BLOCK elements), flattened on axis 0 so that any
batch size fits; each program gathers its sample's two coefficients once.
"""

import torch
import triton
import triton.language as tl

from ddpm_fast import checks, reference
from ddpm_fast.kernels._common import as_rows, elementwise_block, use_triton


@triton.jit
def _q_sample_fwd_kernel(
    X0_ptr, NOISE_ptr, T_ptr, SQRT_AC_ptr, SQRT_1MAC_ptr, OUT_ptr,
    N, blocks_per_row,
    stride_xb, stride_xn, stride_nb, stride_nn, stride_t,
    BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = (pid // blocks_per_row).to(tl.int64)
    cols = (pid % blocks_per_row) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    # This sample's coefficients, gathered by its own timestep.
    t = tl.load(T_ptr + b * stride_t)
    a = tl.load(SQRT_AC_ptr + t)
    s = tl.load(SQRT_1MAC_ptr + t)
    x0 = tl.load(X0_ptr + b * stride_xb + cols * stride_xn, mask=mask).to(tl.float32)
    eps = tl.load(NOISE_ptr + b * stride_nb + cols * stride_nn, mask=mask).to(tl.float32)
    tl.store(OUT_ptr + b * N + cols, (a * x0 + s * eps).to(OUT_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _q_sample_bwd_kernel(
    G_ptr, T_ptr, SQRT_AC_ptr, SQRT_1MAC_ptr, DX0_ptr, DNOISE_ptr,
    N, blocks_per_row,
    stride_gb, stride_gn, stride_t,
    HAS_DX0: tl.constexpr, HAS_DNOISE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = (pid // blocks_per_row).to(tl.int64)
    cols = (pid % blocks_per_row) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    t = tl.load(T_ptr + b * stride_t)
    g = tl.load(G_ptr + b * stride_gb + cols * stride_gn, mask=mask).to(tl.float32)
    # x_t is linear in x0 and eps: each gradient is g times that input's coefficient.
    if HAS_DX0:
        a = tl.load(SQRT_AC_ptr + t)
        tl.store(DX0_ptr + b * N + cols, (a * g).to(DX0_ptr.dtype.element_ty), mask=mask)
    if HAS_DNOISE:
        s = tl.load(SQRT_1MAC_ptr + t)
        tl.store(DNOISE_ptr + b * N + cols, (s * g).to(DNOISE_ptr.dtype.element_ty), mask=mask)


def _grid(B: int, N: int, block: int) -> tuple[int, tuple[int]]:
    blocks_per_row = triton.cdiv(N, block)
    return blocks_per_row, (B * blocks_per_row,)


def q_sample_fwd(x0, t, noise, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod) -> torch.Tensor:
    B = x0.shape[0]
    out = torch.empty(x0.shape, dtype=x0.dtype, device=x0.device)
    if out.numel() == 0:
        return out
    x2, n2 = as_rows(x0), as_rows(noise)
    N = x2.shape[1]
    block = elementwise_block(N)
    blocks_per_row, grid = _grid(B, N, block)
    _q_sample_fwd_kernel[grid](
        x2, n2, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, out,
        N, blocks_per_row,
        x2.stride(0), x2.stride(1), n2.stride(0), n2.stride(1), t.stride(0),
        BLOCK=block, num_warps=4,
    )  # fmt: skip
    return out


def q_sample_bwd(grad, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, x0_dtype, noise_dtype, needs):
    B = grad.shape[0]
    dx0 = torch.empty(grad.shape, dtype=x0_dtype, device=grad.device) if needs[0] else None
    dnoise = torch.empty(grad.shape, dtype=noise_dtype, device=grad.device) if needs[1] else None
    if grad.numel() == 0 or not any(needs):
        return dx0, dnoise
    g2 = as_rows(grad)
    N = g2.shape[1]
    block = elementwise_block(N)
    blocks_per_row, grid = _grid(B, N, block)
    _q_sample_bwd_kernel[grid](
        g2, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod,
        dx0 if dx0 is not None else g2, dnoise if dnoise is not None else g2,
        N, blocks_per_row,
        g2.stride(0), g2.stride(1), t.stride(0),
        HAS_DX0=needs[0], HAS_DNOISE=needs[1], BLOCK=block, num_warps=4,
    )  # fmt: skip
    return dx0, dnoise


class QSampleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x0, t, noise, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod):
        ctx.save_for_backward(t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod)
        ctx.dtypes = (x0.dtype, noise.dtype)
        return q_sample_fwd(x0, t, noise, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        t, sqrt_ac, sqrt_1mac = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[2])
        dx0, dnoise = q_sample_bwd(grad, t, sqrt_ac, sqrt_1mac, *ctx.dtypes, needs)
        return dx0, None, dnoise, None, None


def q_sample(x0, t, noise, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod):
    """Fused twin of ddpm_fast.reference.q_sample (same signature, same result)."""
    if not use_triton(x0.device):
        return reference.q_sample(x0, t, noise, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod)
    checks.check_q_sample(x0, t, noise, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod)
    return QSampleFunction.apply(
        x0, t, noise, sqrt_alphas_cumprod.float().contiguous(), sqrt_one_minus_alphas_cumprod.float().contiguous()
    )
