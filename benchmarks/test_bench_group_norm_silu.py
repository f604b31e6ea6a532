"""GroupNorm+SiLU with the time-embedding add, forward and backward, at every GroupNorm shape of
the paper's U-Net (32x32 down to 4x4) at batch 128 (training) and 1 (sampling), float32 NCHW and
bfloat16 channels_last: fused against eager and torch.compile (Inductor fuses the apply and the
SiLU itself)."""

import pytest
import torch
from conftest import CUDA, DEVICE, DTYPE_IDS, IMPLS, op, skip_unless_runnable

from ddpm_fast.tools.aot import UNET_GROUP_NORMS

# (batch, channels, size, dtype, layout): every U-Net shape on a GPU; on a CPU two of them.
SHAPES = [(b, c, s) for c, s in UNET_GROUP_NORMS for b in (128, 1)] if CUDA else [(8, 128, 32), (1, 256, 8)]
CASES = [(b, c, s, torch.float32, "nchw") for b, c, s in SHAPES]
CASES += [(b, c, s, torch.bfloat16, "nhwc") for b, c, s in SHAPES if b > 1]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch, channels, size, dtype, layout", CASES,
                         ids=[f"{b}x{c}x{s}x{s}-{DTYPE_IDS[d]}-{m}" for b, c, s, d, m in CASES])  # fmt: skip
def test_group_norm_silu(measure, impl, batch, channels, size, dtype, layout):
    skip_unless_runnable(impl)
    if impl == "compile-max" and batch == 1 and (channels, size) != (128, 32):
        pytest.skip("max-autotune at batch 1 is timed at the 32x32 shape only (tuning every shape takes long)")
    shape = (batch, channels, size, size)
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    x = torch.randn(shape, device=DEVICE, dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
    w = torch.ones(channels, device=DEVICE, dtype=dtype, requires_grad=True)
    b = torch.zeros(channels, device=DEVICE, dtype=dtype, requires_grad=True)
    add = torch.randn(batch, channels, device=DEVICE, dtype=dtype, requires_grad=True)
    dy = torch.randn_like(x)
    group_norm_silu = op(impl, "group_norm_silu")

    def fn():
        y = group_norm_silu(x, 32, w, b, 1e-6, add=add)
        y.backward(dy)
        return y

    n = x.numel() * x.element_size()  # read x; write y; read x, dy; write dx
    measure(f"group_norm_silu+add fwd+bwd {shape} {DTYPE_IDS[dtype]} {layout}", fn, bytes=5 * n)
