"""ddpm-fast: Denoising Diffusion Probabilistic Models with fused Triton kernels."""

from ddpm_fast.diffusion import DDPM
from ddpm_fast.fast import FastDDPM, fuse, unfuse
from ddpm_fast.schedule import extract, make_betas, schedule_buffers
from ddpm_fast.unet import PRESETS, GroupNormSiLU, UNet, UNetConfig

__all__ = [
    "DDPM",
    "FastDDPM",
    "GroupNormSiLU",
    "PRESETS",
    "UNet",
    "UNetConfig",
    "extract",
    "fuse",
    "make_betas",
    "schedule_buffers",
    "unfuse",
]
__version__ = "0.2.0"
