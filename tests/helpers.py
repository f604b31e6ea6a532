"""Shared by the kernel tests: per-dtype tolerances and ways to make non-contiguous inputs."""

import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Fused and eager both compute in float32 and round once to the output dtype, so a few
# units in the last place of the output dtype separate them.
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}

LAYOUTS = ["contiguous", "strided", "channels_last", "batch_slice", "expanded"]


def make(shape, dtype, layout="contiguous", scale=1.0):
    """A tensor of `shape` and `dtype` with the given memory layout (values random)."""
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
