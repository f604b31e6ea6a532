"""Fused reverse steps: one ancestral DDPM step and one DDIM step, each a single kernel.

DDPM (Ho et al., Algorithm 2 with eq. 7), per element of sample b with timestep t = t_b:
    x_0  = sr_t x_t - srm1_t eps            (epsilon;  sr = 1/sqrt(abar), srm1 = sqrt(1/abar - 1))
         = out                               (sample)
         = (x_t - srm1_t v) / sr_t           (v_prediction: sqrt(abar) x_t - sqrt(1 - abar) v)
    x_0  = clip(x_0, -1, 1)                  (when clip_denoised)
    x_{t-1} = coef1_t x_0 + coef2_t x_t + [t > 0] exp(logvar_t / 2) z
DDIM (Song et al. 2021, eq. 12), abar_prev = abar[t_prev] or 1 where t_prev = -1:
    eps = (sr_t x_t - x_0) / srm1_t          (recomputed from the clipped x_0)
    sigma = eta sqrt((1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev))
    x_prev = sqrt(abar_prev) x_0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z

Contract
- x_t, model_output, noise: any shape (B, ...), float32, float16 or bfloat16, any strides;
  t (and t_prev): integer (B,); schedule buffers float32 (T,). Output: x_t's dtype, contiguous.
  Arithmetic in float32, one rounding at the store.
- z is the `noise` tensor when given (the result then matches the eager twin up to
  rounding), else drawn inside the kernel by Philox from a seed drawn from `generator` (or
  torch's default generator) on the device, at offset b * N + n: the noise tensor is never
  written or read, the seed never goes to the host, and each call gets a fresh seed.
- Sampling ops: no backward kernel. Where a gradient is required, the step runs the eager
  twin, whose autograd gives the correct gradient.
- Tested under TRITON_INTERPRET=1 against ddpm_fast.reference.posterior_step / ddim_step for
  every prediction type, both variances, dtypes, odd and non-contiguous inputs; compiled
  for sm_80/sm_90.

Traffic per element (float32, bytes). DDPM step, fused: reads x_t, the model output and z,
writes x_{t-1}: 16 (12 with in-kernel noise, where the eager path also pays 4 to write z).
The eager twin, epsilon with clipping, dispatches 19 kernels: 9 over the images (two
multiplies and a subtraction for x_0, the clamp, two multiplies and an add for the mean, a
multiply and an add for the noise) and 10 tiny ones on the per-sample coefficients: 84
(`python -m ddpm_fast.traffic` counts them). DDIM, fused: 16 (12 at eta = 0); eager: about 100.
"""

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ddpm_fast import checks, reference
from ddpm_fast.kernels._common import as_rows, elementwise_block, interpreter_on, use_triton

_PREDICTION = {"epsilon": 0, "sample": 1, "v_prediction": 2}


@triton.jit
def _predict_x0(x, out, sr, srm1, PRED: tl.constexpr, CLIP: tl.constexpr):
    if PRED == 0:
        x0 = sr * x - srm1 * out
    elif PRED == 1:
        x0 = out
    else:
        x0 = (x - srm1 * out) / sr
    if CLIP:
        x0 = tl.minimum(tl.maximum(x0, -1.0), 1.0)
    return x0


@triton.jit
def _randn(seed, offset, FAST_TRIG: tl.constexpr):
    """Standard normals: Philox (key = seed, counter = offset), then Box-Muller. As tl.randn,
    but on the GPU with cos.approx: libdevice's cosf keeps a stack frame for its rarely
    taken large-argument path, and the angle here is always in [0, 2 pi). The interpreter
    has no libdevice, so it takes tl.cos (FAST_TRIG=False)."""
    r1, r2, _, _ = tl.randint4x(seed, offset)
    u1 = tl.maximum(1.0e-7, tl.random.uint_to_uniform_float(r1))
    angle = 6.283185307179586 * tl.random.uint_to_uniform_float(r2)
    if FAST_TRIG:
        c = libdevice.fast_cosf(angle)
    else:
        c = tl.cos(angle)
    return tl.sqrt(-2.0 * tl.log(u1)) * c


@triton.jit
def _load_noise(NOISE_ptr, SEED_ptr, b, cols, N, stride_zb, stride_zn, mask, HAS_NOISE: tl.constexpr,
                FAST_TRIG: tl.constexpr):  # fmt: skip
    if HAS_NOISE:
        z = tl.load(NOISE_ptr + b * stride_zb + cols * stride_zn, mask=mask).to(tl.float32)
    else:
        # Philox counter = the element's flat index (int64), key = this call's seed.
        z = _randn(tl.load(SEED_ptr), b * N + cols, FAST_TRIG)
    return z


@triton.jit
def _posterior_step_kernel(
    X_ptr, OUT_ptr, NOISE_ptr, SEED_ptr, T_ptr,
    SR_ptr, SRM1_ptr, COEF1_ptr, COEF2_ptr, LOGVAR_ptr, Y_ptr,
    N, blocks_per_row,
    stride_xb, stride_xn, stride_ob, stride_on, stride_zb, stride_zn, stride_t,
    PRED: tl.constexpr, CLIP: tl.constexpr, HAS_NOISE: tl.constexpr, FAST_TRIG: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = (pid // blocks_per_row).to(tl.int64)
    cols = (pid % blocks_per_row) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    # Per-sample coefficients, gathered once by this sample's timestep.
    t = tl.load(T_ptr + b * stride_t)
    sr = tl.load(SR_ptr + t)
    srm1 = tl.load(SRM1_ptr + t)
    c1 = tl.load(COEF1_ptr + t)
    c2 = tl.load(COEF2_ptr + t)
    std = tl.where(t > 0, tl.exp(0.5 * tl.load(LOGVAR_ptr + t)), 0.0)
    x = tl.load(X_ptr + b * stride_xb + cols * stride_xn, mask=mask).to(tl.float32)
    out = tl.load(OUT_ptr + b * stride_ob + cols * stride_on, mask=mask).to(tl.float32)
    # x_0 from the model output, clipped; posterior mean (eq. 7); noise where t > 0.
    x0 = _predict_x0(x, out, sr, srm1, PRED, CLIP)
    mean = c1 * x0 + c2 * x
    z = _load_noise(NOISE_ptr, SEED_ptr, b, cols, N, stride_zb, stride_zn, mask, HAS_NOISE, FAST_TRIG)
    tl.store(Y_ptr + b * N + cols, (mean + std * z).to(Y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ddim_step_kernel(
    X_ptr, OUT_ptr, NOISE_ptr, SEED_ptr, T_ptr, TPREV_ptr, AC_ptr, Y_ptr,
    eta, N, blocks_per_row,
    stride_xb, stride_xn, stride_ob, stride_on, stride_zb, stride_zn, stride_t, stride_tp,
    PRED: tl.constexpr, CLIP: tl.constexpr, STOCHASTIC: tl.constexpr, HAS_NOISE: tl.constexpr,
    FAST_TRIG: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = (pid // blocks_per_row).to(tl.int64)
    cols = (pid % blocks_per_row) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    t = tl.load(T_ptr + b * stride_t)
    t_prev = tl.load(TPREV_ptr + b * stride_tp)
    abar = tl.load(AC_ptr + t)
    abar_prev = tl.where(t_prev >= 0, tl.load(AC_ptr + tl.maximum(t_prev, 0)), 1.0)
    sr = 1.0 / tl.sqrt(abar)
    srm1 = tl.sqrt(1.0 / abar - 1.0)
    x = tl.load(X_ptr + b * stride_xb + cols * stride_xn, mask=mask).to(tl.float32)
    out = tl.load(OUT_ptr + b * stride_ob + cols * stride_on, mask=mask).to(tl.float32)
    # x_0 (clipped), then the eps it implies, then eq. 12.
    x0 = _predict_x0(x, out, sr, srm1, PRED, CLIP)
    eps = (sr * x - x0) / srm1
    sigma = eta * tl.sqrt((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev))
    y = tl.sqrt(abar_prev) * x0 + tl.sqrt(tl.maximum(1.0 - abar_prev - sigma * sigma, 0.0)) * eps
    if STOCHASTIC:
        z = _load_noise(NOISE_ptr, SEED_ptr, b, cols, N, stride_zb, stride_zn, mask, HAS_NOISE, FAST_TRIG)
        y += sigma * z
    tl.store(Y_ptr + b * N + cols, y.to(Y_ptr.dtype.element_ty), mask=mask)


def draw_seed(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """A Philox seed as a one-element int64 tensor on `device`, drawn without a host sync."""
    gen_device = generator.device if generator is not None else device
    seed = torch.randint(0, 2**62, (1,), generator=generator, device=gen_device, dtype=torch.int64)
    return seed.to(device)


def _launch_args(x_t, model_output, noise, generator):
    """(B, N) views of the inputs, the noise (or seed) pointers and strides, the grid."""
    x2, o2 = as_rows(x_t), as_rows(model_output)
    B, N = x2.shape
    if noise is not None:
        z2, seed = as_rows(noise), x2  # seed pointer unused
    else:
        z2, seed = x2, draw_seed(generator, x_t.device)  # noise pointer unused
    block = elementwise_block(N)
    blocks_per_row = triton.cdiv(N, block)
    strides = (x2.stride(0), x2.stride(1), o2.stride(0), o2.stride(1), z2.stride(0), z2.stride(1))
    return x2, o2, z2, seed, N, block, blocks_per_row, (B * blocks_per_row,), strides


def posterior_step_fwd(x_t, model_output, t, noise, buffers, prediction_type, clip_denoised, generator):
    y = torch.empty(x_t.shape, dtype=x_t.dtype, device=x_t.device)
    if y.numel() == 0:
        return y
    x2, o2, z2, seed, N, block, blocks_per_row, grid, strides = _launch_args(x_t, model_output, noise, generator)
    _posterior_step_kernel[grid](
        x2, o2, z2, seed, t, *buffers, y,
        N, blocks_per_row, *strides, t.stride(0),
        PRED=_PREDICTION[prediction_type], CLIP=bool(clip_denoised), HAS_NOISE=noise is not None,
        FAST_TRIG=not interpreter_on(), BLOCK=block, num_warps=4,
    )  # fmt: skip
    return y


def ddim_step_fwd(x_t, model_output, t, t_prev, noise, alphas_cumprod, eta, prediction_type, clip_denoised,
                  generator):  # fmt: skip
    y = torch.empty(x_t.shape, dtype=x_t.dtype, device=x_t.device)
    if y.numel() == 0:
        return y
    stochastic = eta > 0
    if not stochastic:
        noise = x_t  # never read (no noise term at eta = 0), and no seed drawn from the generator
    x2, o2, z2, seed, N, block, blocks_per_row, grid, strides = _launch_args(x_t, model_output, noise, generator)
    _ddim_step_kernel[grid](
        x2, o2, z2, seed, t, t_prev, alphas_cumprod, y,
        float(eta), N, blocks_per_row, *strides, t.stride(0), t_prev.stride(0),
        PRED=_PREDICTION[prediction_type], CLIP=bool(clip_denoised), STOCHASTIC=stochastic,
        HAS_NOISE=noise is not None, FAST_TRIG=not interpreter_on(), BLOCK=block, num_warps=4,
    )  # fmt: skip
    return y


def _wants_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in tensors)


def posterior_step(
    x_t,
    model_output,
    t,
    noise,
    sqrt_recip_alphas_cumprod,
    sqrt_recipm1_alphas_cumprod,
    posterior_mean_coef1,
    posterior_mean_coef2,
    posterior_log_variance,
    prediction_type="epsilon",
    clip_denoised=True,
    generator=None,
):
    """Fused twin of ddpm_fast.reference.posterior_step (same signature)."""
    buffers = (sqrt_recip_alphas_cumprod, sqrt_recipm1_alphas_cumprod, posterior_mean_coef1, posterior_mean_coef2,
               posterior_log_variance)  # fmt: skip
    if not use_triton(x_t.device) or _wants_grad(x_t, model_output):
        return reference.posterior_step(x_t, model_output, t, noise, *buffers, prediction_type, clip_denoised,
                                        generator)  # fmt: skip
    checks.check_posterior_step(x_t, model_output, t, noise, prediction_type, *buffers)
    buffers = tuple(b.float().contiguous() for b in buffers)
    return posterior_step_fwd(x_t, model_output, t, noise, buffers, prediction_type, clip_denoised, generator)


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
):
    """Fused twin of ddpm_fast.reference.ddim_step (same signature)."""
    if not use_triton(x_t.device) or _wants_grad(x_t, model_output):
        return reference.ddim_step(x_t, model_output, t, t_prev, noise, alphas_cumprod, eta, prediction_type,
                                   clip_denoised, generator)  # fmt: skip
    checks.check_ddim_step(x_t, model_output, t, t_prev, noise, alphas_cumprod, eta, prediction_type)
    return ddim_step_fwd(x_t, model_output, t, t_prev, noise, alphas_cumprod.float().contiguous(), eta,
                         prediction_type, clip_denoised, generator)  # fmt: skip
