"""Fused q_sample: x_t = sqrt(abar[t_b]) x_0 + sqrt(1 - abar[t_b]) eps   (Ho et al., eq. 4).

Contract
- x0 and noise: any shape (B, ...), float32, float16 or bfloat16 (they may differ), any
  strides; t: integer tensor (B,) in [0, T), checked once at the call (one host sync) unless
  check_t=False, and clamped into [0, T) by the gather either way (never read out of bounds);
  the two schedule buffers: float32 (T,).
  The output has x0's dtype, shape and layout (contiguous, or channels_last for a
  channels_last x0). Arithmetic in float32, one rounding.
- Backward: d x0 = sqrt(abar[t_b]) g, d noise = sqrt(1 - abar[t_b]) g, in one kernel that
  reads g once (an expanded g from `loss = out.sum()` is read through its zero strides).
  No gradient flows to t or the schedule buffers (they are not parameters).
- A PyTorch custom op (ddpm_fast::q_sample, with a fake kernel and an autograd formula):
  torch.compile traces through it, CUDA graphs capture it.
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
from ddpm_fast.kernels._common import as_rows, cdiv, elementwise_block, elementwise_out, on_input_device, use_triton
from ddpm_fast.kernels._elementwise import clamped_index, sample_block
from ddpm_fast.schedule import extract


@triton.jit
def _q_sample_fwd_kernel(
    X0_ptr, NOISE_ptr, T_ptr, SQRT_AC_ptr, SQRT_1MAC_ptr, OUT_ptr,
    N, blocks_per_row, T,
    stride_xb, stride_xn, stride_nb, stride_nn, stride_t,
    BLOCK: tl.constexpr,
):  # fmt: skip
    b, cols, mask = sample_block(N, blocks_per_row, BLOCK)
    # This sample's coefficients, gathered by its own timestep (clamped into the schedule).
    t = clamped_index(T_ptr, b, stride_t, T)
    a = tl.load(SQRT_AC_ptr + t)
    s = tl.load(SQRT_1MAC_ptr + t)
    x0 = tl.load(X0_ptr + b * stride_xb + cols * stride_xn, mask=mask).to(tl.float32)
    eps = tl.load(NOISE_ptr + b * stride_nb + cols * stride_nn, mask=mask).to(tl.float32)
    tl.store(OUT_ptr + b * N + cols, (a * x0 + s * eps).to(OUT_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _q_sample_bwd_kernel(
    G_ptr, T_ptr, SQRT_AC_ptr, SQRT_1MAC_ptr, DX0_ptr, DNOISE_ptr,
    N, blocks_per_row, T,
    stride_gb, stride_gn, stride_t,
    BLOCK: tl.constexpr,
):  # fmt: skip
    b, cols, mask = sample_block(N, blocks_per_row, BLOCK)
    t = clamped_index(T_ptr, b, stride_t, T)
    g = tl.load(G_ptr + b * stride_gb + cols * stride_gn, mask=mask).to(tl.float32)
    # x_t is linear in x0 and eps: each gradient is g times that input's coefficient.
    a = tl.load(SQRT_AC_ptr + t)
    s = tl.load(SQRT_1MAC_ptr + t)
    tl.store(DX0_ptr + b * N + cols, (a * g).to(DX0_ptr.dtype.element_ty), mask=mask)
    tl.store(DNOISE_ptr + b * N + cols, (s * g).to(DNOISE_ptr.dtype.element_ty), mask=mask)


def _grid(B: int, N: int, block: int) -> tuple[int, tuple[int]]:
    blocks_per_row = cdiv(N, block)
    return blocks_per_row, (B * blocks_per_row,)


@on_input_device
def q_sample_fwd(x0, t, noise, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod) -> torch.Tensor:
    B = x0.shape[0]
    out, order = elementwise_out(x0)
    if out.numel() == 0:
        return out
    x2, n2 = as_rows(x0, order), as_rows(noise, order)
    N = x2.shape[1]
    block = elementwise_block(N)
    blocks_per_row, grid = _grid(B, N, block)
    _q_sample_fwd_kernel[grid](
        x2, n2, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, as_rows(out, order),
        N, blocks_per_row, sqrt_alphas_cumprod.shape[0],
        x2.stride(0), x2.stride(1), n2.stride(0), n2.stride(1), t.stride(0),
        BLOCK=block, num_warps=4,
    )  # fmt: skip
    return out


@on_input_device
def q_sample_bwd(grad, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, x0_dtype, noise_dtype):
    """(d x0, d noise), both from one read of grad."""
    B = grad.shape[0]
    dx0, order = elementwise_out(grad, x0_dtype)
    dnoise, _ = elementwise_out(grad, noise_dtype)
    if grad.numel() == 0:
        return dx0, dnoise
    g2 = as_rows(grad, order)
    N = g2.shape[1]
    block = elementwise_block(N)
    blocks_per_row, grid = _grid(B, N, block)
    _q_sample_bwd_kernel[grid](
        g2, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, as_rows(dx0, order), as_rows(dnoise, order),
        N, blocks_per_row, sqrt_alphas_cumprod.shape[0],
        g2.stride(0), g2.stride(1), t.stride(0),
        BLOCK=block, num_warps=4,
    )  # fmt: skip
    return dx0, dnoise


# -- the custom op: its path, fake (meta) kernel and autograd formula ---------------------------------


@torch.library.custom_op("ddpm_fast::q_sample", mutates_args=())
def q_sample_op(
    x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, sqrt_alphas_cumprod: torch.Tensor,
    sqrt_one_minus_alphas_cumprod: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """The Triton kernel, or its eager twin where Triton does not run (both in x0's layout)."""
    if use_triton(x0.device):
        return q_sample_fwd(x0, t, noise, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod)
    out = elementwise_out(x0)[0]
    return out.copy_(reference.q_sample(x0, t, noise, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, False))


@q_sample_op.register_fake
def _(x0, t, noise, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod):
    return elementwise_out(x0)[0]


@torch.library.custom_op("ddpm_fast::q_sample_backward", mutates_args=())
def q_sample_backward_op(
    grad: torch.Tensor, t: torch.Tensor, sqrt_alphas_cumprod: torch.Tensor,
    sqrt_one_minus_alphas_cumprod: torch.Tensor, x0_dtype: torch.dtype, noise_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    if use_triton(grad.device):
        return q_sample_bwd(grad, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, x0_dtype, noise_dtype)
    t = t.clamp(0, sqrt_alphas_cumprod.shape[0] - 1)
    a = extract(sqrt_alphas_cumprod, t, grad.shape).float()
    s = extract(sqrt_one_minus_alphas_cumprod, t, grad.shape).float()
    g = grad.float()
    return elementwise_out(grad, x0_dtype)[0].copy_(a * g), elementwise_out(grad, noise_dtype)[0].copy_(s * g)


@q_sample_backward_op.register_fake
def _(grad, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, x0_dtype, noise_dtype):
    return elementwise_out(grad, x0_dtype)[0], elementwise_out(grad, noise_dtype)[0]


def _setup_context(ctx, inputs, output):
    x0, t, noise, sqrt_ac, sqrt_1mac = inputs
    ctx.save_for_backward(t, sqrt_ac, sqrt_1mac)
    ctx.dtypes = (x0.dtype, noise.dtype)


def _backward(ctx, grad):
    t, sqrt_ac, sqrt_1mac = ctx.saved_tensors
    dx0, dnoise = q_sample_backward_op(grad, t, sqrt_ac, sqrt_1mac, *ctx.dtypes)
    needs = ctx.needs_input_grad
    return dx0 if needs[0] else None, None, dnoise if needs[2] else None, None, None


q_sample_op.register_autograd(_backward, setup_context=_setup_context)


# -- the functional entry point -----------------------------------------------------------------------


def q_sample(x0, t, noise, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, check_t=True):
    """Fused twin of ddpm_fast.reference.q_sample (same signature, same result)."""
    checks.check_q_sample(x0, t, noise, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, check_t)
    return q_sample_op(x0, t, noise, sqrt_alphas_cumprod.float().contiguous(),
                       sqrt_one_minus_alphas_cumprod.float().contiguous())  # fmt: skip
