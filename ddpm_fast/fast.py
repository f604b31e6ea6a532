"""FastDDPM: DDPM's API, state_dict and math, with every fused kernel in play.

    from ddpm_fast import FastDDPM          # instead of: from ddpm_fast import DDPM

q_sample in the loss, the reverse step in p_sample / sample / ddim_sample, GroupNorm+SiLU
(with the time-embedding add) and attention inside the U-Net all go through
ddpm_fast.kernels. A checkpoint of one loads into the other: the switch is not state.
"""

import torch.nn as nn

from ddpm_fast.diffusion import DDPM
from ddpm_fast.schedule import BETA_END, BETA_START
from ddpm_fast.unet import GroupNormSiLU


class FastDDPM(DDPM):
    """DDPM with fused kernels: the same constructor (fused defaults to True), methods and
    state_dict. Where the kernels cannot run (a CPU without Triton's interpreter) it runs the
    eager path and warns once."""

    def __init__(
        self,
        model: nn.Module,
        image_size: int,
        channels: int = 3,
        timesteps: int = 1000,
        beta_schedule: str = "linear",
        prediction_type: str = "epsilon",
        variance_type: str = "fixed_small",
        fused: bool = True,
        *,
        beta_start: float = BETA_START,
        beta_end: float = BETA_END,
        trained_betas=None,
        snr_gamma: float | None = None,
    ):
        fuse(model)
        super().__init__(model, image_size, channels, timesteps, beta_schedule, prediction_type, variance_type, fused,
                         beta_start=beta_start, beta_end=beta_end, trained_betas=trained_betas,
                         snr_gamma=snr_gamma)  # fmt: skip


def fuse(model: nn.Module, enabled: bool = True) -> int:
    """Turn `model` into its fused form in place, keeping its class, every parameter and every
    state_dict key; `fuse(model, False)` (or `unfuse(model)`) puts the eager path back.

    - our UNet, GroupNormSiLU and AttnBlock modules switch to the kernels;
    - in any nn.Sequential, a torch.nn.GroupNorm directly followed by a torch.nn.SiLU becomes
      one fused GroupNormSiLU (same weight and bias, same index) and an nn.Identity;
    - in a diffusers model (UNet2DModel and the like), each ResnetBlock2D's two GroupNorm + SiLU
      pairs (the time-embedding add inside the second) and each Attention (an attention
      processor of ours) run on the kernels: see ddpm_fast.diffusers_fused, which warns with the
      count of modules it leaves on diffusers' path;
    - a diffusers DDPMPipeline / DDIMPipeline: its unet as above and its scheduler's step on the
      fused reverse-step kernels (+1 to the count) where its config is one they compute exactly.
    A GroupNorm and a SiLU applied one after the other inside another custom forward cannot be
    seen from the module tree and stay as they are. Returns the number of modules now on the fused path.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be True or False, got {enabled!r}")
    if not isinstance(model, nn.Module) and hasattr(model, "unet") and hasattr(model, "scheduler"):
        from ddpm_fast import diffusers_fused  # a diffusers pipeline: its unet and its scheduler's step

        return diffusers_fused.fuse_pipeline(model, enabled)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or a diffusers pipeline, got {type(model).__name__}")
    if enabled:
        for module in list(model.modules()):
            if isinstance(module, nn.Sequential):
                _fuse_sequential(module)
    count = 0
    for module in model.modules():
        if hasattr(module, "fused") and isinstance(module.fused, bool):
            module.fused = enabled
            count += enabled
    from ddpm_fast import diffusers_fused

    if diffusers_fused.is_diffusers_model(model):  # diffusers is imported only for its own models
        count += diffusers_fused.fuse_diffusers(model, enabled)[0]
    return count


def unfuse(model):
    """`model` back on the eager path (diffusers' own forward and processors for a diffusers model)."""
    fuse(model, False)
    return model


def _fuse_sequential(seq: nn.Sequential) -> None:
    names = list(seq._modules)
    for first, second in zip(names, names[1:]):
        norm, act = seq._modules[first], seq._modules[second]
        if type(norm) is nn.GroupNorm and type(act) is nn.SiLU:
            fused = GroupNormSiLU(norm.num_groups, norm.num_channels, norm.eps, norm.affine)
            if norm.affine:
                fused.weight, fused.bias = norm.weight, norm.bias  # the same Parameters
            seq._modules[first], seq._modules[second] = fused, nn.Identity()
