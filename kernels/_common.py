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


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """x as a (B, N) view, N = all but the batch dim, whose rows the kernels walk with
    (stride_b, stride_n). A view when the trailing dims collapse (contiguous, sliced along
    the batch, expanded); a contiguous copy otherwise (e.g. channels_last)."""
    return x.reshape(x.shape[0], -1)


def elementwise_block(n: int) -> int:
    """Block size for an elementwise kernel over rows of n elements."""
    import triton

    return max(16, min(1024, triton.next_power_of_2(n)))
