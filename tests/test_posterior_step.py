"""kernels.posterior_step and kernels.ddim_step against their eager twins run in float64, on the
tests' device (compiled kernels on CUDA, Triton's interpreter on a CPU: see conftest.py)."""

import importlib

import pytest
import torch
from helpers import DEVICE, DTYPES, LAYOUTS, TOL, check_layout, generator, make, twin64

from ddpm_fast import DDPM, kernels, reference
from ddpm_fast.schedule import POSTERIOR_STEP_BUFFERS, make_betas, schedule_buffers

T = 1000
PREDICTIONS = ["epsilon", "sample", "v_prediction"]
VARIANCES = ["fixed_small", "fixed_large"]
STEP_BUFFERS = POSTERIOR_STEP_BUFFERS
pytestmark = pytest.mark.on_device


@pytest.fixture(autouse=True)
def _triton_path(monkeypatch):
    monkeypatch.setenv("DDPM_FAST_KERNELS", "triton")


def buffers(variance_type="fixed_small", schedule="linear"):
    b = schedule_buffers(make_betas(schedule, T), variance_type)
    return [b[n].to(DEVICE) for n in STEP_BUFFERS], b["alphas_cumprod"].to(DEVICE)


def both(fn_name, *args, seed=None, **kwargs):
    """(the kernel's output, the eager twin's in float64, the eager twin's in the kernel's own
    float32 arithmetic) on the same inputs; with `seed`, each draws z from its own generator
    seeded alike."""
    runs = []
    for op in (getattr(kernels, fn_name), lambda *a, **k: twin64(getattr(reference, fn_name), *a, **k),
               getattr(reference, fn_name)):  # fmt: skip
        runs.append(op(*args, **kwargs) if seed is None else op(*args, generator=generator(seed), **kwargs))
    return runs


def assert_as_accurate(fused, ref64, twin32, dtype):
    """The kernel against the float64 twin. Near t = 0 the steps are ill-conditioned (eps or
    sigma come from 1 - abar ratios and divisions by sqrt(1/abar - 1)), so float32 arithmetic
    itself strays from float64 there, by as much as 1e-3; each sample is held to dtype's
    tolerance plus four times what the eager float32 twin strays on that sample."""
    assert fused.dtype == dtype and fused.device.type == DEVICE.type
    tol = TOL[dtype]
    err = (fused.double() - ref64).abs().flatten(1)
    slack = 4 * (twin32.double() - ref64).abs().flatten(1).amax(1, keepdim=True)
    bound = tol["atol"] + tol["rtol"] * ref64.abs().flatten(1) + slack
    worst = (err - bound).amax().item()
    assert worst <= 0, f"{str(dtype)[6:]}: error {err.amax().item():.3g} passes the bound by {worst:.3g}"


def assert_both_close(fn_name, dtype, *args, **kwargs):
    fused, ref64, twin32 = both(fn_name, *args, **kwargs)
    assert_as_accurate(fused, ref64, twin32, dtype)
    return fused


@pytest.mark.parametrize("variance_type", VARIANCES)
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("clip", [True, False])
def test_ddpm_step_matches_eager(dtype, prediction_type, variance_type, clip):
    bufs, _ = buffers(variance_type)
    shape = (7, 3, 5, 5)
    x_t, out, z = make(shape, dtype, scale=2.0), make(shape, dtype), make(shape, dtype)
    t = torch.tensor([0, 1, 2, 500, 998, 999, 0])
    fused = assert_both_close("posterior_step", dtype, x_t, out, t, z, *bufs, prediction_type, clip)
    assert fused.shape == shape


@pytest.mark.parametrize("shape", [(1, 1, 5, 5), (3, 1, 5, 5), (3, 3, 5, 5), (7, 3, 8, 8), (2, 3, 32, 32), (3, 11)])
def test_odd_shapes(shape):
    bufs, _ = buffers()
    x_t, out, z = make(shape, torch.float32), make(shape, torch.float32), make(shape, torch.float32)
    t = torch.randint(0, T, (shape[0],))
    assert_both_close("posterior_step", torch.float32, x_t, out, t, z, *bufs)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_contiguous_inputs(layout):
    bufs, ac = buffers()
    shape = (3, 3, 5, 5)
    x_t, out, z = (make(shape, torch.float32, layout) for _ in range(3))
    check_layout(x_t, layout)
    t, t_prev = torch.tensor([0, 17, 999]), torch.tensor([-1, 3, 899])
    assert_both_close("posterior_step", torch.float32, x_t, out, t, z, *bufs)
    assert_both_close("ddim_step", torch.float32, x_t, out, t, t_prev, z, ac, 0.5)


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ddim_step_matches_eager(dtype, prediction_type, eta):
    _, ac = buffers("fixed_small", "cosine")
    shape = (3, 3, 5, 5)
    x_t, out, z = make(shape, dtype, scale=2.0), make(shape, dtype), make(shape, dtype)
    t, t_prev = torch.tensor([999, 20, 1]), torch.tensor([949, -1, 0])
    assert_both_close("ddim_step", dtype, x_t, out, t, t_prev, z, ac, eta, prediction_type)


def in_kernel_noise(n, shape=(3, 64, 64), t=500, generator=None, op="posterior_step"):
    """z drawn in the kernel, read back: x_t = 0 and output 0 make x_0 = 0, so x_{t-1} = sigma_t z."""
    bufs, ac = buffers()
    x = torch.zeros(n, *shape)
    tt = torch.full((n,), t)
    if op == "posterior_step":
        y = kernels.posterior_step(x, x, tt, None, *bufs, clip_denoised=False, generator=generator,
                                   noise_source="philox")  # fmt: skip
        return y / torch.exp(0.5 * bufs[-1][t])
    y = kernels.ddim_step(x, x, tt, tt - 1, None, ac, 1.0, generator=generator, noise_source="philox")
    a, ap = ac[t].double(), ac[t - 1].double()
    return y / ((1 - ap) / (1 - a) * (1 - a / ap)).sqrt().float()


@pytest.mark.parametrize("op", ["posterior_step", "ddim_step"])
def test_in_kernel_noise_is_standard_normal_and_seeded(op):
    z = in_kernel_noise(4, generator=generator(7), op=op)
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01  # 49,152 draws
    # The same seed gives the same noise; another seed, other noise.
    assert torch.equal(z, in_kernel_noise(4, generator=generator(7), op=op))
    assert not torch.allclose(z, in_kernel_noise(4, generator=generator(8), op=op))
    # Samples in one call are independent of each other (correlation about 0, not 1).
    flat = z.reshape(4, -1)
    corr = torch.corrcoef(flat)
    assert (corr - torch.eye(4)).abs().max() < 0.05


def test_each_step_draws_fresh_noise_and_only_where_t_is_positive():
    g = generator(0)
    a, b = in_kernel_noise(2, generator=g), in_kernel_noise(2, generator=g)
    assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].abs() < 0.05
    bufs, _ = buffers()
    x = torch.randn(2, 3, 5, 5)
    t0 = torch.zeros(2, dtype=torch.long)
    for source in ("torch", "philox"):
        y = kernels.posterior_step(x, x, t0, None, *bufs, noise_source=source)
        torch.testing.assert_close(y, reference.posterior_step(x, x, t0, torch.zeros_like(x), *bufs))


@pytest.mark.parametrize("op", ["posterior_step", "ddim_step"])
def test_default_noise_is_torchs_stream_as_the_eager_twin_draws_it(op):
    """No noise passed: both paths draw z = torch.randn from the generator, in the same order,
    so the fused step gives the eager step's result (DDPM and FastDDPM: the same images)."""
    bufs, ac = buffers()
    x, out = make((3, 3, 5, 5), torch.float32, scale=2.0), make((3, 3, 5, 5), torch.float32)
    t = torch.tensor([999, 500, 3])
    args = (x, out, t, None, *bufs) if op == "posterior_step" else (x, out, t, t - 2, None, ac, 0.7)
    fused, eager, twin32 = both(op, *args, seed=11)
    assert_as_accurate(fused, eager, twin32, torch.float32)
    other = getattr(kernels, op)(*args, generator=generator(12))
    assert not torch.allclose(fused, other)


@pytest.mark.parametrize("use_clipped", [False, True])
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_ddim_eps_from_the_model_or_from_the_clipped_x0(prediction_type, use_clipped):
    _, ac = buffers()
    x_t, out, z = make((3, 3, 5, 5), torch.float32, scale=3.0), make((3, 3, 5, 5), torch.float32), make(
        (3, 3, 5, 5), torch.float32)  # fmt: skip
    t, t_prev = torch.tensor([999, 400, 7]), torch.tensor([979, 380, -1])
    fused = assert_both_close("ddim_step", torch.float32, x_t, out, t, t_prev, z, ac, 0.5, prediction_type,
                              use_clipped_model_output=use_clipped)  # fmt: skip
    flipped = reference.ddim_step(x_t, out, t, t_prev, z, ac, 0.5, prediction_type,
                                  use_clipped_model_output=not use_clipped)  # fmt: skip
    assert not torch.allclose(fused, flipped)  # the option matters on these inputs (x_0 clipped)


def test_every_gather_is_bounded_without_the_check():
    """Unchecked t and t_prev (what the samplers pass) are clamped into the schedule by the
    kernels and the eager twins alike; checked, both refuse them."""
    bufs, ac = buffers()
    short = [b[:50] for b in bufs]
    x, out = make((2, 3, 4, 4), torch.float32), make((2, 3, 4, 4), torch.float32)
    t = torch.tensor([999, 10])
    for module in (kernels, reference):
        with pytest.raises(ValueError, match="^t must lie in \\[0, 50\\)"):
            module.posterior_step(x, out, t, x, *short)
    fused = kernels.posterior_step(x, out, t, x, *short, check_t=False)
    torch.testing.assert_close(fused, reference.posterior_step(x, out, t, x, *short, check_t=False))
    torch.testing.assert_close(fused[:1], reference.posterior_step(x[:1], out[:1], torch.tensor([49]), x[:1], *short))
    t, t_prev = torch.tensor([999, 1500]), torch.tensor([-7, 1200])
    fused = kernels.ddim_step(x, out, t, t_prev, None, ac[:50], check_t=False)
    torch.testing.assert_close(fused, reference.ddim_step(x, out, t, t_prev, None, ac[:50], check_t=False))
    clamped = reference.ddim_step(x, out, torch.tensor([49, 49]), torch.tensor([-1, 49]), None, ac[:50], check_t=False)
    torch.testing.assert_close(fused, clamped)  # 999, 1500 -> 49; -7 -> -1 (the last step); 1200 -> 49


def test_where_a_gradient_is_required_the_gradient_is_correct():
    bufs, _ = buffers()
    x, z, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor([5, 600])
    grads = []
    for op in (kernels.posterior_step, reference.posterior_step):
        out = torch.randn(2, 3, 4, 4, generator=generator(1)).requires_grad_()
        op(x, out, t, z, *bufs, clip_denoised=False).square().sum().backward()
        grads.append(out.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_bad_inputs_name_the_argument():
    bufs, ac = buffers()
    x = torch.randn(2, 3, 4, 4)
    t = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="^t must lie in"):
        kernels.posterior_step(x, x, torch.tensor([0, T]), None, *bufs)
    with pytest.raises(ValueError, match="^t must have shape \\(2,\\)"):
        kernels.posterior_step(x, x, torch.tensor([1, 2, 3]), None, *bufs)
    with pytest.raises(ValueError, match="^model_output must have the shape of x_t"):
        kernels.posterior_step(x, x[:, :1], t, None, *bufs)
    with pytest.raises(ValueError, match="^noise must have the shape of x_t"):
        kernels.posterior_step(x, x, t, x[:1], *bufs)
    with pytest.raises(ValueError, match="^prediction_type"):
        kernels.posterior_step(x, x, t, None, *bufs, prediction_type="score")
    with pytest.raises(ValueError, match="^posterior_mean_coef1 has 10 timesteps"):
        kernels.posterior_step(x, x, t, None, bufs[0], bufs[1], bufs[2][:10], *bufs[3:])
    with pytest.raises(ValueError, match="^t_prev must lie in \\[-1, 1000\\)"):
        kernels.ddim_step(x, x, t + 5, torch.tensor([-2, 0]), None, ac)
    with pytest.raises(ValueError, match="^eta"):
        kernels.ddim_step(x, x, t + 5, t, None, ac, eta=-0.1)


class ConvModel(torch.nn.Module):
    """A model without the U-Net's own switch: only the diffusion ops change path."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x, t):
        return self.conv(x) * (1 + t.float()[:, None, None, None] / T)


def test_ddpm_uses_the_kernels_through_its_switch(monkeypatch):
    """The same DDPM, eager and fused: the same loss, gradients and reverse step, and the
    fused one really launches the kernels."""
    ddpm = DDPM(ConvModel(), image_size=8, channels=3, timesteps=T, prediction_type="v_prediction")
    x0, noise, t = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8), torch.tensor([0, 400, 999])
    launched = []
    for name in ("q_sample_fwd", "q_sample_bwd"):
        mod = importlib.import_module("ddpm_fast.kernels.q_sample")
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _real=real, _name=name: launched.append(_name) or _real(*a))
    step_mod = importlib.import_module("ddpm_fast.kernels.posterior_step")
    real_step = step_mod.posterior_step_fwd
    monkeypatch.setattr(step_mod, "posterior_step_fwd", lambda *a, **kw: launched.append("step") or real_step(*a, **kw))
    results = []
    for fused in (True, False):
        ddpm.set_fused(fused)
        ddpm.zero_grad()
        noisy = x0.clone().requires_grad_()  # a gradient to x0 exercises q_sample's backward
        loss = ddpm.loss(noisy, t=t, noise=noise)
        loss.backward()
        step = ddpm.p_sample(x0, t, noise=noise)
        results.append((loss.detach(), ddpm.model.conv.weight.grad.clone(), noisy.grad, step))
    assert launched == ["q_sample_fwd", "q_sample_bwd", "step"]
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("op", ["posterior_step", "ddim_step"])
def test_nan_from_the_model_stays_nan_through_the_clip(op, prediction_type):
    """A diverged model's NaN comes out NaN where the eager twin's does (torch.clamp keeps NaN),
    with clip_denoised on: the kernel's clip must not turn it into +-1 (tl.minimum and tl.maximum
    return the other operand for a NaN), and the finite samples stay as they were."""
    bufs, ac = buffers()
    x_t, out, z = make((3, 3, 5, 5), torch.float32, scale=3.0), make((3, 3, 5, 5), torch.float32), make(
        (3, 3, 5, 5), torch.float32)  # fmt: skip
    out[0] = float("nan")
    out[1, 0, 2] = float("nan")
    t = torch.tensor([500, 20, 3])
    if op == "posterior_step":
        args = (x_t, out, t, z, *bufs, prediction_type, True)
    else:
        args = (x_t, out, t, t - 1, z, ac, 0.5, prediction_type, True)
    fused, eager = getattr(kernels, op)(*args), getattr(reference, op)(*args)
    assert torch.isnan(eager[0]).all() and torch.isnan(eager[1]).any() and not torch.isnan(eager[2]).any()
    assert torch.equal(torch.isnan(fused), torch.isnan(eager))
    torch.testing.assert_close(fused[2], eager[2], **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.int32])
def test_timesteps_of_any_integer_dtype(dtype):
    """t of a small integer dtype is checked against T = 1000 in int64 (1000 does not fit an int8 or
    a uint8: the bound used to wrap and refuse every value) and gives what int64 t gives."""
    bufs, _ = buffers()
    x_t, out, z = (make((3, 3, 5, 5), torch.float32) for _ in range(3))
    t = torch.tensor([0, 3, 100])
    expected = kernels.posterior_step(x_t, out, t, z, *bufs)
    torch.testing.assert_close(kernels.posterior_step(x_t, out, t.to(dtype), z, *bufs), expected, rtol=0, atol=0)
    eager = reference.posterior_step(x_t, out, t.to(dtype), z, *bufs)
    torch.testing.assert_close(eager, expected, **TOL[torch.float32])
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1000\), got values from -1 to 3"):
        kernels.posterior_step(x_t, out, torch.tensor([-1, 3, 0]).to(torch.int8), z, *bufs)
