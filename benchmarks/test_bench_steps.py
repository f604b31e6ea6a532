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


@pytest.mark.parametrize("cuda_graph", [False, True], ids=["launches", "cuda-graph"])
@pytest.mark.parametrize("batch", [1, 16, 256])
def test_ddim100_run(measure, batch, cuda_graph):
    """A whole DDIM sampling run of 100 steps with FastDDPM, each step launched from Python or
    replayed as one captured CUDA graph (the graph is captured in the warmup round)."""
    if not CUDA:
        pytest.skip("CUDA graphs and the fused kernels are timed on a CUDA device; this machine has none")
    ddpm = make("fused").eval()
    generator = torch.Generator(DEVICE)

    def run():
        generator.manual_seed(0)
        return ddpm.ddim_sample(batch, steps=100, generator=generator, progress=False, cuda_graph=cuda_graph)

    measure(f"DDIM-100 run, 35.7M U-Net, batch {batch}", run, rounds=3, iterations=1)
