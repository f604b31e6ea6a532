"""What a fused call costs the host, and how many kernels a sampling step launches: measured on
any machine (a CPU included), since neither needs the GPU.

- Host cost: one call of each fused op at the U-Net's shapes with its Triton launch replaced by a
  no-op (the rest runs: the plan lookup, the checks, the output's allocation, the launcher), on
  CPU tensors with the Triton path forced (DDPM_FAST_KERNELS=triton), under no_grad as in a
  sampling loop. extra_info holds the time per call and its ratio to a 4-element torch.add timed
  in the same test (the cheapest ATen op: what "one op of host work" costs on this machine), and
  the same for the torch.library custom op path (what torch.compile traces through) and for the
  call with a gradient wanted (training).
- Launches: the kernels one DDPM sampling step of the paper's 35.7M U-Net launches (Triton +
  ATen ops that run a device kernel: ddpm_fast.tools.launches), fused and eager, at batch 1 and 16. The
  timed function is the count itself (it runs the step's ATen ops on the CPU): read extra_info.

Host times are this machine's CPU times; on a GPU machine the Triton launch itself (its binder
and the driver call, stubbed here) comes on top.
"""

import contextlib
import importlib
import timeit

import pytest
import torch

from ddpm_fast import kernels
from ddpm_fast.schedule import POSTERIOR_STEP_BUFFERS, make_betas, schedule_buffers
from ddpm_fast.tools.launches import sampling_step_launches

# the op modules (ddpm_fast.kernels' own names are the functions)
attention_module = importlib.import_module("ddpm_fast.kernels.attention")
gn_module = importlib.import_module("ddpm_fast.kernels.group_norm_silu")
step_module = importlib.import_module("ddpm_fast.kernels.posterior_step")
ddim_module = importlib.import_module("ddpm_fast.kernels.ddim_step")
dpm_module = importlib.import_module("ddpm_fast.kernels.dpm_solver")


@contextlib.contextmanager
def stubbed_launches():
    """Every Triton launch a no-op; the fused ops on their Triton path for CPU tensors."""
    from triton.runtime.jit import KernelInterface

    real = KernelInterface.__getitem__
    KernelInterface.__getitem__ = lambda self, grid: lambda *args, **kwargs: None
    try:
        with kernels.kernel_mode("triton"):
            yield
    finally:
        KernelInterface.__getitem__ = real


def _us(*fns, number=500, rounds=40) -> list[float]:
    """Microseconds per call of each fn: the best of `rounds` timings of `number` calls, the fns
    timed in turn within each round, so that a burst of noise on a shared machine falls on all of
    them alike and their ratios hold (separate runs of ~10 s each drifted by 0.3x)."""
    for _ in range(100):
        for fn in fns:
            fn()
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            best[i] = min(best[i], timeit.timeit(fn, number=number))
    return [b / number * 1e6 for b in best]


def _cases():
    """{name: (direct call, custom-op call, call with a gradient wanted or None)}."""
    x = torch.randn(1, 256, 16, 16)
    add = torch.randn(1, 256)
    w, b = torch.ones(256), torch.zeros(256)
    wg, xg = w.clone().requires_grad_(), x.clone().requires_grad_()
    qkv = torch.randn(1, 256, 3 * 256)  # the U-Net's AttnBlock: one GEMM's output, token-major
    q, k, v = (t.unsqueeze(1) for t in qkv.chunk(3, dim=-1))
    qg = q.detach().clone().requires_grad_()
    bufs = schedule_buffers(make_betas("linear", 1000))
    step = [bufs[n] for n in POSTERIOR_STEP_BUFFERS]
    x_t = torch.randn(1, 3, 32, 32)
    eps, z, t = torch.randn_like(x_t), torch.randn_like(x_t), torch.full((1,), 500)
    t_prev = t - 10
    abar = bufs["alphas_cumprod"]
    from ddpm_fast.dpm_solver import dpm_solver_coefficients, dpm_solver_timesteps

    table = dpm_solver_coefficients(abar, dpm_solver_timesteps(1000, 20), "epsilon")
    i = torch.full((1,), 5)
    return {
        "group_norm_silu+add fwd": (
            lambda: kernels.group_norm_silu(x, 32, w, b, 1e-6, add=add),
            lambda: gn_module.group_norm_act_op(x, 32, w, b, 1e-6, add, True),
            lambda: kernels.group_norm_silu(xg, 32, wg, b, 1e-6, add=add),
        ),
        "attention fwd": (
            lambda: kernels.attention(q, k, v),
            lambda: attention_module.attention_op(q, k, v, 256**-0.5),
            lambda: kernels.attention(qg, k, v),
        ),
        "posterior_step": (
            lambda: kernels.posterior_step(x_t, eps, t, z, *step, check_t=False),
            lambda: step_module.posterior_step_op(x_t, eps, t, z, None, *step, "epsilon", True),
            None,
        ),
        "ddim_step": (
            lambda: kernels.ddim_step(x_t, eps, t, t_prev, None, abar, check_t=False),
            lambda: ddim_module.ddim_step_op(x_t, eps, t, t_prev, None, None, abar, 0.0, "epsilon", True, False),
            None,
        ),
        "dpm_solver_step": (
            lambda: kernels.dpm_solver_step(x_t, eps, z, i, table, check_step=False),
            lambda: dpm_module.dpm_solver_step_op(x_t, eps, z, i, table, False),
            None,
        ),
    }


CASES = list(_cases())


@pytest.mark.parametrize("op", CASES)
def test_host_cost_per_call(benchmark, op):
    benchmark.group = "host cost per call (Triton launch stubbed), CPU"
    a = torch.zeros(4)
    with stubbed_launches():
        direct, custom_op, with_grad = _cases()[op]
        with torch.no_grad():
            benchmark.pedantic(direct, rounds=200, iterations=50, warmup_rounds=10)
            add_us, direct_us, op_us = _us(lambda: torch.add(a, a), direct, custom_op)
        grad_us = _us(with_grad, lambda: torch.add(a, a), number=200, rounds=20) if with_grad is not None else None
    info = benchmark.extra_info
    info["torch.add (4 elements) us"] = round(add_us, 2)
    info["us per call"] = round(direct_us, 2)
    info["x torch.add"] = round(direct_us / add_us, 1)
    info["custom op path us"] = round(op_us, 2)
    info["custom op path x torch.add"] = round(op_us / add_us, 1)
    if grad_us is not None:
        grad_us, grad_add_us = grad_us
        info["with grad (training) us"] = round(grad_us, 2)
        info["with grad x torch.add"] = round(grad_us / grad_add_us, 1)
    info["torch"], info["device"] = torch.__version__, "cpu (host path)"


@pytest.mark.parametrize("path", ["eager", "fused"])
@pytest.mark.parametrize("batch", [1, 16])
def test_launches_per_sampling_step(benchmark, batch, path):
    benchmark.group = f"kernels per sampling step, 35.7M U-Net, batch {batch} (timed: the count itself)"
    counts = benchmark.pedantic(lambda: sampling_step_launches(batch, fused=path == "fused"), rounds=1, iterations=1)
    info = benchmark.extra_info
    info.update(kernels=counts["total"], triton=counts["triton"], aten=counts["aten"], path=path, batch=batch)
    info["aten_ops"] = counts["aten_ops"]


@pytest.mark.parametrize("draw", ["one generator", "per-image generators"])
@pytest.mark.parametrize("batch", [16, 256])
def test_step_noise_draw(benchmark, batch, draw):
    """One sampling step's noise for a batch of 32x32 RGB images: one torch.randn from one
    generator, or one draw per image from its own generator (what `ddpm-fast sample` does so that
    each image is the same whatever its batch or process: reference.randn). On a CPU the draw
    itself is timed; on a GPU the per-image loop adds about one launch per image to each step."""
    from ddpm_fast import reference
    from ddpm_fast.sampling import image_generators

    benchmark.group = f"step noise draw, batch {batch}, 3x32x32 (host), CPU"
    shape = (batch, 3, 32, 32)
    gen = image_generators(0, range(batch), "cpu") if draw != "one generator" else torch.Generator().manual_seed(0)
    benchmark.pedantic(lambda: reference.randn(shape, gen, "cpu"), rounds=20, iterations=5, warmup_rounds=2)
    info = benchmark.extra_info
    info["us per step"] = round(benchmark.stats.stats.mean * 1e6, 1)
    info["torch"], info["device"] = torch.__version__, "cpu"
