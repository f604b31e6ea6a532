"""Training: one optimisation step, with every phase named for Nsight."""

import torch

from ddpm_fast.diffusion import DDPM
from ddpm_fast.profiling import nvtx_range


def train_step(
    ddpm: DDPM,
    x0: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    grad_clip: float | None = 1.0,
    scaler: torch.amp.GradScaler | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Loss (NVTX ranges forward, loss), backward, gradient clipping and the optimiser step.
    Returns the loss, detached and left on the device (no host sync)."""
    with torch.autocast(x0.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss = ddpm.loss(x0)
    with nvtx_range("backward"):
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
        else:
            loss.backward()
    with nvtx_range("optimizer"):
        if scaler is not None:
            scaler.unscale_(optimizer)
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(ddpm.parameters(), grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
    return loss.detach()
