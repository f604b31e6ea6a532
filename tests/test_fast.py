"""FastDDPM against DDPM on the same weights, inputs and noise, under Triton's interpreter."""

import importlib
import io
import warnings

import pytest
import torch

from ddpm_fast import DDPM, FastDDPM, GroupNormSiLU, UNet, UNetConfig, fuse

common = importlib.import_module("ddpm_fast.kernels._common")

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
