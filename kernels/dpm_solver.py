"""The DPM-Solver++(2M) step (ddpm_fast.dpm_solver) as one kernel, per element of sample b at
step i = step_b, with (p, q, a, b, c) the row i of the run's coefficient table:

    x0     = p x + q out                  (the model output as a data prediction; clipped when asked)
    x_next = a x + b x0 + c x0_prev       (c = 0: first order, x0_prev not read)

Contract
- x_t, model_output, x0_prev: any shape (B, ...), float32, float16 or bfloat16, any strides;
  step: integer (B,), checked once at the call (one host sync) unless check_step=False, clamped
  into the table by the gather either way; coefficients float32 (steps, 5) on the images' device.
- Returns (x_next, x0): x_next in x_t's dtype and layout, x0 in float32 and the same layout (the
  next step's x0_prev). Arithmetic in float32.
- A sampling op: no backward kernel; where a gradient is required the eager twin runs.
- A PyTorch custom op (ddpm_fast::dpm_solver_step, with a fake kernel): torch.compile traces
  through it and CUDA graphs capture it (the step index lives on the device: no host sync).
- Tested under TRITON_INTERPRET=1 against ddpm_fast.reference.dpm_solver_step for every
  prediction type, first and second order, clipping, dtypes, odd and non-contiguous inputs.

Traffic per element (float32, bytes): reads x, the model output and x0_prev, writes x_next and
x0: 20. diffusers' step in eager PyTorch (convert_model_output, then the 2M update on stacked
model outputs) runs about a dozen elementwise kernels over the images: ~100.
"""

import torch
import triton
import triton.language as tl

from ddpm_fast import checks, reference
from ddpm_fast.kernels import _common
from ddpm_fast.kernels._common import Plans, _grad_enabled, direct_launch, elementwise_out, meta_key, use_triton
from ddpm_fast.kernels._elementwise import clamped_index, sample_block
from ddpm_fast.kernels.posterior_step import _clip, _plan, _requires_grad


@triton.jit
def _dpm_solver_step_kernel(
    X_ptr, OUT_ptr, PREV_ptr, STEP_ptr, COEF_ptr, Y_ptr, X0_ptr,
    N, blocks_per_row, S,
    stride_xb, stride_xn, stride_ob, stride_on, stride_pb, stride_pn, stride_s,
    HAS_PREV: tl.constexpr, CLIP: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    b, cols, mask = sample_block(N, blocks_per_row, BLOCK)
    i = clamped_index(STEP_ptr, b, stride_s, S)
    row = COEF_ptr + i * 5
    p = tl.load(row)
    q = tl.load(row + 1)
    a = tl.load(row + 2)
    bb = tl.load(row + 3)
    c = tl.load(row + 4)
    x = tl.load(X_ptr + b * stride_xb + cols * stride_xn, mask=mask).to(tl.float32)
    out = tl.load(OUT_ptr + b * stride_ob + cols * stride_on, mask=mask).to(tl.float32)
    x0 = p * x + q * out
    if CLIP:
        x0 = _clip(x0)
    y = a * x + bb * x0
    if HAS_PREV:
        prev = tl.load(PREV_ptr + b * stride_pb + cols * stride_pn, mask=mask, other=0.0).to(tl.float32)
        y += tl.where(c != 0.0, c * prev, 0.0)  # c = 0: a buffer not yet written (NaN) stays out
    tl.store(Y_ptr + b * N + cols, y.to(Y_ptr.dtype.element_ty), mask=mask)
    tl.store(X0_ptr + b * N + cols, x0, mask=mask)


def dpm_solver_step_fwd(x_t, model_output, x0_prev, step, coefficients, clip_denoised, plan=None, tail=None):
    """(x_next, x0); `plan` and `tail` (the arguments after the tensors: _tail): the call's, where
    the caller has them."""
    plan = plan or _plan(x_t, model_output, x0_prev)
    y = torch.empty_like(x_t) if plan.like else x_t.new_empty_strided(plan.y_size, plan.y_stride)
    x0 = x_t.new_empty_strided(plan.y_size, plan.y_stride, dtype=torch.float32)
    if plan.empty:
        return y, x0
    if plan.copies:
        x_t, model_output, x0_prev, _ = plan.rows(x_t, model_output, x0_prev)
    if tail is None:
        tail = _tail(clip_denoised, coefficients.shape[0], step.stride(0), plan, x0_prev is not None)
    with _common.launch_device(plan.device):  # the tensors' GPU current (multi-GPU)
        _dpm_solver_step_kernel[plan.grid](
            x_t, model_output, x0_prev if x0_prev is not None else x_t, step, coefficients, y, x0, *tail,
        )  # fmt: skip
    return y, x0


def _tail(clip_denoised, S, stride_s, plan, has_prev) -> tuple:
    """The kernel's arguments after its tensors: sizes, strides, then the constexprs, passed by
    position (as posterior_step's _tail; num_warps is Triton's default, 4)."""
    return (*plan.ints, S, *plan.strides, stride_s, has_prev, bool(clip_denoised), plan.block)


@torch.library.custom_op("ddpm_fast::dpm_solver_step", mutates_args=())
def dpm_solver_step_op(
    x_t: torch.Tensor, model_output: torch.Tensor, x0_prev: torch.Tensor | None, step: torch.Tensor,
    coefficients: torch.Tensor, clip_denoised: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(x_next, x0): the kernel, or its eager twin where Triton does not run."""
    if use_triton(x_t.device):
        return dpm_solver_step_fwd(x_t, model_output, x0_prev, step, coefficients, clip_denoised)
    y, x0 = reference.dpm_solver_step(x_t, model_output, x0_prev, step, coefficients, clip_denoised, False)
    return elementwise_out(x_t)[0].copy_(y), elementwise_out(x_t, torch.float32)[0].copy_(x0)


@dpm_solver_step_op.register_fake
def _(x_t, model_output, x0_prev, step, coefficients, clip_denoised):
    return elementwise_out(x_t)[0], elementwise_out(x_t, torch.float32)[0]


class _Call:
    """A call's checked metadata and launch plan (see _common.Plans)."""

    def __init__(self, x_t, model_output, x0_prev, step, coefficients, clip_denoised):
        checks.check_dpm_solver_step(x_t, model_output, x0_prev, step, coefficients, False)
        self.plan = _plan(x_t, model_output, x0_prev)
        self.tail = _tail(clip_denoised, coefficients.shape[0], step.stride(0), self.plan, x0_prev is not None)
        # the table as the kernel reads it (float32, contiguous): the run's own as it is, else converted per call
        self.ready = coefficients.dtype == torch.float32 and coefficients.is_contiguous()


_CALLS = Plans()


def dpm_solver_step(x_t, model_output, x0_prev, step, coefficients, clip_denoised=False, check_step=True):
    """Fused twin of ddpm_fast.reference.dpm_solver_step (same signature)."""
    if _grad_enabled() and _requires_grad(x_t, model_output, x0_prev):
        return reference.dpm_solver_step(x_t, model_output, x0_prev, step, coefficients, clip_denoised, check_step)
    # (meta_key written out for the tensors always given: a call per tensor costs ~2% of the call)
    key = (x_t.shape, x_t.stride(), x_t.dtype, x_t.device, model_output.shape, model_output.stride(),
           model_output.dtype, model_output.device, meta_key(x0_prev), step.shape, step.stride(), step.dtype,
           step.device, meta_key(coefficients), clip_denoised)  # fmt: skip
    call = _CALLS.entries.get(key)
    if call is None:  # checks on a miss only
        call = _CALLS.add(key, _Call(x_t, model_output, x0_prev, step, coefficients, clip_denoised))
    if check_step:  # the value check: one host sync
        checks.check_timesteps("step", step, x_t.shape[0], coefficients.shape[0], x_t.device)
    if not call.ready:
        coefficients = coefficients.float().contiguous()
    if direct_launch(x_t, model_output, x0_prev, step):
        return dpm_solver_step_fwd(x_t, model_output, x0_prev, step, coefficients, clip_denoised, call.plan, call.tail)
    return dpm_solver_step_op(x_t, model_output, x0_prev, step, coefficients, bool(clip_denoised))
