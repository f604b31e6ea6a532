"""The fused ops as PyTorch custom ops: torch.library.opcheck on each (schema, fake kernel,
autograd registration, AOT dispatch with dynamic shapes), on both paths behind the op (the
Triton kernels on the tests' device, and the eager twins), and torch.compile(fullgraph=True)
of FastDDPM's loss and of the fused U-Net: no graph break, the same numbers as uncompiled."""

import pytest
import torch
from helpers import DEVICE
from torch.library import opcheck

import ddpm_fast.kernels  # noqa: F401  (registers torch.ops.ddpm_fast)
from ddpm_fast import FastDDPM, UNet, UNetConfig
from ddpm_fast.schedule import POSTERIOR_STEP_BUFFERS, make_betas, schedule_buffers

pytestmark = pytest.mark.on_device  # tensors on the tests' device (conftest.py)

ops = torch.ops.ddpm_fast
B = {name: buf.to(DEVICE) for name, buf in schedule_buffers(make_betas("linear", 20)).items()}
STEP = [B[n] for n in POSTERIOR_STEP_BUFFERS]
TINY = UNetConfig(in_channels=3, image_size=8, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                  num_groups=4, dropout=0.0)  # fmt: skip


def g(*shape, dtype=torch.float32, grad=False, channels_last=False):
    x = torch.randn(*shape).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(grad)


CASES = {
    "q_sample": lambda: [(ops.q_sample, (g(2, 3, 4, 4, grad=True), torch.tensor([0, 19]), g(2, 3, 4, 4, grad=True),
                                         B["sqrt_alphas_cumprod"], B["sqrt_one_minus_alphas_cumprod"])),
                         (ops.q_sample, (g(2, 3, 4, 4, grad=True, channels_last=True), torch.tensor([3, 1]),
                                         g(2, 3, 4, 4, channels_last=True), B["sqrt_alphas_cumprod"],
                                         B["sqrt_one_minus_alphas_cumprod"])),
                         (ops.q_sample_backward, (g(2, 5), torch.tensor([1, 2]), B["sqrt_alphas_cumprod"],
                                                  B["sqrt_one_minus_alphas_cumprod"], torch.float32, torch.float16))],
    "posterior_step": lambda: [(ops.posterior_step, (g(2, 3, 4, 4), g(2, 3, 4, 4), torch.tensor([0, 7]), g(2, 3, 4, 4),
                                                     None, *STEP, "epsilon", True)),
                               (ops.ddim_step, (g(2, 3, 4, 4), g(2, 3, 4, 4), torch.tensor([9, 7]),
                                                torch.tensor([4, -1]), g(2, 3, 4, 4), None, B["alphas_cumprod"], 0.5,
                                                "v_prediction", True, False))],
    "group_norm": lambda: [(ops.group_norm_act, (g(2, 8, 3, 5, grad=True), 4, g(8, grad=True), g(8, grad=True), 1e-5,
                                                 g(2, 8, grad=True), True)),
                           (ops.group_norm_act, (g(2, 8, 3, 5, grad=True, channels_last=True), 2, g(8, grad=True),
                                                 g(8), 1e-6, None, False)),
                           (ops.group_norm_act, (g(2, 8, 3, 5, dtype=torch.float16, grad=True), 4, g(8), g(8), 1e-5,
                                                 g(2, 8, dtype=torch.float16, grad=True), True))],
    "attention": lambda: [(ops.attention, (g(2, 1, 9, 16, grad=True), g(2, 1, 9, 16, grad=True),
                                           g(2, 1, 9, 16, grad=True), 0.25)),
                          (ops.attention, tuple(t.unsqueeze(1) for t in g(2, 9, 48).chunk(3, -1)) + (0.25,))],
}  # fmt: skip


@pytest.mark.parametrize("path", ["triton", "eager"])
@pytest.mark.parametrize("op", CASES)
def test_opcheck(op, path, monkeypatch):
    monkeypatch.setenv("DDPM_FAST_KERNELS", path)
    for fn, args in CASES[op]():
        opcheck(fn, args)


def fused_model():
    torch.manual_seed(0)
    model = UNet(TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return FastDDPM(model, image_size=8, timesteps=20)


@pytest.mark.slow
@pytest.mark.parametrize("backend, path", [("aot_eager", "triton"), ("aot_eager", "eager"), ("inductor", "triton")])
def test_compiled_loss_has_no_graph_break_and_the_same_value(backend, path, monkeypatch):
    """torch.compile(FastDDPM(...).loss, fullgraph=True): t and the noise drawn inside, as in
    training (Inductor asked to draw them with torch's generator, so both runs see the same).
    Inductor is built once, on the Triton path: the ops are opaque to it on either path."""
    import torch._inductor.config

    monkeypatch.setenv("DDPM_FAST_KERNELS", path)
    ddpm = fused_model()
    x0 = torch.randn(2, 3, 8, 8)
    compiled = torch.compile(ddpm.loss, fullgraph=True, backend=backend)
    torch.manual_seed(1)
    expected = ddpm.loss(x0)
    expected.backward()
    grads = [p.grad.clone() for p in ddpm.parameters()]
    ddpm.zero_grad()
    torch.manual_seed(1)
    with torch._inductor.config.patch(fallback_random=True):
        got = compiled(x0)
    got.backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for p, e in zip(ddpm.parameters(), grads):
        torch.testing.assert_close(p.grad, e, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_compiled_unet_has_no_graph_break_and_the_same_output(monkeypatch):
    monkeypatch.setenv("DDPM_FAST_KERNELS", "triton")
    ddpm = fused_model().eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 17])
    compiled = torch.compile(ddpm.model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t), ddpm.model(x, t), rtol=1e-5, atol=1e-6)
