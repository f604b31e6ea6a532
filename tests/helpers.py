"""Shared by the kernel tests: the device they run on, per-dtype tolerances, the float64 eager
twin, and ways to make non-contiguous inputs."""

import os

import torch

from ddpm_fast import checks
from ddpm_fast.tools.selfcheck import TOLERANCES

# Set by conftest.py from DDPM_FAST_TEST_DEVICE: "cuda" (compiled kernels) or "cpu" (interpreter).
DEVICE = torch.device(os.environ.get("DDPM_FAST_TEST_DEVICE", "cpu"))
INTERPRETED = DEVICE.type == "cpu"

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# The tolerance table `ddpm-fast check` uses too: fused computes in float32 and rounds once to
# the output dtype, which against the float64 twin leaves half a unit in the last place of the
# output dtype plus float32's own rounding.
TOL = TOLERANCES

LAYOUTS = ["contiguous", "strided", "channels_last", "batch_slice", "expanded"]


def generator(seed: int) -> torch.Generator:
    """A seeded generator on the tests' device (a CUDA tensor draws from a CUDA generator)."""
    return torch.Generator(DEVICE).manual_seed(seed)


# Lets the eager twins in ddpm_fast.reference take float64 (users' entry points refuse it).
float64_twin = checks.allow_float64


def to64(x):
    """A float tensor as a float64 copy (same layout), anything else as is."""
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.detach().double()
    return x


def twin64(op, *args, **kwargs):
    """op (an eager twin) run on float64 copies of its float tensor arguments."""
    with float64_twin():
        return op(*(to64(a) for a in args), **{k: to64(v) for k, v in kwargs.items()})


def assert_close64(actual, expected64, dtype, msg=None):
    """actual (in `dtype`) against the float64 reference, at dtype's tolerance."""
    assert expected64.dtype == torch.float64
    torch.testing.assert_close(actual.double(), expected64, **TOL[dtype], msg=msg)


def make(shape, dtype, layout="contiguous", scale=1.0):
    """A tensor of `shape` and `dtype` with the given memory layout (values random), on the
    current default device (DEVICE inside an on_device test)."""
    shape = tuple(shape)
    if layout == "contiguous":
        return (torch.randn(shape) * scale).to(dtype)
    if layout == "strided":  # every other element of the last dim
        return (torch.randn(*shape[:-1], 2 * shape[-1]) * scale).to(dtype)[..., ::2]
    if layout == "channels_last":
        return (torch.randn(shape) * scale).to(dtype).contiguous(memory_format=torch.channels_last)
    if layout == "batch_slice":  # every other sample of a larger batch
        return (torch.randn(2 * shape[0], *shape[1:]) * scale).to(dtype)[::2]
    if layout == "expanded":  # one sample broadcast over the batch (stride 0)
        return (torch.randn(1, *shape[1:]) * scale).to(dtype).expand(shape)
    raise ValueError(layout)


def check_layout(x, layout):
    """The layout really is what the test says (a test that silently got a contiguous
    tensor would prove nothing)."""
    if layout == "contiguous":
        assert x.is_contiguous()
    else:
        assert not x.is_contiguous(), layout
