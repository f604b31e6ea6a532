"""The cheap host path: in eager mode with no gradient wanted, a fused op calls its launcher
directly (no torch.library dispatch) from a plan cached per metadata; elsewhere (a gradient
wanted, a dispatch mode, torch.compile) its custom op runs. Both give the same results, and bad
input is refused on every call, cached or not. Also the fused U-Net's fewer launches: one GEMM
for every block's time-embedding projection, cached concatenations in eval."""

import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ddpm_fast import FastDDPM, UNet, kernels
from ddpm_fast.schedule import POSTERIOR_STEP_BUFFERS, make_betas, schedule_buffers
from ddpm_fast.tools.launches import sampling_step_launches
from ddpm_fast.unet import ConcatCache

pytestmark = pytest.mark.on_device

gn_module = importlib.import_module("ddpm_fast.kernels.group_norm_silu")
attention_module = importlib.import_module("ddpm_fast.kernels.attention")
plan_module = importlib.import_module("ddpm_fast.kernels.attention_plan")
step_module = importlib.import_module("ddpm_fast.kernels.posterior_step")
ddim_module = importlib.import_module("ddpm_fast.kernels.ddim_step")


@pytest.fixture(autouse=True)
def _triton_path(monkeypatch):
    monkeypatch.setenv("DDPM_FAST_KERNELS", "triton")


def _ops():
    """(name, direct call, the same through the custom op, the custom op's attribute) per op."""
    x = torch.randn(2, 8, 5, 3).contiguous(memory_format=torch.channels_last)
    add = torch.randn(4, 8)[::2]  # a strided add
    w, b = torch.rand(8) + 0.5, torch.randn(8)
    q, k, v = (t.unsqueeze(1) for t in torch.randn(2, 20, 3 * 16).chunk(3, dim=-1))
    bufs = {n: t.to(x.device) for n, t in schedule_buffers(make_betas("linear", 50)).items()}
    step = [bufs[n] for n in POSTERIOR_STEP_BUFFERS]
    x_t, eps, z = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4).transpose(-1, -2)
    t = torch.tensor([0, 7, 49])
    t_prev = (t - 3).clamp(min=-1)
    abar = bufs["alphas_cumprod"]
    return [
        ("group_norm_silu", lambda: kernels.group_norm_silu(x, 4, w, b, 1e-6, add=add),
         lambda: gn_module.group_norm_act_op(x, 4, w, b, 1e-6, add, True)[0]),
        ("attention", lambda: kernels.attention(q, k, v), lambda: attention_module.attention_op(q, k, v, 0.25)[0]),
        ("posterior_step", lambda: kernels.posterior_step(x_t, eps, t, z, *step),
         lambda: step_module.posterior_step_op(x_t, eps, t, z, None, *step, "epsilon", True)),
        ("ddim_step", lambda: kernels.ddim_step(x_t, eps, t, t_prev, z, abar, eta=0.5),
         lambda: ddim_module.ddim_step_op(x_t, eps, t, t_prev, z, None, abar, 0.5, "epsilon", True, False)),
    ]  # fmt: skip


class _Seen(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func._schema.name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("op", range(4), ids=["group_norm_silu", "attention", "posterior_step", "ddim_step"])
def test_direct_and_custom_op_paths_agree(op):
    name, direct, custom = _ops()[op]
    with torch.no_grad():
        first, again, through_op = direct(), direct(), custom()  # again: from the cached plan
    assert torch.equal(first, through_op) and torch.equal(again, through_op)
    assert first.stride() == through_op.stride()
    with torch.no_grad(), _Seen() as mode:  # a dispatch mode sees the custom op: not the direct path
        seen = direct()
    assert any(n.startswith("ddpm_fast::") for n in mode.ops), mode.ops
    assert torch.equal(seen, through_op)


def test_eager_no_grad_calls_skip_the_custom_op(monkeypatch):
    calls = []
    real = gn_module.group_norm_act_op
    monkeypatch.setattr(gn_module, "group_norm_act_op", lambda *a: calls.append(1) or real(*a))
    x, w = torch.randn(2, 8, 4, 4), torch.ones(8)
    with torch.no_grad():
        kernels.group_norm_silu(x, 4, w, w)
    assert not calls
    kernels.group_norm_silu(x, 4, w.clone().requires_grad_(), w)  # a gradient wanted: autograd's formula
    assert calls == [1]


def test_bad_input_is_refused_on_every_call():
    x, w = torch.randn(2, 8, 4, 4), torch.ones(8)
    with torch.no_grad():
        kernels.group_norm_silu(x, 4, w, w)  # a cached plan for this metadata
        for _ in range(2):
            with pytest.raises(ValueError, match="add must have shape"):
                kernels.group_norm_silu(x, 4, w, w, add=torch.randn(2, 4))
            with pytest.raises(ValueError, match="num_groups"):
                kernels.group_norm_silu(x, 3, w, w)
            with pytest.raises(ValueError, match="num_groups"):
                kernels.group_norm_silu(x, 4.0, w, w)  # 4.0 == 4 as a dict key: the type is in the key too
            with pytest.raises(TypeError, match="scale"):
                kernels.attention(*torch.randn(3, 1, 1, 8, 4), scale=float("nan"))
        bufs = schedule_buffers(make_betas("linear", 10))
        step = [bufs[n] for n in POSTERIOR_STEP_BUFFERS]
        kernels.posterior_step(x, x, torch.tensor([1, 2]), x, *step)
        for _ in range(2):  # the value check is per call, cached plan or not
            with pytest.raises(ValueError, match="t"):
                kernels.posterior_step(x, x, torch.tensor([1, 10]), x, *step)
            with pytest.raises(ValueError, match="go together"):  # the same key, one argument more
                kernels.posterior_step(x, x, torch.tensor([1, 2]), x, *step, max_log_variance=bufs["log_betas"])


def test_cached_launch_arguments_follow_every_option():
    """The launch's arguments after its tensors (sizes, strides, constexprs: _tail) are cached per
    call key: calls on the same tensors that differ only in an option or a schedule buffer, in turn
    and again, each give the eager twin's result (one missing from the key would replay the
    previous call's)."""
    from ddpm_fast import reference

    bufs = schedule_buffers(make_betas("linear", 50))
    step = [bufs[n] for n in POSTERIOR_STEP_BUFFERS]
    x_t, out, z = torch.randn(3, 2, 4, 4) * 2, torch.randn(3, 2, 4, 4) * 2, torch.randn(3, 2, 4, 4)
    t, t_prev = torch.tensor([1, 20, 49]), torch.tensor([0, 10, 40])
    posterior = [dict(prediction_type=p, clip_denoised=c) for p in ("epsilon", "v_prediction") for c in (True, False)]
    ddim = [dict(eta=e, clip_denoised=c, use_clipped_model_output=u) for e in (0.0, 0.7) for c in (True, False)
            for u in (False, True)]  # fmt: skip
    with torch.no_grad():
        for options in posterior * 2:
            got = kernels.posterior_step(x_t, out, t, z, *step, **options)
            want = reference.posterior_step(x_t, out, t, z, *step, **options)
            torch.testing.assert_close(got, want, msg=lambda m, o=options: f"{o}: {m}")
        for options in ddim * 2:
            got = kernels.ddim_step(x_t, out, t, t_prev, z, bufs["alphas_cumprod"], **options)
            want = reference.ddim_step(x_t, out, t, t_prev, z, bufs["alphas_cumprod"], **options)
            torch.testing.assert_close(got, want, msg=lambda m, o=options: f"{o}: {m}")
        # a schedule that shares its first buffer with the other: the call found by the key is
        # used only with the very buffers it holds
        for i in range(1, 5):  # each of the others changed alone
            other = [b * 0.9 if j == i else b for j, b in enumerate(step)]
            for buffers in (step, other, step, other):
                got = kernels.posterior_step(x_t, out, t, z, *buffers)
                torch.testing.assert_close(got, reference.posterior_step(x_t, out, t, z, *buffers))
        x, w, b = torch.randn(2, 8, 4, 4), torch.rand(8) + 0.5, torch.randn(8)
        for silu, eps in [(True, 1e-5), (False, 1e-5), (True, 1e-2), (False, 1e-2)] * 2:
            fused = kernels.group_norm_silu if silu else kernels.group_norm
            eager = reference.group_norm_silu if silu else reference.group_norm
            torch.testing.assert_close(fused(x, 4, w, b, eps), eager(x, 4, w, b, eps))


def test_concat_cache_follows_the_weights():
    a, b = torch.randn(3, 2), torch.randn(1, 2)
    cache = ConcatCache()
    with torch.no_grad():
        first = cache([a, b])
        assert cache([a, b]) is first  # cached in eval
        a.add_(1.0)  # an in-place update (an optimizer step, an EMA update, load_state_dict)
        assert torch.equal(cache([a, b]), torch.cat([a, b]))
    p = a.clone().requires_grad_()
    out = cache([p, b])
    assert out.requires_grad  # training: concatenated per call, the gradient reaches each part
    out.sum().backward()
    assert torch.equal(p.grad, torch.ones_like(p))


def _tiny_unet():
    return UNet(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), num_groups=4, image_size=16,
                dropout=0.0)  # fmt: skip


@pytest.mark.slow
def test_fused_unet_projects_every_time_embedding_in_one_gemm():
    torch.manual_seed(0)
    model = _tiny_unet()
    with torch.no_grad():  # off the zero init of the last layers, so that every weight gets a gradient
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    keys = list(model.state_dict())
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    with torch.no_grad():
        eager = model(x, t)
        model.set_fused(True)
        fused = model(x, t)
        fused_again = model(x, t)
    assert list(model.state_dict()) == keys  # per-block temb_proj weights kept
    torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-4)
    assert torch.equal(fused, fused_again)
    # training: every block's projection gets its gradient through the one GEMM
    model(x, t).square().mean().backward()
    blocks = model._res_blocks()
    assert len(blocks) == len({id(b) for b in blocks}) == sum(1 for m in model.modules() if hasattr(m, "temb_proj"))
    assert all(b.temb_proj.weight.grad is not None and b.temb_proj.weight.grad.abs().sum() > 0 for b in blocks)


@pytest.mark.on_cpu
def test_batch1_sampling_step_launches_at_most_200_kernels():
    """The paper's 35.7M U-Net, one DDPM sampling step at batch 1, fused: Triton kernels plus ATen
    ops that launch a kernel, counted with every Triton launch stubbed (ddpm_fast.tools.launches)."""
    fused, eager = sampling_step_launches(1, fused=True), sampling_step_launches(1, fused=False)
    assert fused["total"] <= 200, fused
    assert fused["triton_kernels"]["_gn_silu_fwd_fused_kernel"] == 51  # every GroupNorm one kernel
    assert "_gn_stats_kernel" not in fused["triton_kernels"]
    assert eager["total"] > 300 and eager["triton"] == 0


@pytest.mark.slow
def test_fast_ddpm_samples_the_same_after_the_weights_change():
    """Cached concatenations never serve stale weights: sampling after an in-place weight update
    matches a fresh model with those weights."""
    torch.manual_seed(0)
    ddpm = FastDDPM(_tiny_unet(), image_size=16, timesteps=20, beta_schedule="cosine").eval()
    ddpm.ddim_sample(2, steps=2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in ddpm.parameters():
            p.add_(0.01 * torch.randn_like(p))
    after = ddpm.ddim_sample(2, steps=2, generator=torch.Generator().manual_seed(1))
    fresh = FastDDPM(_tiny_unet(), image_size=16, timesteps=20, beta_schedule="cosine").eval()
    fresh.load_state_dict(ddpm.state_dict())
    expected = fresh.ddim_sample(2, steps=2, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(after, expected)


def test_attention_tuning_is_kept_on_disk_and_ignores_the_batch(monkeypatch):
    """The autotuner's key names what changes the best tile (tokens, head dims, their strides;
    Triton adds the dtypes), never the batch or the heads, and its choice is cached on disk."""
    import triton

    assert plan_module._TUNING_KEY == ["L", "D", "DV", "stride_qd", "stride_kd", "stride_vd"]
    monkeypatch.setattr(triton.knobs.runtime, "interpret", False)  # the interpreter turns the disk cache off
    tuned = plan_module._autotuned(attention_module._attn_fwd, plan_module.FWD_CONFIGS)
    assert tuned.cache_results and tuned.keys == plan_module._TUNING_KEY
