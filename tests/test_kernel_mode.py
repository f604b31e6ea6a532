"""The path switch shared by every fused op: DDPM_FAST_KERNELS=auto|eager|triton."""

import importlib

import pytest
import torch
from helpers import DEVICE, INTERPRETED

from ddpm_fast import kernels
from ddpm_fast.schedule import make_betas, schedule_buffers

common = importlib.import_module("ddpm_fast.kernels._common")
q_module = importlib.import_module("ddpm_fast.kernels.q_sample")
pytestmark = pytest.mark.on_device  # tensors on the tests' device (conftest.py)


@pytest.fixture
def launches(monkeypatch):
    calls = []
    real = q_module.q_sample_fwd
    monkeypatch.setattr(q_module, "q_sample_fwd", lambda *a: calls.append(1) or real(*a))
    b = schedule_buffers(make_betas("linear", 10))

    def run(device=None):
        """Launches so far, after one q_sample on `device` (default: the tests' device)."""
        device = device or DEVICE
        x = torch.randn(2, 3, device=device)
        coefs = (b["sqrt_alphas_cumprod"].to(device), b["sqrt_one_minus_alphas_cumprod"].to(device))
        kernels.q_sample(x, torch.tensor([1, 2], device=device), x, *coefs)
        return len(calls)

    return run


def test_auto_runs_triton_on_cuda_and_on_cpu_under_the_interpreter(monkeypatch, launches):
    monkeypatch.delenv("DDPM_FAST_KERNELS", raising=False)
    assert kernels.get_kernel_mode() == "auto"
    assert common.interpreter_on() == INTERPRETED  # the test device switch sets one or the other
    assert launches() == 1


def test_auto_runs_eager_on_cpu_without_the_interpreter(monkeypatch, launches):
    monkeypatch.delenv("DDPM_FAST_KERNELS", raising=False)
    monkeypatch.setattr(common, "INTERPRET", False)
    assert not kernels.use_triton(torch.device("cpu"))
    assert kernels.use_triton(torch.device("cuda"))
    assert launches(torch.device("cpu")) == 0


def test_eager_and_triton_modes(monkeypatch, launches):
    monkeypatch.setenv("DDPM_FAST_KERNELS", "triton")
    with kernels.kernel_mode("eager"):
        assert kernels.get_kernel_mode() == "eager"
        assert launches() == 0
    assert kernels.get_kernel_mode() == "triton"
    monkeypatch.setattr(common, "INTERPRET", False)
    assert kernels.use_triton(torch.device("cpu"))  # triton means triton, wherever the tensors are


def test_set_kernel_mode_sets_the_environment(monkeypatch):
    monkeypatch.setenv("DDPM_FAST_KERNELS", "auto")
    kernels.set_kernel_mode("eager")
    assert kernels.get_kernel_mode() == "eager"


def test_bad_modes_are_named(monkeypatch):
    with pytest.raises(ValueError, match="^mode must be one of"):
        kernels.set_kernel_mode("fast")
    monkeypatch.setenv("DDPM_FAST_KERNELS", "cuda")
    with pytest.raises(ValueError, match="^DDPM_FAST_KERNELS must be one of"):
        kernels.get_kernel_mode()


@pytest.mark.skipif(not INTERPRETED, reason="interpreter plans exist only under Triton's interpreter")
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_the_interpreters_plans_give_the_gpu_plans_results_with_fewer_programs(layout):
    """Under the interpreter GroupNorm takes every group of a sample in one program (and never
    splits a group for more programs): the same kernels at other grids and tiles, so forward and
    backward agree with the plans a GPU runs, with fewer programs launched."""
    gn_module = importlib.import_module("ddpm_fast.kernels.group_norm_silu")
    x = torch.randn(2, 24, 7, 5)  # 6 groups of 4 channels: a padded block of 8 groups
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    add, w, b = torch.randn(2, 24), torch.randn(24), torch.randn(24)
    dy = torch.randn(2, 24, 7, 5)

    def run():
        leaves = [t.clone().requires_grad_() for t in (x, w, b, add)]
        grid = gn_module._fwd_plan(leaves[0].detach(), 6, leaves[3].detach(), None).grid
        y = kernels.group_norm_silu(leaves[0], 6, leaves[1], leaves[2], add=leaves[3])
        y.backward(dy)
        return grid, [y.detach(), *(t.grad for t in leaves)]

    grid, got = run()
    with common.gpu_plans():
        gpu_grid, expected = run()
    assert grid == (2,) and gpu_grid[0] > 2  # one program per sample; a GPU's plan has more
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not INTERPRETED, reason="the interpreter's patching exists only under the interpreter")
def test_the_faster_interpreter_patches_once_per_launch_and_restores_triton_language():
    """speed_up_interpreter (conftest.py installs it): a launch patches triton.language, its
    helpers' calls do not patch again, and the launch restores what it patched."""
    import triton.language as tl
    from triton.runtime import interpreter

    assert getattr(interpreter._patch_lang, "_ddpm_fast_skip", False)
    load, sigmoid = tl.load, tl.sigmoid
    real, calls = interpreter._LangPatchScope, []

    class Counting(real):
        def set_attr(self, obj, name, value):
            calls.append(name)
            super().set_attr(obj, name, value)

    interpreter._LangPatchScope = Counting
    try:
        x = torch.randn(1, 8, 4, 4)
        y = kernels.group_norm_silu(x, 2)  # one program, ~10 helper calls
    finally:
        interpreter._LangPatchScope = real
    assert tl.load is load and tl.sigmoid is sigmoid
    assert 0 < calls.count("load") <= 2  # the launch's patch (and triton.language.core's, once)
    torch.testing.assert_close(y, torch.nn.functional.silu(torch.nn.functional.group_norm(x, 2)), rtol=1e-5, atol=1e-5)


def test_the_switch_is_read_at_every_call_in_any_spelling(monkeypatch):
    """get_kernel_mode reads os.environ's own mapping (the cheap read of the host path): a write to
    os.environ is seen by the next call; spaces and case as before; unset is auto."""
    monkeypatch.setenv("DDPM_FAST_KERNELS", "auto")  # recorded first, so the test leaves the variable as it was
    monkeypatch.delenv("DDPM_FAST_KERNELS")
    assert kernels.get_kernel_mode() == "auto"
    monkeypatch.setenv("DDPM_FAST_KERNELS", "eager")
    assert kernels.get_kernel_mode() == "eager"
    monkeypatch.setenv("DDPM_FAST_KERNELS", " Triton ")
    assert kernels.get_kernel_mode() == "triton"
    monkeypatch.setenv("DDPM_FAST_KERNELS", "")
    assert kernels.get_kernel_mode() == "auto"
    monkeypatch.delenv("DDPM_FAST_KERNELS")
    assert kernels.get_kernel_mode() == "auto"
    assert kernels.use_triton(torch.device("cpu")) == common.INTERPRET
