"""FastDDPM: DDPM's API, state_dict and math, with every fused kernel in play.

    from ddpm_fast import FastDDPM          # instead of: from ddpm_fast import DDPM

q_sample in the loss, the reverse step in p_sample / sample / ddim_sample, GroupNorm+SiLU
(with the time-embedding add) and attention inside the U-Net all go through
ddpm_fast.kernels. A checkpoint of one loads into the other: the switch is not state.
"""

import torch.nn as nn

from ddpm_fast.diffusion import DDPM
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
    ):
        fuse(model)
        super().__init__(model, image_size, channels, timesteps, beta_schedule, prediction_type, variance_type, fused)


def fuse(model: nn.Module) -> int:
    """Turn `model` into its fused form in place, keeping every parameter and state_dict key.

    - our UNet, GroupNormSiLU and AttnBlock modules switch to the kernels;
    - in any nn.Sequential, a torch.nn.GroupNorm directly followed by a torch.nn.SiLU becomes
      one fused GroupNormSiLU (same weight and bias, same index) and an nn.Identity.
    A GroupNorm and a SiLU applied one after the other inside a custom forward cannot be
    seen from the module tree and stay as they are. Returns the number of modules now on the fused path.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for module in list(model.modules()):
        if isinstance(module, nn.Sequential):
            _fuse_sequential(module)
    count = 0
    for module in model.modules():
        if hasattr(module, "fused") and isinstance(module.fused, bool):
            module.fused = True
            count += 1
    return count


def _fuse_sequential(seq: nn.Sequential) -> None:
    names = list(seq._modules)
    for first, second in zip(names, names[1:]):
        norm, act = seq._modules[first], seq._modules[second]
        if type(norm) is nn.GroupNorm and type(act) is nn.SiLU:
            fused = GroupNormSiLU(norm.num_groups, norm.num_channels, norm.eps, norm.affine)
            if norm.affine:
                fused.weight, fused.bias = norm.weight, norm.bias  # the same Parameters
            seq._modules[first], seq._modules[second] = fused, nn.Identity()
