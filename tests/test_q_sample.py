"""kernels.q_sample against reference.q_sample run in float64, on the tests' device (compiled
kernels on CUDA, Triton's interpreter on a CPU: see conftest.py)."""

import importlib

import pytest
import torch
from helpers import DEVICE, DTYPES, LAYOUTS, TOL, assert_close64, check_layout, float64_twin, make

from ddpm_fast import kernels, reference
from ddpm_fast.schedule import make_betas, schedule_buffers

q_sample_module = importlib.import_module("ddpm_fast.kernels.q_sample")  # the attribute is the function
T = 1000
pytestmark = pytest.mark.on_device
SHAPES = [(1, 1, 5, 5), (3, 3, 5, 5), (7, 1, 4, 6), (2, 3, 32, 32), (5, 17)]


@pytest.fixture(scope="module")
def coefs():
    b = schedule_buffers(make_betas("linear", T))
    return b["sqrt_alphas_cumprod"].to(DEVICE), b["sqrt_one_minus_alphas_cumprod"].to(DEVICE)


@pytest.fixture(autouse=True)
def _triton_path(monkeypatch):
    monkeypatch.setenv("DDPM_FAST_KERNELS", "triton")


def run_both(x0, t, noise, coefs, grad=None):
    """Forward and backward through the kernel and through the eager twin on float64 copies;
    returns ((out, dx0, dnoise) fused, float64)."""
    results = []
    for op, cast in ((kernels.q_sample, lambda x: x), (reference.q_sample, torch.Tensor.double)):
        a = cast(x0.detach().clone()).requires_grad_(grad is not None)
        n = cast(noise.detach().clone()).requires_grad_(grad is not None)
        with float64_twin():
            out = op(a, t, n, *(cast(c) for c in coefs))
        if grad is None:
            results.append((out, None, None))
            continue
        (out.sum() if grad == "sum" else out).backward(None if grad == "sum" else cast(grad))
        results.append((out, a.grad, n.grad))
    return results


def assert_all_close(fused, ref, dtype):
    for name, f, r in zip(("out", "dx0", "dnoise"), fused, ref):
        if r is not None:
            assert_close64(f, r, dtype, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_backward_match_eager(coefs, dtype, shape):
    x0, noise = make(shape, dtype), make(shape, dtype)
    t = torch.randint(0, T, (shape[0],))
    g = make(shape, dtype)
    (out, dx, dn), (ref, rdx, rdn) = run_both(x0, t, noise, coefs, grad=g)
    assert out.dtype == dtype and out.shape == shape and out.device.type == DEVICE.type
    assert_all_close((out, dx, dn), (ref, rdx, rdn), dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_contiguous_inputs_and_gradients(coefs, layout):
    shape = (3, 3, 5, 5)
    x0, noise = make(shape, torch.float32, layout), make(shape, torch.float32, layout)
    check_layout(x0, layout)
    t = torch.tensor([0, 511, 999])
    fused, ref = run_both(x0, t, noise, coefs, grad=make(shape, torch.float32, layout))
    assert_all_close(fused, ref, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradient_of_sum_is_read_through_zero_strides(coefs, dtype):
    """loss = out.sum() hands backward an expanded tensor of ones (all strides 0)."""
    shape = (3, 1, 5, 5)
    x0, noise = make(shape, dtype), make(shape, dtype)
    t = torch.tensor([3, 0, 998])
    (_, dx, dn), (_, rdx, rdn) = run_both(x0, t, noise, coefs, grad="sum")
    assert_all_close((None, dx, dn), (None, rdx, rdn), dtype)
    # Each sample's gradient is its own coefficient, not another sample's.
    torch.testing.assert_close(dx[:, 0, 0, 0].float(), coefs[0][t].to(dtype).float(), **TOL[dtype])


def test_mixed_dtypes_and_int32_timesteps(coefs):
    x0, noise = make((3, 2, 4, 4), torch.float16), make((3, 2, 4, 4), torch.float32)
    t = torch.tensor([1, 2, 3], dtype=torch.int32)
    (out, _, _), (ref, _, _) = run_both(x0, t, noise, coefs)
    assert out.dtype == torch.float16
    assert_close64(out, ref.double(), torch.float16)


def test_launches_the_kernel_and_checks_its_arguments(coefs, monkeypatch):
    calls = []
    real = q_sample_module.q_sample_fwd
    monkeypatch.setattr(q_sample_module, "q_sample_fwd", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(2, 3, 4, 4)
    kernels.q_sample(x, torch.tensor([0, 1]), x, *coefs)
    assert calls == [1]
    with pytest.raises(ValueError, match="^t must lie in"):
        kernels.q_sample(x, torch.tensor([0, T]), x, *coefs)
    with pytest.raises(ValueError, match="^t must have shape \\(2,\\)"):
        kernels.q_sample(x, torch.tensor([0]), x, *coefs)
    with pytest.raises(ValueError, match="^noise must have the shape of x0"):
        kernels.q_sample(x, torch.tensor([0, 1]), x[:, :1], *coefs)
    with pytest.raises(TypeError, match="^x0 must be float32, float16 or bfloat16"):
        kernels.q_sample(x.double(), torch.tensor([0, 1]), x, *coefs)
    assert calls == [1]


def test_channels_last_in_gives_channels_last_out_without_a_copy(coefs, monkeypatch):
    x0 = make((3, 4, 5, 6), torch.float32, "channels_last")
    noise = make((3, 4, 5, 6), torch.float32, "channels_last")
    t = torch.tensor([0, 300, 999])
    out = kernels.q_sample(x0, t, noise, *coefs)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    torch.testing.assert_close(out, reference.q_sample(x0, t, noise, *coefs), **TOL[torch.float32])
    copies = []
    real = q_sample_module.as_rows
    monkeypatch.setattr(q_sample_module, "as_rows", lambda x, order=None: copies.append(
        real(x, order).data_ptr() != x.data_ptr()) or real(x, order))  # fmt: skip
    kernels.q_sample(x0, t, noise, *coefs)
    assert copies == [False, False, False]  # x0, noise and the output are walked in place


def test_every_gather_is_bounded_without_the_check(coefs):
    """A schedule shorter than t: checked, both paths refuse it; unchecked (what the samplers
    pass inside their loops), both clamp t into the schedule: never a read out of bounds."""
    x = torch.randn(2, 3, 4, 4)
    short = (coefs[0][:10], coefs[1][:10])
    t = torch.tensor([3, 999])
    for op in (kernels.q_sample, reference.q_sample):
        with pytest.raises(ValueError, match="^t must lie in \\[0, 10\\)"):
            op(x, t, x, *short)
    fused = kernels.q_sample(x, t, x, *short, check_t=False)
    torch.testing.assert_close(fused, reference.q_sample(x, t, x, *short, check_t=False))
    torch.testing.assert_close(fused[1], (short[0][9] + short[1][9]) * x[1])  # t = 999 read as t = 9
    torch.testing.assert_close(kernels.q_sample(x, torch.tensor([-5, 2]), x, *short, check_t=False)[0],
                               (short[0][0] + short[1][0]) * x[0])  # fmt: skip


def test_empty_batch(coefs):
    x = torch.randn(0, 3, 4, 4)
    assert kernels.q_sample(x, torch.zeros(0, dtype=torch.long), x, *coefs).shape == x.shape
