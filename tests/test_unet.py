import pytest
import torch

from ddpm_fast.unet import PRESETS, UNet, UNetConfig

pytestmark = pytest.mark.on_device  # tensors on the tests' device (conftest.py)

TINY = UNetConfig(in_channels=3, image_size=8, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                  num_groups=4, dropout=0.0)  # fmt: skip


def test_paper_cifar10_model_has_35_7m_parameters():
    model = UNet()  # Ho et al.'s CIFAR-10 configuration is the default
    assert model.config == PRESETS["cifar10"]
    assert sum(p.numel() for p in model.parameters()) == 35_746_307
    # Attention at 16x16: two blocks in the second level's down path, three in its up path, one in the middle.
    n_attn = sum(1 for name, _ in model.named_modules() if name.endswith(("attn.0", "attn.1", "attn.2", "attn_1")))
    assert n_attn == 6


@pytest.mark.parametrize("batch", [1, 3, 7])
def test_output_shape_for_odd_batches(batch):
    model = UNet(TINY)
    x = torch.randn(batch, 3, 8, 8)
    out = model(x, torch.randint(0, 1000, (batch,)))
    assert out.shape == x.shape and out.dtype == torch.float32


def test_other_image_sizes_and_channels():
    model = UNet(TINY, in_channels=1, out_channels=2, image_size=12)
    assert model(torch.randn(2, 1, 12, 12), torch.tensor([0, 999])).shape == (2, 2, 12, 12)


def test_output_starts_at_zero_and_moves():
    """Ho et al. zero-initialise the last conv: the untrained model predicts eps = 0, and one
    optimiser step changes that."""
    model = UNet(TINY)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    assert model(x, t).abs().max() == 0
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x, t).sub(x).pow(2).mean().backward()
    opt.step()
    assert model(x, t).abs().max() > 0


def test_bad_configuration_and_inputs():
    with pytest.raises(ValueError, match="image_size 30 must be divisible by 8"):
        UNet(image_size=30)
    with pytest.raises(ValueError, match="num_groups"):
        UNet(TINY, num_groups=5)
    # zero or negative sizes: a ZeroDivisionError traceback from inside the model before
    for name, value in (("num_groups", 0), ("ch", 0), ("ch", -32), ("image_size", 0), ("in_channels", 0),
                        ("num_res_blocks", -1), ("num_groups", 2.0)):  # fmt: skip
        with pytest.raises(ValueError, match=f"^{name} must be "):
            UNet(TINY, **{name: value})
    with pytest.raises(ValueError, match="^norm_eps must be positive"):
        UNet(TINY, norm_eps=float("nan"))
    model = UNet(TINY)
    with pytest.raises(ValueError, match="^x must have shape \\(B, 3, H, W\\)"):
        model(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="divisible by 2"):
        model(torch.randn(2, 3, 9, 9), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="^t must have shape \\(2,\\)"):
        model(torch.randn(2, 3, 8, 8), torch.tensor([1]))


def test_state_dict_names_follow_the_papers_code():
    keys = set(UNet(TINY).state_dict())
    for key in ("conv_in.weight", "down.0.block.0.norm1.weight", "down.0.downsample.conv.weight",
                "mid.attn_1.q.weight", "up.0.block.1.nin_shortcut.weight", "up.1.upsample.conv.weight",
                "norm_out.bias", "temb.0.weight"):  # fmt: skip
        assert key in keys, key


def test_fused_unet_matches_eager_with_the_same_parameters(monkeypatch):
    """One switch routes GroupNorm+SiLU (with the time-embedding add) and attention through the
    kernels; output and every parameter gradient match the eager model's."""
    monkeypatch.setenv("DDPM_FAST_KERNELS", "triton")
    model = UNet(TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 700])
    grad = torch.randn(2, 3, 8, 8)
    results = []
    for fused in (True, False):
        model.set_fused(fused)
        model.zero_grad()
        out = model(x, t)
        out.backward(grad)
        results.append([out.detach()] + [p.grad.clone() for p in model.parameters()])
    names = ["output"] + [n for n, _ in model.named_parameters()]
    for name, f, e in zip(names, *results):
        torch.testing.assert_close(f, e, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    assert "fused=True" in repr(model.set_fused(True).norm_out)
