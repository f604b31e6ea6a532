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
