"""diffusers' own UNet2DModel at the google/ddpm-cifar10-32 config (Ho et al.'s 35.7M U-Net, as
diffusers builds it): a forward (sampling's model call) and a training step (MSE on eps,
backward, Adam), unfused (diffusers as it is), fused in place by ddpm_fast.fuse, and
torch.compile of the unfused model. On a CPU only the unfused model runs, at small batches: CPU
timings, not GPU ones."""

import pytest
import torch
from conftest import CUDA, DEVICE, compiled, skip_unless_runnable

diffusers = pytest.importorskip("diffusers")

CONFIG = dict(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None, norm_eps=1e-6,
    downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
)  # fmt: skip
IMPLS = ["eager", "fused", "compile"]
FORWARD_BATCH = 64 if CUDA else 1
TRAIN_BATCH = 128 if CUDA else 2


def make(impl):
    import ddpm_fast

    torch.manual_seed(0)
    model = diffusers.UNet2DModel(**CONFIG).to(DEVICE)
    if impl == "fused":
        ddpm_fast.fuse(model)
    return model


@pytest.mark.parametrize("impl", IMPLS)
def test_unet2dmodel_forward(measure, impl):
    skip_unless_runnable(impl, whole_step=True)
    model = make(impl).eval()
    forward = compiled(model, impl)
    x = torch.randn(FORWARD_BATCH, 3, 32, 32, device=DEVICE)
    t = torch.full((FORWARD_BATCH,), 500, device=DEVICE, dtype=torch.long)
    with torch.no_grad():
        measure(f"diffusers UNet2DModel (ddpm-cifar10-32) forward, batch {FORWARD_BATCH}", lambda: forward(x, t).sample)


@pytest.mark.parametrize("impl", IMPLS)
def test_unet2dmodel_train_step(measure, impl):
    skip_unless_runnable(impl, whole_step=True)
    model = make(impl).train()
    forward = compiled(model, impl)
    opt = torch.optim.Adam(model.parameters(), lr=2e-4)
    x, eps = torch.randn(2, TRAIN_BATCH, 3, 32, 32, device=DEVICE).unbind(0)
    t = torch.randint(0, 1000, (TRAIN_BATCH,), device=DEVICE)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(forward(x, t).sample, eps)
        loss.backward()
        opt.step()
        return loss

    measure(f"diffusers UNet2DModel (ddpm-cifar10-32) train step, batch {TRAIN_BATCH}", step)
