"""What every fused op shares: the path switch and small launcher helpers.

The path switch (DESIGN.md): the environment variable DDPM_FAST_KERNELS, or
`set_kernel_mode`, picks for every fused op
  auto    the Triton kernel on CUDA tensors, and on CPU tensors when Triton's interpreter
          is on (TRITON_INTERPRET=1, set before triton is imported); else the eager twin;
  eager   always the eager twin in ddpm_fast.reference;
  triton  always the Triton kernel (on a CPU without the interpreter the launch fails).
"""

import contextlib
import os

import torch

KERNEL_MODES = ("auto", "eager", "triton")
_ENV = "DDPM_FAST_KERNELS"

try:  # triton ships wheels for Linux only; elsewhere every op runs its eager twin
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False


def get_kernel_mode() -> str:
    mode = os.environ.get(_ENV, "auto").strip().lower() or "auto"
    if mode not in KERNEL_MODES:
        raise ValueError(f"{_ENV} must be one of {KERNEL_MODES}, got {mode!r}")
    return mode


def set_kernel_mode(mode: str) -> None:
    """Pick the path of every fused op: 'auto', 'eager' or 'triton' (sets DDPM_FAST_KERNELS)."""
    if mode not in KERNEL_MODES:
        raise ValueError(f"mode must be one of {KERNEL_MODES}, got {mode!r}")
    os.environ[_ENV] = mode


@contextlib.contextmanager
def kernel_mode(mode: str):
    """`with kernel_mode("eager"): ...` runs the block on one path, then restores the old one."""
    old = os.environ.get(_ENV)
    set_kernel_mode(mode)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(_ENV, None)
        else:
            os.environ[_ENV] = old


# Triton decides at import (when @triton.jit runs) whether kernels are interpreted, so
# the switch reads TRITON_INTERPRET once, at the same moment.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreter_on() -> bool:
    return INTERPRET


def use_triton(device: torch.device) -> bool:
    """Whether an op on tensors of `device` launches its Triton kernel."""
    mode = get_kernel_mode()
    if mode == "eager":
        return False
    if not HAS_TRITON:
        if mode == "triton":
            raise RuntimeError(f"{_ENV}=triton but triton is not installed")
        return False
    return mode == "triton" or device.type == "cuda" or (device.type == "cpu" and interpreter_on())


def row_order(x: torch.Tensor) -> list[int]:
    """The order in which an elementwise kernel walks x's dims: the batch first, the others as
    they lie in memory (largest stride first) when x is dense with the batch outermost, so that a
    channels_last tensor is read in its own order without a copy; else the logical order."""
    dims = list(range(1, x.ndim))
    ordered = [0] + sorted(dims, key=lambda d: -x.stride(d))
    if x.ndim > 1 and x.stride(0) >= max(x.stride(d) * x.shape[d] for d in dims) and _dense(x.permute(ordered)):
        return ordered
    return list(range(x.ndim))


def _dense(x: torch.Tensor) -> bool:
    """x's elements fill one block of memory in row-major order (trailing dims collapse)."""
    expected = 1
    for size, stride in reversed(list(zip(x.shape[1:], x.stride()[1:]))):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def as_rows(x: torch.Tensor, order: list[int] | None = None) -> torch.Tensor:
    """x as a (B, N) view, N = all but the batch dim in `order` (row_order of the op's main input),
    whose rows the kernels walk with (stride_b, stride_n). A view when those dims collapse
    (contiguous, channels_last, sliced along the batch, expanded); a copy otherwise."""
    if order is not None and order != list(range(x.ndim)):
        x = x.permute(order)
    return x.reshape(x.shape[0], -1)


def elementwise_out(x: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, list[int]]:
    """The output of an elementwise op led by x, in x's layout where row_order keeps it (so a
    channels_last input gives a channels_last output), and the dim order to walk both in."""
    order = row_order(x)
    dtype = dtype or x.dtype
    if order == list(range(x.ndim)):
        return torch.empty(x.shape, dtype=dtype, device=x.device), order
    inverse = sorted(range(x.ndim), key=lambda d: order[d])
    out = torch.empty([x.shape[d] for d in order], dtype=dtype, device=x.device).permute(inverse)
    return out, order


def elementwise_block(n: int) -> int:
    """Block size for an elementwise kernel over rows of n elements."""
    import triton

    return max(16, min(1024, triton.next_power_of_2(n)))
