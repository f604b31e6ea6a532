"""The whole thing: one training step (forward, loss, backward, Adam) and one sampling step of
the paper's 35.7M-parameter CIFAR-10 U-Net, DDPM against FastDDPM. On a CPU only DDPM runs,
at small batches (a CPU cannot do batch 128 of this model in benchmark time)."""

import pytest
import torch
from conftest import CUDA, DEVICE, IMPLS, skip_unless_runnable

from ddpm_fast import DDPM, FastDDPM, UNet
from ddpm_fast.train import train_step

TRAIN_BATCH = 128 if CUDA else 2
SAMPLE_BATCHES = [16, 64, 256] if CUDA else [4]


def make(impl):
    torch.manual_seed(0)
    cls = FastDDPM if impl == "fused" else DDPM
    return cls(UNet(), image_size=32, channels=3).to(DEVICE)


@pytest.mark.parametrize("impl", IMPLS)
def test_train_step(measure, impl):
    skip_unless_runnable(impl)
    ddpm = make(impl)
    opt = torch.optim.Adam(ddpm.parameters(), lr=2e-4)
    x0 = torch.rand(TRAIN_BATCH, 3, 32, 32, device=DEVICE) * 2 - 1
    measure(f"train step, 35.7M U-Net, batch {TRAIN_BATCH}", lambda: train_step(ddpm, x0, opt))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch", SAMPLE_BATCHES)
def test_sampling_step(measure, impl, batch):
    skip_unless_runnable(impl)
    ddpm = make(impl).eval()
    x = torch.randn(batch, 3, 32, 32, device=DEVICE)
    t = torch.full((batch,), 500, device=DEVICE, dtype=torch.long)
    measure(f"sampling step, 35.7M U-Net, batch {batch}", lambda: ddpm.p_sample(x, t))
