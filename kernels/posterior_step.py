"""Fused reverse step: one ancestral DDPM step in a single kernel (the DDIM step, which shares
its x_0 prediction, noise and plans: kernels/ddim_step.py; DPM-Solver++: kernels/dpm_solver.py).

DDPM (Ho et al., Algorithm 2 with eq. 7), per element of sample b with timestep t = t_b:
    x_0  = sr_t x_t - srm1_t eps            (epsilon;  sr = 1/sqrt(abar), srm1 = sqrt(1/abar - 1))
         = out                               (sample)
         = (x_t - srm1_t v) / sr_t           (v_prediction: sqrt(abar) x_t - sqrt(1 - abar) v)
    x_0  = clip(x_0, -1, 1)                  (when clip_denoised)
    x_{t-1} = coef1_t x_0 + coef2_t x_t + [t > 0] exp(logvar_t / 2) z

Contract
- x_t, model_output, noise: any shape (B, ...), float32, float16 or bfloat16, any strides;
  t (and t_prev): integer (B,), checked once at the call (one host sync) unless check_t=False,
  and clamped into the schedule by every gather either way (no value reads out of bounds);
  schedule buffers float32 (T,). Output: x_t's dtype and layout (channels_last stays so). Arithmetic in float32, one
  rounding at the store.
- z: the `noise` tensor when given, else drawn with torch.randn from `generator` (torch's
  default when None) in the same order as the eager twin, so fused and eager sampling give the
  same images for the same generator. noise_source="philox" instead draws z inside the kernel
  (Philox, key = a seed drawn on the device from the generator, counter = b * N + n): the noise
  tensor is never written or read, the seed never goes to the host, each call gets a fresh seed;
  reproducible with itself only (not with torch's stream).
- Sampling ops: no backward kernel. Where a gradient is required, the step runs the eager
  twin, whose autograd gives the correct gradient.
- A PyTorch custom op (ddpm_fast::posterior_step, with a fake kernel):
  torch.compile traces through them, CUDA graphs capture them.
- Tested under TRITON_INTERPRET=1 against ddpm_fast.reference.posterior_step for
  every prediction type, both variances and the learned one, dtypes, odd and non-contiguous
  inputs; compiled for sm_80/sm_90.

Traffic per element (float32, bytes). DDPM step, fused: reads x_t, the model output and z,
writes x_{t-1}: 16 (12 with in-kernel noise, where the eager path also pays 4 to write z).
The eager twin, epsilon with clipping, dispatches 19 kernels: 9 over the images (two
multiplies and a subtraction for x_0, the clamp, two multiplies and an add for the mean, a
multiply and an add for the noise) and 10 tiny ones on the per-sample coefficients: 84
(`python -m ddpm_fast.tools.traffic` counts them).
"""

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ddpm_fast import checks, reference
from ddpm_fast.kernels import _common
from ddpm_fast.kernels._common import (
    Plans,
    _grad_enabled,
    as_rows,
    cdiv,
    direct_launch,
    elementwise_block,
    elementwise_out,
    interpreter_on,
    meta_key,
    use_triton,
)
from ddpm_fast.kernels._elementwise import clamped_index, sample_block

_PREDICTION = {"epsilon": 0, "sample": 1, "v_prediction": 2}


@triton.jit
def _clip(x):
    """x clamped to [-1, 1], NaN kept as torch.clamp keeps it (tl.minimum / tl.maximum return
    the other operand for a NaN: a diverged model's NaN would come out as +-1)."""
    return tl.where(x < -1.0, -1.0, tl.where(x > 1.0, 1.0, x))


@triton.jit
def _predict_x0(x, out, sr, srm1, PRED: tl.constexpr, CLIP: tl.constexpr):
    if PRED == 0:
        x0 = sr * x - srm1 * out
    elif PRED == 1:
        x0 = out
    else:
        x0 = (x - srm1 * out) / sr
    if CLIP:
        x0 = _clip(x0)
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
    SR_ptr, SRM1_ptr, COEF1_ptr, COEF2_ptr, LOGVAR_ptr, Y_ptr, VAR_ptr, MAXLOG_ptr,
    N, blocks_per_row, T,
    stride_xb, stride_xn, stride_ob, stride_on, stride_zb, stride_zn, stride_vb, stride_vn, stride_t,
    PRED: tl.constexpr, CLIP: tl.constexpr, HAS_NOISE: tl.constexpr, FAST_TRIG: tl.constexpr,
    LEARNED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    b, cols, mask = sample_block(N, blocks_per_row, BLOCK)
    # Per-sample coefficients, gathered once by this sample's timestep (clamped into [0, T)).
    t = clamped_index(T_ptr, b, stride_t, T)
    sr = tl.load(SR_ptr + t)
    srm1 = tl.load(SRM1_ptr + t)
    c1 = tl.load(COEF1_ptr + t)
    c2 = tl.load(COEF2_ptr + t)
    log_var = tl.load(LOGVAR_ptr + t)
    if LEARNED:  # the model's v in [-1, 1] interpolates the log variance from log beta~ to log beta
        v = tl.load(VAR_ptr + b * stride_vb + cols * stride_vn, mask=mask).to(tl.float32)
        frac = (v + 1.0) * 0.5
        log_var = frac * tl.load(MAXLOG_ptr + t) + (1.0 - frac) * log_var
    std = tl.where(t > 0, tl.exp(0.5 * log_var), 0.0)
    x = tl.load(X_ptr + b * stride_xb + cols * stride_xn, mask=mask).to(tl.float32)
    out = tl.load(OUT_ptr + b * stride_ob + cols * stride_on, mask=mask).to(tl.float32)
    # x_0 from the model output, clipped; posterior mean (eq. 7); noise where t > 0.
    x0 = _predict_x0(x, out, sr, srm1, PRED, CLIP)
    mean = c1 * x0 + c2 * x
    z = _load_noise(NOISE_ptr, SEED_ptr, b, cols, N, stride_zb, stride_zn, mask, HAS_NOISE, FAST_TRIG)
    tl.store(Y_ptr + b * N + cols, (mean + std * z).to(Y_ptr.dtype.element_ty), mask=mask)


def draw_seed(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """A Philox seed as a one-element int64 tensor on `device`, drawn without a host sync."""
    gen_device = generator.device if generator is not None else device
    seed = torch.randint(0, 2**62, (1,), generator=generator, device=gen_device, dtype=torch.int64)
    return seed.to(device)


class _StepPlan:
    """One reverse step's host work, from x_t, the model output and the noise's metadata (see
    _common.Plans): the output's layout, the (B, N) strides each tensor is walked with (its own
    memory where its dims collapse so; a copy per call where they do not), the block and grid."""

    def __init__(self, x_t, model_output, noise, extra=None):
        y, self.order = elementwise_out(x_t)
        self.y_size, self.y_stride = tuple(y.shape), y.stride()
        self.device = x_t.device
        # empty_like(x_t) gives this layout wherever x_t is dense (the usual case): a cheaper call
        self.like = torch.empty_like(x_t, device="meta").stride() == self.y_stride
        self.empty = y.numel() == 0
        if self.empty:
            return
        self.copy, strides = [], []
        for x in (x_t, model_output, noise if noise is not None else x_t, extra if extra is not None else x_t):
            rows = as_rows(x, self.order)
            self.copy.append(rows.untyped_storage().data_ptr() != x.untyped_storage().data_ptr())
            strides += rows.stride()
        B, N = as_rows(x_t, self.order).shape
        self.N, self.block = N, elementwise_block(N)
        self.blocks_per_row = cdiv(N, self.block)
        self.grid = (B * self.blocks_per_row,)
        self.ints = (N, self.blocks_per_row)
        self.all_strides = tuple(strides)  # x_t, out, noise, extra: (stride_b, stride_n) each
        self.strides = self.all_strides[:6]  # the three a step without an extra tensor reads
        self.copies = any(self.copy)

    def rows(self, x_t, model_output, noise, extra=None):
        """The tensors as the kernel reads them: themselves, or (B, N) copies (called where
        `copies`)."""
        out = []
        for x, copy in zip((x_t, model_output, noise, extra), self.copy):
            out.append(as_rows(x, self.order) if copy and x is not None else x)
        return out


_PLANS = Plans()


def _plan(x_t, model_output, noise, extra=None) -> _StepPlan:
    key = (meta_key(x_t), meta_key(model_output), meta_key(noise), meta_key(extra))
    return _PLANS.get(key, lambda: _StepPlan(x_t, model_output, noise, extra))


def posterior_step_fwd(x_t, model_output, t, noise, seed, buffers, prediction_type, clip_denoised, plan=None,
                       model_variance=None, max_log_variance=None, tail=None):  # fmt: skip
    """x_{t-1}; `plan` and `tail` (the arguments after the tensors: _tail): the call's, where the
    caller has them."""
    plan = plan or _plan(x_t, model_output, noise, model_variance)
    if plan.empty:
        return x_t.new_empty_strided(plan.y_size, plan.y_stride)
    y = torch.empty_like(x_t) if plan.like else x_t.new_empty_strided(plan.y_size, plan.y_stride)
    if plan.copies:
        x_t, model_output, noise, model_variance = plan.rows(x_t, model_output, noise, model_variance)
    learned = model_variance is not None
    if tail is None:
        tail = _tail(prediction_type, clip_denoised, learned, buffers[0].shape[0], t.stride(0), plan, noise is not None)
    with _common.launch_device(plan.device):  # the tensors' GPU current (multi-GPU)
        _posterior_step_kernel[plan.grid](
            x_t, model_output, noise if noise is not None else x_t, seed if seed is not None else x_t, t, *buffers, y,
            model_variance if learned else x_t, max_log_variance if learned else buffers[4], *tail,
        )  # fmt: skip
    return y


def _tail(prediction_type, clip_denoised, learned, T, stride_t, plan, has_noise) -> tuple:
    """The kernel's arguments after its tensors: sizes, strides, then the constexprs, passed by
    position (a keyword dict costs the host ~0.3 us per launch; num_warps is Triton's default, 4)."""
    return (*plan.ints, T, *plan.all_strides, stride_t, _PREDICTION[prediction_type], bool(clip_denoised), has_noise,
            not interpreter_on(), learned, plan.block)  # fmt: skip


# -- the custom op: its path and fake (meta) kernel -----------------------------------------------


def _eager_noise(x_t, noise, seed):
    """The noise the eager twin adds: the given tensor, or (the in-kernel Philox stream asked for
    where Triton does not run) torch's normals seeded from the seed: a host sync, fallback only."""
    if noise is not None or seed is None:
        return noise
    generator = torch.Generator(x_t.device).manual_seed(int(seed.item()))
    return torch.randn(x_t.shape, generator=generator, device=x_t.device)


@torch.library.custom_op("ddpm_fast::posterior_step", mutates_args=())
def posterior_step_op(
    x_t: torch.Tensor, model_output: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None,
    seed: torch.Tensor | None, sqrt_recip_alphas_cumprod: torch.Tensor, sqrt_recipm1_alphas_cumprod: torch.Tensor,
    posterior_mean_coef1: torch.Tensor, posterior_mean_coef2: torch.Tensor, posterior_log_variance: torch.Tensor,
    prediction_type: str, clip_denoised: bool, model_variance: torch.Tensor | None = None,
    max_log_variance: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """One DDPM step; z from `noise`, or from Philox keyed by `seed` (one of the two is given);
    the learned-range variance where model_variance and max_log_variance are given."""
    buffers = (sqrt_recip_alphas_cumprod, sqrt_recipm1_alphas_cumprod, posterior_mean_coef1, posterior_mean_coef2,
               posterior_log_variance)  # fmt: skip
    if use_triton(x_t.device):
        return posterior_step_fwd(x_t, model_output, t, noise, seed, buffers, prediction_type, clip_denoised,
                                  model_variance=model_variance, max_log_variance=max_log_variance)  # fmt: skip
    z = _eager_noise(x_t, noise, seed)
    out = reference.posterior_step(x_t, model_output, t, z, *buffers, prediction_type, clip_denoised, check_t=False,
                                   model_variance=model_variance, max_log_variance=max_log_variance)  # fmt: skip
    return elementwise_out(x_t)[0].copy_(out)


@posterior_step_op.register_fake
def _(x_t, model_output, t, noise, seed, *buffers_and_options):
    return elementwise_out(x_t)[0]


# -- the functional entry points ----------------------------------------------------------------------


def _requires_grad(*tensors) -> bool:
    """Whether any of these tensors requires a gradient (None for an absent one): with grad mode
    on (_grad_enabled, read first by the caller: the common no-grad call costs no frame), autograd
    wants one from the call."""
    return any(x is not None and x.requires_grad for x in tensors)


def _noise_or_seed(x_t, noise, generator, noise_source):
    """(noise, seed): the given noise; else torch's normals from the generator (the default, the
    eager twin's stream) or, for noise_source="philox" where the kernel runs, a seed for it."""
    if noise is not None:
        return noise, None
    if noise_source == "philox" and use_triton(x_t.device):
        if isinstance(generator, (list, tuple)):
            raise ValueError("noise_source='philox' takes one generator, not a list of per-image ones")
        return None, draw_seed(generator, x_t.device)
    return reference.draw_noise(x_t, None, generator), None


class _Call:
    """A public call's checked metadata (see _common.Plans): the launch plan, the launch's other
    arguments and the schedule buffers. The key names the first buffer by identity (the caller
    checks that the others are the very ones held), so the call holds them (an id cannot be reused
    while its entry lives); buffers the kernel reads as they are
    (float32, contiguous: the DDPM's own) are passed as they are, others converted per call, so
    an in-place change to either is always seen. `tail(plan, has_noise)` gives the arguments
    after the tensors (the kernel's _tail)."""

    def __init__(self, x_t, model_output, noise, buffers, tail, extra=None):
        self.plan = _plan(x_t, model_output, noise, extra)
        self.held = buffers
        ready = all(b.dtype == torch.float32 and b.is_contiguous() for b in buffers)
        self.ready = buffers if ready else None
        self.tail = tail
        self.launches = [None, None]  # (plan, tail) with the key's noise (given or none), with a drawn one

    def buffers(self):
        return self.ready if self.ready is not None else tuple(b.float().contiguous() for b in self.held)

    def launch_for(self, drawn, x_t, model_output, noise, extra=None) -> tuple:
        """(plan, tail) for this call's noise: the key's (given, or none at all: Philox), or, where
        `drawn`, the drawn one's (torch.randn of x_t's shape, always laid out alike). Built once
        into launches[drawn], which a hot caller reads itself, calling this on None only."""
        plan = _plan(x_t, model_output, noise, extra) if drawn else self.plan
        launch = self.launches[drawn] = plan, self.tail(plan, noise is not None)
        return launch


_CALLS = Plans()


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
    noise_source="torch",
    check_t=True,
    model_variance=None,
    max_log_variance=None,
):
    """Fused twin of ddpm_fast.reference.posterior_step (same signature)."""
    if _grad_enabled() and _requires_grad(x_t, model_output, model_variance):
        return reference.posterior_step(x_t, model_output, t, noise, sqrt_recip_alphas_cumprod,
                                        sqrt_recipm1_alphas_cumprod, posterior_mean_coef1, posterior_mean_coef2,
                                        posterior_log_variance, prediction_type, clip_denoised, generator,
                                        noise_source, check_t, model_variance=model_variance,
                                        max_log_variance=max_log_variance)  # fmt: skip
    # The key names the schedule by its first buffer's identity, and the call (which holds every
    # buffer, so no id is reused while it lives) serves only where the others are the very ones
    # passed too: an `is` each costs less than an id() each in the key.
    # (meta_key written out for the tensors always given: a call per tensor costs ~2% of the call)
    key = (x_t.shape, x_t.stride(), x_t.dtype, x_t.device, model_output.shape, model_output.stride(),
           model_output.dtype, model_output.device, t.shape, t.stride(), t.dtype, t.device, meta_key(noise),
           id(sqrt_recip_alphas_cumprod), prediction_type, clip_denoised, noise_source,
           meta_key(model_variance))  # fmt: skip
    call = _CALLS.entries.get(key)
    held = call.held if call is not None else None
    if held is None or not (held[1] is sqrt_recipm1_alphas_cumprod and held[2] is posterior_mean_coef1
                            and held[3] is posterior_mean_coef2 and held[4] is posterior_log_variance
                            and (max_log_variance is None if model_variance is None
                                 else held[5] is max_log_variance)):  # fmt: skip
        # a miss: the checks, and a call for these buffers (in the entry's place)
        buffers = (sqrt_recip_alphas_cumprod, sqrt_recipm1_alphas_cumprod, posterior_mean_coef1,
                   posterior_mean_coef2, posterior_log_variance)  # fmt: skip
        checks.check_posterior_step(x_t, model_output, t, noise, prediction_type, *buffers, check_t=False)
        checks.check_learned_variance(x_t, model_variance, max_log_variance, posterior_log_variance)
        checks.check_noise_source(noise_source)
        held = buffers if max_log_variance is None else (*buffers, max_log_variance)
        tail = functools.partial(_tail, prediction_type, clip_denoised, model_variance is not None,
                                 posterior_log_variance.shape[0], t.stride(0))  # fmt: skip
        call = _CALLS.add(key, _Call(x_t, model_output, noise, held, tail, model_variance))
    if check_t:  # the value check: one host sync
        checks.check_timesteps("t", t, x_t.shape[0], sqrt_recip_alphas_cumprod.shape[0], x_t.device)
    given = noise
    seed = None
    if noise is None:
        noise, seed = _noise_or_seed(x_t, noise, generator, noise_source)
    buffers = call.ready if call.ready is not None else call.buffers()
    if model_variance is not None:
        buffers, max_log_variance = buffers[:5], buffers[5]
    if direct_launch(x_t, model_output, t, noise, model_variance):
        drawn = given is None and noise is not None
        plan, tail = call.launches[drawn] or call.launch_for(drawn, x_t, model_output, noise, model_variance)
        return posterior_step_fwd(x_t, model_output, t, noise, seed, buffers, prediction_type, clip_denoised, plan,
                                  model_variance, max_log_variance, tail)  # fmt: skip
    return posterior_step_op(x_t, model_output, t, noise, seed, *buffers, prediction_type, bool(clip_denoised),
                             model_variance=model_variance, max_log_variance=max_log_variance)  # fmt: skip
