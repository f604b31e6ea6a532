"""Fused DDIM step (Song et al. 2021, eq. 12) in a single kernel; x_0 from the model output as in
the DDPM step (kernels/posterior_step.py, whose x_0 prediction, noise and plans it shares).

Per element of sample b with timesteps t = t_b, t_prev = t_prev_b; abar_prev = abar[t_prev], or 1
where t_prev = -1 (the last step):
    x_0 = clip(predicted x_0, -1, 1)         (when clip_denoised; see posterior_step)
    eps = (sr_t x_t - x_0) / srm1_t          (recomputed from the clipped x_0, use_clipped_model_output)
        = the model's own eps                (otherwise: diffusers' default)
    sigma = eta sqrt((1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev))
    x_prev = sqrt(abar_prev) x_0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z

Contract
- x_t, model_output, noise: any shape (B, ...), float32, float16 or bfloat16, any strides; t and
  t_prev integer (B,), checked once at the call (one host sync) unless check_t=False, clamped by
  every gather either way; alphas_cumprod float32 (T,). Output: x_t's dtype and layout. z as in
  the DDPM step (the `noise` tensor, torch's normals from `generator`, or in-kernel Philox); none
  at eta = 0.
- A sampling op: no backward kernel; where a gradient is required, the eager twin runs.
- A PyTorch custom op (ddpm_fast::ddim_step, with a fake kernel).
- Tested under TRITON_INTERPRET=1 against ddpm_fast.reference.ddim_step for every prediction
  type, both eps conventions, eta 0 and 1, dtypes, odd and non-contiguous inputs; compiled for
  sm_80/sm_90.

Traffic per element (float32, bytes), fused: reads x_t, the model output and z, writes x_prev:
16 (12 at eta = 0); the eager twin: about 100.
"""

import functools

import torch
import triton
import triton.language as tl

from ddpm_fast import checks, reference
from ddpm_fast.kernels import _common
from ddpm_fast.kernels._common import (
    Plans,
    _grad_enabled,
    direct_launch,
    elementwise_out,
    interpreter_on,
    meta_key,
    use_triton,
)
from ddpm_fast.kernels._elementwise import clamped_index, sample_block
from ddpm_fast.kernels.posterior_step import (
    _PREDICTION,
    _Call,
    _clip,
    _eager_noise,
    _load_noise,
    _noise_or_seed,
    _plan,
    _predict_x0,
    _requires_grad,
)


@triton.jit
def _ddim_step_kernel(
    X_ptr, OUT_ptr, NOISE_ptr, SEED_ptr, T_ptr, TPREV_ptr, AC_ptr, Y_ptr,
    eta, N, blocks_per_row, T,
    stride_xb, stride_xn, stride_ob, stride_on, stride_zb, stride_zn, stride_t, stride_tp,
    PRED: tl.constexpr, CLIP: tl.constexpr, CLIPPED_EPS: tl.constexpr, STOCHASTIC: tl.constexpr,
    HAS_NOISE: tl.constexpr, FAST_TRIG: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    b, cols, mask = sample_block(N, blocks_per_row, BLOCK)
    t = clamped_index(T_ptr, b, stride_t, T)
    t_prev = tl.minimum(tl.load(TPREV_ptr + b * stride_tp), T - 1)
    abar = tl.load(AC_ptr + t)
    abar_prev = tl.where(t_prev >= 0, tl.load(AC_ptr + tl.maximum(t_prev, 0)), 1.0)
    sr = 1.0 / tl.sqrt(abar)
    srm1 = tl.sqrt(1.0 / abar - 1.0)
    x = tl.load(X_ptr + b * stride_xb + cols * stride_xn, mask=mask).to(tl.float32)
    out = tl.load(OUT_ptr + b * stride_ob + cols * stride_on, mask=mask).to(tl.float32)
    # x_0 (clipped), the eps that goes with it, then eq. 12.
    x0_raw = _predict_x0(x, out, sr, srm1, PRED, False)
    if CLIP:
        x0 = _clip(x0_raw)
    else:
        x0 = x0_raw
    if CLIPPED_EPS:
        eps = (sr * x - x0) / srm1
    elif PRED == 0:
        eps = out
    else:
        eps = (sr * x - x0_raw) / srm1
    sigma = eta * tl.sqrt((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev))
    y = tl.sqrt(abar_prev) * x0 + tl.sqrt(tl.maximum(1.0 - abar_prev - sigma * sigma, 0.0)) * eps
    if STOCHASTIC:
        z = _load_noise(NOISE_ptr, SEED_ptr, b, cols, N, stride_zb, stride_zn, mask, HAS_NOISE, FAST_TRIG)
        y += sigma * z
    tl.store(Y_ptr + b * N + cols, y.to(Y_ptr.dtype.element_ty), mask=mask)


def ddim_step_fwd(x_t, model_output, t, t_prev, noise, seed, alphas_cumprod, eta, prediction_type, clip_denoised,
                  use_clipped_model_output, plan=None, tail=None):  # fmt: skip
    """x_prev; `plan` and `tail` (the arguments after the tensors: _tail): the call's, where the
    caller has them."""
    plan = plan or _plan(x_t, model_output, noise)
    if plan.empty:
        return x_t.new_empty_strided(plan.y_size, plan.y_stride)
    y = torch.empty_like(x_t) if plan.like else x_t.new_empty_strided(plan.y_size, plan.y_stride)
    if plan.copies:
        x_t, model_output, noise, _ = plan.rows(x_t, model_output, noise)
    if tail is None:
        options = (prediction_type, clip_denoised, use_clipped_model_output, eta, noise is not None or seed is not None)
        tail = _tail(*options, alphas_cumprod.shape[0], t.stride(0), t_prev.stride(0), plan, noise is not None)
    with _common.launch_device(plan.device):  # the tensors' GPU current (multi-GPU)
        _ddim_step_kernel[plan.grid](
            x_t, model_output, noise if noise is not None else x_t, seed if seed is not None else x_t, t, t_prev,
            alphas_cumprod, y, *tail,
        )  # fmt: skip
    return y


def _tail(prediction_type, clip_denoised, use_clipped_model_output, eta, stochastic, T, stride_t, stride_tp, plan,
          has_noise) -> tuple:  # fmt: skip
    """The kernel's arguments after its tensors: eta, sizes, strides, then the constexprs, passed
    by position (as posterior_step's _tail; num_warps is Triton's default, 4)."""
    return (float(eta), *plan.ints, T, *plan.strides, stride_t, stride_tp, _PREDICTION[prediction_type],
            bool(clip_denoised), bool(use_clipped_model_output), stochastic or has_noise, has_noise,
            not interpreter_on(), plan.block)  # fmt: skip


# -- the custom op: its path and fake (meta) kernel ---------------------------------------------------


@torch.library.custom_op("ddpm_fast::ddim_step", mutates_args=())
def ddim_step_op(
    x_t: torch.Tensor, model_output: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, noise: torch.Tensor | None,
    seed: torch.Tensor | None, alphas_cumprod: torch.Tensor, eta: float, prediction_type: str, clip_denoised: bool,
    use_clipped_model_output: bool,
) -> torch.Tensor:  # fmt: skip
    """One DDIM step; z from `noise` or Philox keyed by `seed`, none when both are None (eta = 0)."""
    if use_triton(x_t.device):
        return ddim_step_fwd(x_t, model_output, t, t_prev, noise, seed, alphas_cumprod, eta, prediction_type,
                             clip_denoised, use_clipped_model_output)  # fmt: skip
    z = _eager_noise(x_t, noise, seed)
    out = reference.ddim_step(
        x_t,
        model_output,
        t,
        t_prev,
        z,
        alphas_cumprod,
        eta if z is not None else 0.0,
        prediction_type,
        clip_denoised,
        None,
        use_clipped_model_output,
        check_t=False,
    )
    return elementwise_out(x_t)[0].copy_(out)


@ddim_step_op.register_fake
def _(x_t, model_output, t, t_prev, noise, seed, *buffers_and_options):
    return elementwise_out(x_t)[0]


# -- the functional entry point -----------------------------------------------------------------------


_CALLS = Plans()


def ddim_step(
    x_t,
    model_output,
    t,
    t_prev,
    noise,
    alphas_cumprod,
    eta=0.0,
    prediction_type="epsilon",
    clip_denoised=True,
    generator=None,
    use_clipped_model_output=False,
    noise_source="torch",
    check_t=True,
):
    """Fused twin of ddpm_fast.reference.ddim_step (same signature)."""
    if _grad_enabled() and _requires_grad(x_t, model_output):
        return reference.ddim_step(x_t, model_output, t, t_prev, noise, alphas_cumprod, eta, prediction_type,
                                   clip_denoised, generator, use_clipped_model_output, noise_source,
                                   check_t)  # fmt: skip
    key = (meta_key(x_t), meta_key(model_output), meta_key(t), meta_key(t_prev), meta_key(noise),
           id(alphas_cumprod), type(eta), eta, prediction_type, clip_denoised, use_clipped_model_output,
           noise_source)  # fmt: skip
    call = _CALLS.entries.get(key)
    if call is None:  # checks on a miss only (the key names the buffer by identity: the call holds it)
        checks.check_ddim_step(x_t, model_output, t, t_prev, noise, alphas_cumprod, eta, prediction_type, False)
        checks.check_noise_source(noise_source)
        # z is read (given or drawn) or drawn in-kernel (Philox) at eta > 0 only
        tail = functools.partial(_tail, prediction_type, clip_denoised, use_clipped_model_output, eta, eta > 0,
                                 alphas_cumprod.shape[0], t.stride(0), t_prev.stride(0))  # fmt: skip
        call = _CALLS.add(key, _Call(x_t, model_output, noise, (alphas_cumprod,), tail))
    if check_t:  # the value checks: one host sync
        checks.check_ddim_step(x_t, model_output, t, t_prev, noise, alphas_cumprod, eta, prediction_type, True)
    given = noise
    seed = None
    if eta > 0 and noise is None:
        noise, seed = _noise_or_seed(x_t, noise, generator, noise_source)
    elif eta <= 0:
        noise = None
    (abar,) = call.ready if call.ready is not None else call.buffers()
    if direct_launch(x_t, model_output, t, t_prev, noise):
        drawn = given is None and noise is not None
        plan, tail = call.launches[drawn] or call.launch_for(drawn, x_t, model_output, noise)
        return ddim_step_fwd(x_t, model_output, t, t_prev, noise, seed, abar, eta, prediction_type, clip_denoised,
                             use_clipped_model_output, plan, tail)  # fmt: skip
    return ddim_step_op(x_t, model_output, t, t_prev, noise, seed, abar, float(eta), prediction_type,
                        bool(clip_denoised), bool(use_clipped_model_output))  # fmt: skip
