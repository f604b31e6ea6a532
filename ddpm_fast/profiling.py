"""NVTX ranges for Nsight Systems: every phase of training and sampling is named.

    nsys profile -t cuda,nvtx -o ddpm python -m ddpm_fast.cli ...

`nvtx_range(name)` pushes a range on the CUDA NVTX stack when CUDA is available and costs
nothing otherwise (no profiler attached: NVTX calls are no-ops in the driver).
"""

import contextlib

import torch


@contextlib.contextmanager
def nvtx_range(name: str):
    if not torch.cuda.is_available():
        yield
        return
    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()
