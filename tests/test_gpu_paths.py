"""What a first GPU user meets beyond the kernels' arithmetic: models in float16 / bfloat16, TF32
switched on with torch's new API, tensors on a GPU other than the current one, short schedules.
Each case here failed before its fix; the device cases run with a mock of the current CUDA
device, so they run (and fail if broken) on a CPU too."""

import contextlib
import importlib
import warnings

import pytest
import torch
from helpers import DEVICE, INTERPRETED

from ddpm_fast import DDPM, FastDDPM, UNet, UNetConfig, graphs, kernels
from ddpm_fast.schedule import POSTERIOR_STEP_BUFFERS, make_betas, schedule_buffers

common = importlib.import_module("ddpm_fast.kernels._common")
attention_module = importlib.import_module("ddpm_fast.kernels.attention")
plan_module = importlib.import_module("ddpm_fast.kernels.attention_plan")

pytestmark = pytest.mark.on_device  # tensors on the tests' device (conftest.py)

TINY = UNetConfig(in_channels=3, image_size=8, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                  num_groups=4, dropout=0.0)  # fmt: skip


def models(cls, dtype):
    """The same randomised weights as a float32 eager DDPM and as a `dtype` `cls` one (.to(dtype))."""
    torch.manual_seed(0)
    ref = DDPM(UNet(TINY), image_size=8, timesteps=4, beta_schedule="cosine")
    with torch.no_grad():
        for p in ref.model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    half = cls(UNet(TINY), image_size=8, timesteps=4, beta_schedule="cosine")
    half.load_state_dict(ref.state_dict())
    return ref, half.to(dtype)


# -- float16 / bfloat16 models ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("cls", [DDPM, FastDDPM])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_sample_and_train(cls, dtype):
    """`DDPM(model).to(torch.bfloat16)` samples (DDPM and DDIM) and trains: the model runs in its
    dtype, the schedule and the sampler's arithmetic stay float32, and the results are those of
    the float32 model up to the half-precision model's own rounding."""
    ref, half = models(cls, dtype)
    assert half.model.conv_in.weight.dtype == dtype
    assert all(half.get_buffer(name).dtype == torch.float32 for name in ("betas", *POSTERIOR_STEP_BUFFERS))
    torch.testing.assert_close(half.sqrt_recip_alphas_cumprod, ref.sqrt_recip_alphas_cumprod, rtol=0, atol=0)
    tol = dict(rtol=0.05, atol=0.05)
    for run in (
        lambda d: d.sample(2, generator=torch.Generator(DEVICE).manual_seed(1), progress=False),
        lambda d: d.ddim_sample(2, steps=2, eta=0.5, generator=torch.Generator(DEVICE).manual_seed(1), progress=False),
    ):
        expected, got = run(ref), run(half)
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        torch.testing.assert_close(got, expected, **tol)
    x0, t, noise = torch.randn(2, 3, 8, 8), torch.tensor([0, 3]), torch.randn(2, 3, 8, 8)
    loss = half.loss(x0, t=t, noise=noise)
    loss.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref.loss(x0, t=t, noise=noise), **tol)
    grads = [p.grad for p in half.model.parameters()]
    assert all(g is not None and g.dtype == dtype and torch.isfinite(g).all() for g in grads)
    step = half.p_sample(x0.to(dtype), t, noise=noise)  # half images in, float32 out
    assert step.dtype == torch.float32


# -- TF32 through torch's new API --------------------------------------------------------------------


@pytest.fixture
def precision_flags():
    """Puts torch's float32 matmul precision back as it was (every supported torch, 2.11 on, has the new API)."""
    matmul = torch.backends.cuda.matmul
    saved = (torch.backends.fp32_precision, matmul.fp32_precision)
    yield matmul
    torch.backends.fp32_precision, matmul.fp32_precision = saved


@pytest.mark.parametrize(
    "how, tf32",
    [("torch.backends.fp32_precision", True), ("matmul.fp32_precision", True), ("matmul ieee", False),
     ("legacy allow_tf32", True), ("legacy off", False)],
)  # fmt: skip
def test_tf32_set_through_either_api_is_read_and_breaks_nothing(precision_flags, how, tf32):
    """After `torch.backends.fp32_precision = "tf32"` torch refuses to read allow_tf32; attention and
    the CUDA-graph cache key read the setting through the new API, the legacy flag as a fallback."""
    matmul = precision_flags
    if how == "torch.backends.fp32_precision":
        torch.backends.fp32_precision = "tf32"
    elif how == "matmul.fp32_precision":
        matmul.fp32_precision = "tf32"
    elif how == "matmul ieee":
        matmul.fp32_precision = "ieee"
    else:
        matmul.allow_tf32 = how == "legacy allow_tf32"
    assert common.tf32_matmul() is tf32
    q = torch.randn(1, 1, 16, 32, requires_grad=True)
    kernels.attention(q, q, q).sum().backward()  # reading allow_tf32 here raised
    tf32_here = tf32 and not INTERPRETED  # the interpreter's dots are numpy's: it never asks for TF32
    # tensor cores at every head dim, forward and backward (3xTF32 runs the big ones chunked)
    assert attention_module._precision(torch.float32)[1] == ("tf32" if tf32_here else "tf32x3")
    ddpm = FastDDPM(UNet(TINY), image_size=8, timesteps=4, beta_schedule="cosine").eval()
    x = ddpm._start(2, None, None)
    ddpm._loop("ddim", lambda x, t, t_prev, gen: x * 0.5, x, [(3, 0), (0, -1)], None, False, False, (), runner=True)


# -- a tensor on another GPU than the current one ---------------------------------------------------


class FakeCuda:
    """torch.cuda's current device, and torch.cuda.device(...) switching it, for a machine that has
    no second GPU (or none): what Triton would launch on is `current`."""

    def __init__(self, monkeypatch, current=0):
        self.current = current
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "device", self.device)

    @contextlib.contextmanager
    def device(self, device):
        saved, self.current = self.current, torch.device(device).index
        try:
            yield
        finally:
            self.current = saved


def test_launch_device_makes_the_tensors_gpu_current(monkeypatch):
    cuda = FakeCuda(monkeypatch, current=0)
    with common.launch_device(torch.device("cuda", 1)):
        assert cuda.current == 1
    assert cuda.current == 0
    for device in (torch.device("cuda", 0), torch.device("cpu")):
        with common.launch_device(device):
            assert cuda.current == 0


def _launch_every_op(device):
    """Forward and backward of every fused op, on `device`."""
    b = {k: v.to(device) for k, v in schedule_buffers(make_betas("linear", 20)).items()}
    x = torch.randn(2, 8, 4, 4, device=device, requires_grad=True)
    t = torch.tensor([3, 9], device=device)
    kernels.q_sample(x, t, x, b["sqrt_alphas_cumprod"], b["sqrt_one_minus_alphas_cumprod"]).sum().backward()
    w = torch.ones(8, device=device, requires_grad=True)
    kernels.group_norm_silu(x, 4, w, w, add=torch.randn(2, 8, device=device)).sum().backward()
    q = torch.randn(1, 1, 16, 16, device=device, requires_grad=True)
    kernels.attention(q, q, q).sum().backward()
    with torch.no_grad():
        kernels.posterior_step(x, x, t, x, *(b[n] for n in POSTERIOR_STEP_BUFFERS))
        kernels.ddim_step(x, x, t, t - 2, x, b["alphas_cumprod"], eta=0.5)


def test_every_launch_happens_under_the_tensors_device(monkeypatch):
    """Each Triton launch (compiled or interpreted) of every op, forward and backward, runs inside
    launch_device(the tensor's device): on a GPU other than the current one the kernels run on
    the tensors' GPU, not on the current one."""
    from triton.runtime.jit import JITFunction

    entered, launched = [], []

    @contextlib.contextmanager
    def recording(device):
        entered.append(device)
        try:
            yield
        finally:
            entered.pop()

    monkeypatch.setattr(common, "launch_device", recording)
    kinds = [JITFunction]
    if INTERPRETED:
        from triton.runtime.interpreter import InterpretedFunction

        kinds.append(InterpretedFunction)
    for kind in kinds:
        real = kind.run

        def run(self, *args, _real=real, **kwargs):
            launched.append((self.fn.__name__, list(entered)))
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(kind, "run", run)
    _launch_every_op(DEVICE)
    names = {name for name, _ in launched}
    expected = {"_q_sample_fwd_kernel", "_q_sample_bwd_kernel", "_gn_silu_fwd_fused_kernel", "_gn_silu_bwd_kernel",
                "_attn_fwd_kernel", "_attn_bwd_dq_kernel", "_posterior_step_kernel", "_ddim_step_kernel"}  # fmt: skip
    assert expected <= names, expected - names
    outside = [name for name, stack in launched if [d.type for d in stack] != [DEVICE.type]]
    assert not outside, f"launched outside launch_device(tensor.device): {outside}"


def test_cuda_graphs_are_captured_and_replayed_on_the_inputs_device(monkeypatch):
    """StepRunner captures (side stream, warmup, torch.cuda.graph) and replays with the buffers' GPU
    current, with torch.cuda mocked: every stream, graph and replay is made on cuda:1 while cuda:0
    is the current device outside."""
    cuda = FakeCuda(monkeypatch, current=0)
    seen = []

    class Stream:
        def __init__(self, device=None):
            seen.append(("stream", cuda.current))

        def wait_stream(self, other):
            pass

    class Graph:
        def __init__(self):
            seen.append(("graph", cuda.current))

        def register_generator_state(self, gen):
            pass

        def replay(self):
            seen.append(("replay", cuda.current))

    @contextlib.contextmanager
    def current(*args, **kwargs):
        seen.append(("capture", cuda.current))
        yield

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream(device))
    monkeypatch.setattr(torch.cuda, "stream", current)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", current)
    runner = graphs.StepRunner(lambda x, t, t_prev, gen: x + 1, torch.zeros(2, 3))
    runner.device = torch.device("cuda", 1)  # as if x lived on the second GPU
    runner.capture()
    runner.run(5, 4)
    assert cuda.current == 0 and seen and all(where == 1 for _, where in seen), seen
    assert [what for what, _ in seen].count("replay") == 1


# -- autotuning never picks a configuration that spills ---------------------------------------------


def test_spilling_autotune_configs_are_pruned_on_a_gpu(monkeypatch):
    """On a GPU the attention autotuner compiles each candidate of the launch and drops those whose
    kernel spills (the driver's n_spills); where each one spills, all stay."""
    import triton

    class Compiled:
        def __init__(self, spills):
            self.n_spills = spills

        def _init_handles(self):
            pass

    class Kernel:
        def __init__(self, spilling):
            self.spilling, self.calls = spilling, []

        def warmup(self, *args, grid, **kwargs):
            self.calls.append((args, kwargs))
            return Compiled(8 if kwargs["BLOCK_M"] in self.spilling else 0)

    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": 32}, num_warps=4, num_stages=2) for m in (128, 64, 32)]
    named = {"Q_ptr": "q", "L": 49}
    monkeypatch.setattr(plan_module, "interpreter_on", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    kernel = Kernel(spilling={128, 32})
    kept = plan_module.spill_free(kernel, configs, named, {"BLOCK_D": 64, "grid": None, "warmup": False})
    assert [c.kwargs["BLOCK_M"] for c in kept] == [64]
    args, kwargs = kernel.calls[0]
    assert args == ("q", 49) and kwargs["BLOCK_D"] == 64 and "grid" not in kwargs and kwargs["num_warps"] == 4
    assert plan_module.spill_free(Kernel(spilling={128, 64, 32}), configs, named, {"BLOCK_D": 64}) == configs
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # no GPU: nothing compiled, nothing pruned
    assert plan_module.spill_free(Kernel(spilling={64}), configs, named, {"BLOCK_D": 64}) == configs


# -- short schedules --------------------------------------------------------------------------------


def test_a_schedule_that_leaves_signal_in_x_T_warns_with_the_value(monkeypatch):
    monkeypatch.setattr(importlib.import_module("ddpm_fast.diffusion"), "_WARNED", set())
    with pytest.warns(UserWarning, match=r"timesteps=100.*alphas_cumprod\[-1\] = 0\.364 > 0\.01.*0\.60 x_0.*cosine"):
        DDPM(UNet(TINY), image_size=8, timesteps=100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DDPM(UNet(TINY), image_size=8, timesteps=1000)
        DDPM(UNet(TINY), image_size=8, timesteps=100, beta_schedule="cosine")
