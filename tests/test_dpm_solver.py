"""DPM-Solver++(2M): the trajectory of diffusers' DPMSolverMultistepScheduler (its defaults), the
fused step against its float64 eager twin on the tests' device, FastDDPM against DDPM, and the
CUDA-graph path's step on its static buffers against the plain loop."""

import pytest
import torch
from helpers import DEVICE, DTYPES, LAYOUTS, TOL, check_layout, generator, make, twin64

from ddpm_fast import DDPM, FastDDPM, UNet, UNetConfig, kernels, reference
from ddpm_fast.dpm_solver import dpm_solver_coefficients, dpm_solver_timesteps
from ddpm_fast.schedule import make_betas, schedule_buffers

pytestmark = pytest.mark.on_device
PREDICTIONS = ["epsilon", "sample", "v_prediction"]
TINY = UNetConfig(in_channels=3, image_size=8, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                  num_groups=4, dropout=0.0)  # fmt: skip


def randomised(cls, **kwargs):
    torch.manual_seed(0)
    ddpm = cls(UNet(TINY), image_size=8, **kwargs)
    with torch.no_grad():
        for p in ddpm.model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return ddpm.eval()


@pytest.mark.on_cpu
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("steps", [1, 2, 7, 20])
def test_the_trajectory_is_diffusers_dpm_solver_multistep(prediction_type, steps):
    """The same x_T and model, step by step through diffusers' scheduler (its defaults: dpmsolver++,
    order 2, midpoint, lower_order_final, linspace, final sigma zero) and through ours."""
    from diffusers import DPMSolverMultistepScheduler

    ddpm = randomised(DDPM, timesteps=1000, prediction_type=prediction_type, beta_schedule="linear")
    sched = DPMSolverMultistepScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    sched.set_timesteps(steps)
    assert dpm_solver_timesteps(1000, steps) == sched.timesteps.tolist()
    ours = ddpm.dpm_solver_sample(2, steps=steps, generator=torch.Generator().manual_seed(3), progress=False)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(ddpm.model(x, t.expand(2)), t, x).prev_sample
    torch.testing.assert_close(ours, x, rtol=2e-5, atol=2e-5)


@pytest.mark.on_cpu
def test_the_coefficients_are_first_order_at_both_ends_and_give_the_data_at_sigma_zero():
    abar = schedule_buffers(make_betas("cosine", 100))["alphas_cumprod"]
    table = dpm_solver_coefficients(abar, dpm_solver_timesteps(100, 5), "epsilon")
    assert table.shape == (5, 5) and table.dtype == torch.float32
    assert table[0, 4] == 0 and table[-1, 4] == 0 and (table[1:-1, 4] != 0).all()
    torch.testing.assert_close(table[-1, 2:4], torch.tensor([0.0, 1.0]))  # x_next = x0 at the end
    with pytest.raises(ValueError, match=r"steps must be an int in \[1, 100\]"):
        dpm_solver_timesteps(100, 0)


def step_inputs(shape, dtype, layout, prediction_type, prev=True):
    abar = schedule_buffers(make_betas("linear", 1000))["alphas_cumprod"]
    coefs = dpm_solver_coefficients(abar, dpm_solver_timesteps(1000, 6), prediction_type).to(DEVICE)
    x, out = make(shape, dtype, layout), make(shape, dtype, layout)
    x0_prev = make(shape, torch.float32, layout) if prev else None
    step = torch.arange(shape[0]) % 6  # every row: first order, second order and the last step
    return x, out, x0_prev, step, coefs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_the_fused_step_matches_its_float64_twin(dtype, layout, prediction_type, monkeypatch):
    monkeypatch.setenv("DDPM_FAST_KERNELS", "triton")
    args = step_inputs((6, 3, 5, 7), dtype, layout, prediction_type)
    check_layout(args[0], layout)
    for clip in (False, True):
        y, x0 = kernels.dpm_solver_step(*args, clip_denoised=clip)
        y64, x064 = twin64(reference.dpm_solver_step, *args, clip_denoised=clip)
        assert y.dtype == dtype and x0.dtype == torch.float32 and y.shape == args[0].shape
        scale = 1 + y64.abs().amax()  # epsilon at t ~ T: x0 = x / alpha is large
        torch.testing.assert_close(y.double() / scale, y64 / scale, **TOL[dtype])
        torch.testing.assert_close(x0.double() / (1 + x064.abs().amax()), x064 / (1 + x064.abs().amax()),
                                   **TOL[torch.float32])  # fmt: skip
        if layout == "channels_last":
            assert y.is_contiguous(memory_format=torch.channels_last)


def test_the_first_step_reads_no_previous_prediction(monkeypatch):
    """x0_prev None, or full of NaN where c = 0 (a CUDA graph's buffer before its first step): the
    same result."""
    monkeypatch.setenv("DDPM_FAST_KERNELS", "triton")
    x, out, _, _, coefs = step_inputs((2, 3, 4, 4), torch.float32, "contiguous", "epsilon")
    step = torch.zeros(2, dtype=torch.long)
    nan = torch.full_like(x, float("nan"))
    for op in (kernels.dpm_solver_step, reference.dpm_solver_step):
        a, _ = op(x, out, None, step, coefs)
        b, _ = op(x, out, nan, step, coefs)
        assert torch.isfinite(a).all() and torch.equal(a, b)


def test_bad_inputs_name_the_argument():
    x, out, prev, step, coefs = step_inputs((2, 3, 4, 4), torch.float32, "contiguous", "epsilon")
    with pytest.raises(ValueError, match=r"step must lie in \[0, 6\)"):
        kernels.dpm_solver_step(x, out, prev, torch.tensor([0, 6]), coefs)
    with pytest.raises(ValueError, match=r"coefficients must be a \(steps, 5\) tensor"):
        kernels.dpm_solver_step(x, out, prev, step[:2], coefs[:, :4])
    with pytest.raises(ValueError, match="x0_prev must have the shape of x_t"):
        kernels.dpm_solver_step(x, out, prev[:1], step[:2], coefs)


@pytest.mark.slow
def test_fastddpm_gives_ddpms_images_and_the_graph_paths_step_the_plain_loops(monkeypatch):
    """The fused loop (kernels under the interpreter) against the eager one for the same generator;
    the CUDA-graph path's step, run on its static buffers, against the plain loop."""
    monkeypatch.setenv("DDPM_FAST_KERNELS", "triton")
    eager = randomised(DDPM, timesteps=50, prediction_type="v_prediction", beta_schedule="cosine")
    fast = randomised(FastDDPM, timesteps=50, prediction_type="v_prediction", beta_schedule="cosine")
    a = fast.dpm_solver_sample(2, steps=3, generator=generator(5), progress=False)
    b = eager.dpm_solver_sample(2, steps=3, generator=generator(5), progress=False)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    x = fast._start(2, generator(5), None)
    timesteps = dpm_solver_timesteps(50, 3)
    c = fast._dpm_solver_run(x, timesteps, False, None, False, graph=False, runner=True)
    torch.testing.assert_close(c, a, rtol=0, atol=0)
    assert DEVICE.type == "cuda" or not torch.allclose(a, fast.dpm_solver_sample(2, 3, generator(6), progress=False))
