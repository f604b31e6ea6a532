"""FastDDPM against DDPM on the same weights, inputs and noise, on the tests' device (compiled
kernels on CUDA, Triton's interpreter on a CPU: see conftest.py)."""

import importlib
import io
import warnings

import pytest
import torch
from helpers import DEVICE, generator

from ddpm_fast import DDPM, FastDDPM, GroupNormSiLU, UNet, UNetConfig, diffusion, fuse

common = importlib.import_module("ddpm_fast.kernels._common")

pytestmark = pytest.mark.on_device  # tensors on the tests' device (conftest.py)

TINY = UNetConfig(in_channels=3, image_size=8, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                  num_groups=4, dropout=0.0)  # fmt: skip


def randomised_unet():
    model = UNet(TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return model


def pair(**kwargs):
    eager = DDPM(randomised_unet(), image_size=8, timesteps=100, **kwargs)
    fast = FastDDPM(UNet(TINY), image_size=8, timesteps=100, **kwargs)
    fast.load_state_dict(eager.state_dict())
    return eager, fast


@pytest.mark.slow
def test_same_loss_gradients_and_reverse_step():
    eager, fast = pair(prediction_type="v_prediction")
    x0, noise, t = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8), torch.tensor([0, 42, 99])
    results = []
    for ddpm in (fast, eager):
        loss = ddpm.loss(x0, t=t, noise=noise)
        loss.backward()
        grads = [p.grad for p in ddpm.model.parameters()]
        step = ddpm.p_sample(x0.clamp(-1, 1), t, noise=noise)
        results.append([loss.detach(), step, *grads])
    names = ["loss", "x_{t-1}"] + [n for n, _ in eager.model.named_parameters()]
    for name, f, e in zip(names, *results):
        torch.testing.assert_close(f, e, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    assert fast.fused and not eager.fused
    assert all(m.fused for m in fast.model.modules() if hasattr(m, "fused"))


def test_checkpoints_load_both_ways():
    eager, _ = pair()
    buf = io.BytesIO()
    torch.save(eager.state_dict(), buf)
    buf.seek(0)
    fast = FastDDPM(UNet(TINY), image_size=8, timesteps=100)
    fast.load_state_dict(torch.load(buf, weights_only=True))  # strict: same keys, same shapes
    back = DDPM(UNet(TINY), image_size=8, timesteps=100)
    back.load_state_dict(fast.state_dict())
    for (name, a), b in zip(eager.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name


def test_eager_fallback_warns_once(monkeypatch):
    monkeypatch.setattr(diffusion, "_WARNED", set())
    monkeypatch.setattr(common, "INTERPRET", False)
    monkeypatch.delenv("DDPM_FAST_KERNELS", raising=False)
    eager, fast = pair()
    x0, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    with pytest.warns(RuntimeWarning, match="running the eager PyTorch path") as record:
        fast.loss(x0, t=t)
        fast.p_sample(x0, t)
    assert len([w for w in record if "eager PyTorch path" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eager.loss(x0, t=t)  # the eager class never warns


def test_fuse_turns_group_norm_silu_pairs_into_the_fused_module():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1),
        torch.nn.GroupNorm(4, 16),
        torch.nn.SiLU(),
        torch.nn.Conv2d(16, 3, 1),
        torch.nn.GroupNorm(3, 3),  # not followed by SiLU: left alone
    )
    with torch.no_grad():
        model[1].weight.normal_(), model[1].bias.normal_()
    x = torch.randn(2, 3, 5, 5)
    before, keys = model(x), list(model.state_dict())
    assert fuse(model) == 1
    assert isinstance(model[1], GroupNormSiLU) and model[1].fused and isinstance(model[2], torch.nn.Identity)
    assert type(model[4]) is torch.nn.GroupNorm
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def test_fuse_switches_a_unet_in_place():
    model = UNet(TINY)
    params = {n: p for n, p in model.named_parameters()}
    assert fuse(model) > 0
    assert all(p is params[n] for n, p in model.named_parameters())
    with pytest.raises(TypeError, match="^model must be a torch.nn.Module"):
        fuse("unet")


@pytest.fixture
def kernels_on(monkeypatch):
    monkeypatch.setenv("DDPM_FAST_KERNELS", "triton")


def sampling_pair(**kwargs):
    eager, fast = pair(**kwargs)
    return eager.eval(), fast.eval()


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["sample", "ddim_eta1"])
def test_ddpm_and_fastddpm_give_the_same_images_for_the_same_generator(sampler, kernels_on):
    """One noise stream: x_T and every step's noise come from the generator in the same order on
    both paths, so whole runs agree to float32 rounding (kernels under the interpreter)."""
    eager, fast = sampling_pair()
    for ddpm in (eager, fast):
        ddpm.num_timesteps = 6  # the last 6 steps of the 100-step chain: a short whole run
    runs = []
    for ddpm in (fast, eager):
        g = generator(123)
        if sampler == "sample":
            runs.append(ddpm.sample(2, generator=g, progress=False))
        else:
            runs.append(ddpm.ddim_sample(2, steps=3, eta=1.0, generator=g, progress=False))
    assert (runs[0] - runs[1]).abs().max() < 2e-5
    g = generator(124)
    other = fast.sample(2, generator=g, progress=False) if sampler == "sample" else fast.ddim_sample(
        2, steps=3, eta=1.0, generator=g, progress=False)  # fmt: skip
    assert (other - runs[0]).abs().max() > 0.1


@pytest.mark.slow
def test_philox_noise_is_an_explicit_option_reproducible_with_itself(kernels_on):
    _, fast = sampling_pair()
    fast.num_timesteps = 2
    a, b, c = (fast.sample(2, generator=generator(s), progress=False, noise_source="philox")
               for s in (1, 1, 2))  # fmt: skip
    assert torch.equal(a, b) and not torch.allclose(a, c)
    with pytest.raises(ValueError, match="^noise_source must be one of"):
        fast.sample(1, noise_source="cuda")


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["sample", "ddim"])
def test_the_step_a_cuda_graph_captures_equals_the_plain_loop(sampler, kernels_on):
    """The graph path's step, run eagerly on its static buffers (what a CUDA graph records and
    replays), gives the plain loop's images and leaves the generator where the loop leaves it."""
    _, fast = sampling_pair()
    fast.num_timesteps = 4
    kind = "sampling" if sampler == "sample" else "ddim"
    outs, states = [], []
    for runner in (False, True):
        g = generator(9)
        x = fast._start(3, g, None)
        if sampler == "sample":
            steps = [(i, i - 1) for i in reversed(range(4))]

            def step(x, t, t_prev, gen):
                return fast._p_sample(x, t, None, True, gen)
        else:
            from ddpm_fast.diffusion import ddim_timesteps

            steps = ddim_timesteps(4, 2, "leading")

            def step(x, t, t_prev, gen):
                return fast._ops(x.device).ddim_step(x, fast._model(x, t), t, t_prev, None, fast.alphas_cumprod,
                                                      eta=1.0, generator=gen, check_t=False)  # fmt: skip

        outs.append(fast._loop(kind, step, x, steps, g, False, graph=False, options=(), runner=runner))
        states.append(g.get_state())
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    assert torch.equal(states[0], states[1])


def test_cuda_graph_option(kernels_on):
    _, fast = sampling_pair()
    fast.num_timesteps = 2
    with pytest.raises(ValueError, match="^cuda_graph must be"):
        fast.sample(1, cuda_graph="yes", progress=False)
    if DEVICE.type == "cpu":
        with pytest.raises(ValueError, match="^cuda_graph=True needs a CUDA device"):
            fast.sample(1, cuda_graph=True, progress=False)
        assert fast.sample(1, cuda_graph="auto", progress=False).shape == (1, 3, 8, 8)  # CPU: the plain loop
        assert len(fast._graphs) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="capturing a CUDA graph needs a CUDA device")
def test_cuda_graph_capture_replays_the_loop():
    """On CUDA: the captured loop equals the plain loop where the noise is the same (DDIM, eta
    0), is reproducible for the same generator, and keeps a bounded cache of graphs."""
    _, fast = sampling_pair()
    fast = fast.cuda()
    run = lambda graph, seed=0, eta=0.0: fast.ddim_sample(  # noqa: E731
        4, steps=10, eta=eta, generator=generator(seed), progress=False, cuda_graph=graph
    )
    torch.testing.assert_close(run(True), run(False), rtol=1e-5, atol=1e-5)
    assert torch.equal(run(True, 3, 1.0), run(True, 3, 1.0))
    assert len(fast._graphs) == 2
    dpm = lambda graph: fast.dpm_solver_sample(4, steps=5, generator=generator(1), progress=False,  # noqa: E731
                                               cuda_graph=graph)  # fmt: skip
    torch.testing.assert_close(dpm(True), dpm(False), rtol=1e-5, atol=1e-5)  # DPM-Solver++'s state in the graph
    torch.testing.assert_close(dpm(True), dpm(False), rtol=1e-5, atol=1e-5)  # and on a replay of the cached one
    for n in range(1, 8):
        fast.ddim_sample(n, steps=2, progress=False, cuda_graph=True)
    assert len(fast._graphs) <= 4


@pytest.mark.slow
def test_a_channels_last_unet_keeps_its_layout_and_makes_no_layout_copies(kernels_on):
    """model.to(memory_format=torch.channels_last): the fused path stays NHWC end to end (no
    aten copy of an activation anywhere in the forward) and computes what the NCHW model does."""
    from torch.utils._python_dispatch import TorchDispatchMode

    eager, fast = pair()
    nhwc = FastDDPM(UNet(TINY), image_size=8, timesteps=100)
    nhwc.load_state_dict(eager.state_dict())
    nhwc.to(memory_format=torch.channels_last)
    x0, noise, t = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8), torch.tensor([0, 42, 99])
    x_cl = x0.contiguous(memory_format=torch.channels_last)

    class Copies(TorchDispatchMode):
        copies: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._schema.name.split("::")[-1]
            if name in ("clone", "copy_", "_to_copy", "contiguous") and args[0].numel() > 100:
                self.copies.append(name)
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Copies() as mode:
        out = nhwc.model(x_cl, t)
    assert mode.copies == [] and out.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(out, fast.model(x0, t), rtol=1e-4, atol=1e-5)
    loss_nhwc = nhwc.loss(x_cl, t=t, noise=noise.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(loss_nhwc, fast.loss(x0, t=t, noise=noise), rtol=1e-4, atol=1e-6)
    step = nhwc.p_sample(x_cl, t, noise=noise)
    assert step.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(step, fast.p_sample(x0, t, noise=noise), rtol=1e-4, atol=1e-5)
