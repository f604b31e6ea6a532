"""Argument checks shared by the eager ops, the fused ops and the models.

Each raises TypeError (wrong kind of thing) or ValueError (wrong value) with the
argument's name first, so a user sees at once which input is at fault.
"""

import contextlib
import math

import torch

from ddpm_fast.schedule import POSTERIOR_STEP_BUFFERS

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@contextlib.contextmanager
def allow_float64():
    """Inside, the checks take float64 too: how the tests and `ddpm-fast check` run the eager
    twins in float64 (they then compute in float64), the reference the kernels are held to.
    Users' calls take float32, float16 and bfloat16."""
    global FLOAT_DTYPES
    saved = FLOAT_DTYPES
    FLOAT_DTYPES = saved + (torch.float64,)
    try:
        yield
    finally:
        FLOAT_DTYPES = saved


def check_float(name: str, x, ndim: int | None = None, min_ndim: int | None = None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if min_ndim is not None and x.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimensions, got shape {tuple(x.shape)}")


def check_like(name: str, x, ref_name: str, ref: torch.Tensor, dtype: bool = True) -> None:
    """x is a float tensor with ref's shape and device (and dtype unless dtype=False)."""
    check_float(name, x)
    if x.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(x.shape)}")
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")
    if dtype and x.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but {ref_name} has {ref.dtype}")


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def check_timesteps(name: str, t, batch: int, num_timesteps: int, device: torch.device, low: int = 0,
                    values: bool = True) -> None:  # fmt: skip
    """t is an integer tensor of shape (batch,) on `device` with values in [low, num_timesteps).

    The metadata checks are free. The value check reads t: one host sync (on a GPU, the CPU
    waits for the GPU to get there), so it runs only where `values` is True, and never inside
    torch.compile (compiled code relies on the kernels' clamped gathers)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of timesteps, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if t.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) (one timestep per sample), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the images are on {device}")
    if values and batch and not _compiling():
        lo, hi = (v.long() for v in torch.aminmax(t))  # compared in int64: 1000 does not fit an int8 or uint8
        if bool((lo < low) | (hi >= num_timesteps)):  # the one sync; the message below only on failure
            raise ValueError(f"{name} must lie in [{low}, {num_timesteps}), got values from {int(lo)} to {int(hi)}")


def check_schedule(name: str, buf, device: torch.device) -> None:
    if not isinstance(buf, torch.Tensor) or buf.ndim != 1:
        raise TypeError(f"{name} must be a 1-D schedule tensor")
    if buf.device != device:
        raise ValueError(f"{name} is on {buf.device} but the images are on {device}")


PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def check_prediction_type(prediction_type) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def check_q_sample(x0, t, noise, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, check_t: bool = True) -> None:
    check_float("x0", x0, min_ndim=1)
    check_like("noise", noise, "x0", x0, dtype=False)
    check_schedule("sqrt_alphas_cumprod", sqrt_alphas_cumprod, x0.device)
    check_schedule("sqrt_one_minus_alphas_cumprod", sqrt_one_minus_alphas_cumprod, x0.device)
    if sqrt_one_minus_alphas_cumprod.shape != sqrt_alphas_cumprod.shape:
        raise ValueError(
            f"sqrt_one_minus_alphas_cumprod has {sqrt_one_minus_alphas_cumprod.shape[0]} timesteps but "
            f"sqrt_alphas_cumprod has {sqrt_alphas_cumprod.shape[0]}"
        )
    check_timesteps("t", t, x0.shape[0], sqrt_alphas_cumprod.shape[0], x0.device, values=check_t)


NOISE_SOURCES = ("torch", "philox")


def check_noise_source(noise_source) -> None:
    if noise_source not in NOISE_SOURCES:
        raise ValueError(f"noise_source must be one of {NOISE_SOURCES}, got {noise_source!r}")


def check_posterior_step(x_t, model_output, t, noise, prediction_type, *buffers, check_t: bool = True) -> None:
    check_float("x_t", x_t, min_ndim=1)
    check_like("model_output", model_output, "x_t", x_t, dtype=False)
    if noise is not None:
        check_like("noise", noise, "x_t", x_t, dtype=False)
    check_prediction_type(prediction_type)
    names = POSTERIOR_STEP_BUFFERS  # buffers come in this order
    for name, buf in zip(names, buffers):
        check_schedule(name, buf, x_t.device)
        if buf.shape != buffers[0].shape:
            raise ValueError(f"{name} has {buf.shape[0]} timesteps but {names[0]} has {buffers[0].shape[0]}")
    check_timesteps("t", t, x_t.shape[0], buffers[0].shape[0], x_t.device, values=check_t)


def check_learned_variance(x_t, model_variance, max_log_variance, posterior_log_variance) -> None:
    """A learned-range step's two extra arguments: both or neither, v like x_t, log beta like the schedule."""
    if (model_variance is None) != (max_log_variance is None):
        raise ValueError("model_variance and max_log_variance go together (a learned-range step needs both)")
    if model_variance is None:
        return
    check_like("model_variance", model_variance, "x_t", x_t, dtype=False)
    check_schedule("max_log_variance", max_log_variance, x_t.device)
    if max_log_variance.shape != posterior_log_variance.shape:
        raise ValueError(f"max_log_variance has {max_log_variance.shape[0]} timesteps but posterior_log_variance "
                         f"has {posterior_log_variance.shape[0]}")  # fmt: skip


def check_ddim_step(x_t, model_output, t, t_prev, noise, alphas_cumprod, eta, prediction_type,
                    check_t: bool = True) -> None:  # fmt: skip
    check_float("x_t", x_t, min_ndim=1)
    check_like("model_output", model_output, "x_t", x_t, dtype=False)
    if noise is not None:
        check_like("noise", noise, "x_t", x_t, dtype=False)
    check_prediction_type(prediction_type)
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")
    check_schedule("alphas_cumprod", alphas_cumprod, x_t.device)
    num_timesteps, batch = alphas_cumprod.shape[0], x_t.shape[0]
    check_timesteps("t", t, batch, num_timesteps, x_t.device, values=False)
    check_timesteps("t_prev", t_prev, batch, num_timesteps, x_t.device, low=-1, values=False)
    if check_t and batch and not _compiling():
        lo, hi = torch.aminmax(t)
        lo_p, hi_p = torch.aminmax(t_prev)
        if bool((lo < 0) | (hi >= num_timesteps) | (lo_p < -1) | (hi_p >= num_timesteps) | (t_prev >= t).any()):
            # one sync on the way in; the details only when something is wrong
            check_timesteps("t", t, batch, num_timesteps, x_t.device)
            check_timesteps("t_prev", t_prev, batch, num_timesteps, x_t.device, low=-1)
            raise ValueError("t_prev must be smaller than t for every sample")


def check_dpm_solver_step(x_t, model_output, x0_prev, step, coefficients, check_step: bool = True) -> None:
    check_float("x_t", x_t, min_ndim=1)
    check_like("model_output", model_output, "x_t", x_t, dtype=False)
    if x0_prev is not None:
        check_like("x0_prev", x0_prev, "x_t", x_t, dtype=False)
    if not isinstance(coefficients, torch.Tensor) or coefficients.ndim != 2 or coefficients.shape[1] != 5:
        shape = tuple(coefficients.shape) if isinstance(coefficients, torch.Tensor) else type(coefficients).__name__
        raise ValueError(f"coefficients must be a (steps, 5) tensor of (p, q, a, b, c) per step, got {shape}")
    check_float("coefficients", coefficients, ndim=2)
    if coefficients.device != x_t.device:
        raise ValueError(f"coefficients are on {coefficients.device} but x_t is on {x_t.device}")
    check_timesteps("step", step, x_t.shape[0], coefficients.shape[0], x_t.device, values=check_step)


def check_group_norm(x, num_groups, weight, bias, add, eps=None) -> None:
    check_float("x", x, min_ndim=3)
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf):
        raise ValueError(f"eps must be a positive finite number (it keeps 1/sqrt(var + eps) finite), got {eps!r}")
    channels = x.shape[1]
    if not isinstance(num_groups, int) or num_groups < 1 or channels % num_groups:
        raise ValueError(f"num_groups must be a positive int dividing the {channels} channels of x, got {num_groups!r}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        check_float(name, p, ndim=1)
        if p.shape[0] != channels:
            raise ValueError(f"{name} must have {channels} elements (the channels of x), got {p.shape[0]}")
        if p.device != x.device:
            raise ValueError(f"{name} is on {p.device} but x is on {x.device}")
    if add is not None:
        check_float("add", add, ndim=2)
        if tuple(add.shape) != tuple(x.shape[:2]):
            raise ValueError(f"add must have shape {tuple(x.shape[:2])} (batch, channels), got {tuple(add.shape)}")
        if add.device != x.device:
            raise ValueError(f"add is on {add.device} but x is on {x.device}")


def check_attention(q, k, v) -> None:
    check_float("q", q, ndim=4)
    check_float("k", k, ndim=4)
    check_float("v", v, ndim=4)
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must have shape {tuple(q.shape[:3])} + (d,), got {tuple(v.shape)}")
    for name, x in (("k", k), ("v", v)):
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
        if x.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but q has {q.dtype}")
