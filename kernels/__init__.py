"""ddpm_fast.kernels: the fused Triton ops, each with the signature of its eager twin in
ddpm_fast.reference. Imported as ddpm_fast.kernels, never as a bare `kernels`.

Which path an op takes is set by DDPM_FAST_KERNELS=auto|eager|triton or set_kernel_mode
(see _common.py): by default the Triton kernel on CUDA tensors and under Triton's
interpreter, the eager twin elsewhere. Every op is a PyTorch custom op (torch.ops.ddpm_fast.*)
with a fake kernel and, where it has a gradient, an autograd formula, so torch.compile traces
through it without a graph break and CUDA graphs capture it; the path is chosen inside the op.
"""

from ddpm_fast.kernels._common import (
    KERNEL_MODES,
    get_kernel_mode,
    interpreter_on,
    kernel_mode,
    path_setting,
    set_kernel_mode,
    use_triton,
)
from ddpm_fast.kernels.attention import attention
from ddpm_fast.kernels.ddim_step import ddim_step
from ddpm_fast.kernels.dpm_solver import dpm_solver_step
from ddpm_fast.kernels.group_norm_silu import group_norm, group_norm_silu
from ddpm_fast.kernels.posterior_step import posterior_step
from ddpm_fast.kernels.q_sample import q_sample

__all__ = [
    "KERNEL_MODES",
    "attention",
    "ddim_step",
    "dpm_solver_step",
    "get_kernel_mode",
    "group_norm",
    "group_norm_silu",
    "interpreter_on",
    "kernel_mode",
    "path_setting",
    "posterior_step",
    "q_sample",
    "set_kernel_mode",
    "use_triton",
]
