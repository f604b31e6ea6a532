"""The whole thing, on the paper's 35.7M-parameter CIFAR-10 U-Net: a training step (forward,
loss, backward, clipping, Adam) in float32 and under bfloat16 autocast, a sampling step at batch
1, 16 and 256, whole DDIM-100 and DPM++-20 runs: DDPM (eager), FastDDPM (fused) and torch.compile of the
eager step (default mode and max-autotune-no-cudagraphs). On a CPU only DDPM runs, at small
batches (a CPU cannot do batch 128 of this model in benchmark time)."""

import pytest
import torch
from conftest import CUDA, DEVICE, IMPLS, compiled, skip_unless_runnable

from ddpm_fast import DDPM, FastDDPM, UNet
from ddpm_fast.train import train_step

TRAIN_BATCH = 128 if CUDA else 2
SAMPLE_BATCHES = [1, 16, 256] if CUDA else [1, 4]
PRECISIONS = {"fp32": None, "bf16-autocast": torch.bfloat16}


def make(impl):
    torch.manual_seed(0)
    cls = FastDDPM if impl.startswith("fused") else DDPM
    return cls(UNet(), image_size=32, channels=3).to(DEVICE)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_train_step(measure, impl, precision):
    skip_unless_runnable(impl, whole_step=True)
    if precision != "fp32" and not CUDA:
        pytest.skip("bfloat16 autocast is timed on a CUDA device")
    ddpm = make(impl)
    opt = torch.optim.Adam(ddpm.parameters(), lr=2e-4)
    step = compiled(ddpm, impl)  # torch.compile of the loss (the module's forward); Adam stays eager
    x0 = torch.rand(TRAIN_BATCH, 3, 32, 32, device=DEVICE) * 2 - 1
    dtype = PRECISIONS[precision]
    measure(f"train step, 35.7M U-Net, batch {TRAIN_BATCH}, {precision}",
            lambda: train_step(step, x0, opt, autocast_dtype=dtype))  # fmt: skip


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch", SAMPLE_BATCHES)
def test_sampling_step(measure, impl, batch):
    skip_unless_runnable(impl, whole_step=True)
    ddpm = make(impl).eval()
    x = torch.randn(batch, 3, 32, 32, device=DEVICE)
    t = torch.full((batch,), 500, device=DEVICE, dtype=torch.long)
    # the step the sampling loops run: p_sample without its one-off host check of t
    p_sample = compiled(ddpm._p_sample, impl)
    with torch.no_grad():
        measure(f"sampling step, 35.7M U-Net, batch {batch}", lambda: p_sample(x, t, None, True, None))


SAMPLERS = {  # a whole run of each: DDIM-100, and DPM-Solver++(2M) in 20 steps (5x fewer model evaluations)
    "DDIM-100": lambda ddpm, batch, **kw: ddpm.ddim_sample(batch, steps=100, **kw),
    "DPM++-20": lambda ddpm, batch, **kw: ddpm.dpm_solver_sample(batch, steps=20, **kw),
}


@pytest.mark.parametrize("impl", ["eager", "fused", "fused+cuda-graph", "compile"])
@pytest.mark.parametrize("batch", [1, 16, 256])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_sampling_run(measure, sampler, batch, impl):
    """A whole sampling run: each step launched from Python, or (fused+cuda-graph) replayed as one
    captured CUDA graph (captured in the warmup round); compile runs the torch.compile'd U-Net
    inside the same loop. DPM++-20 reads beside DDIM-100 at the same batch."""
    if not CUDA:
        pytest.skip("a whole sampling run of the 35.7M U-Net is timed on a CUDA device only")
    ddpm = make(impl).eval()
    if impl == "compile":
        ddpm.model = compiled(ddpm.model, impl)
    generator = torch.Generator(DEVICE)

    def run():
        generator.manual_seed(0)
        return SAMPLERS[sampler](ddpm, batch, generator=generator, progress=False,
                                 cuda_graph=impl == "fused+cuda-graph")  # fmt: skip

    measure(f"{sampler} run, 35.7M U-Net, batch {batch}", run, rounds=3, iterations=1)
