"""The traffic counter behind the README's table: it counts what it should."""

import torch

from ddpm_fast import UNetConfig
from ddpm_fast.tools import traffic
from ddpm_fast.tools.traffic import count_eager


def test_counts_kernels_and_bytes_and_ignores_views():
    x, y = torch.randn(1000), torch.randn(1000)
    t = count_eager(lambda: (x + y).view(10, 100).t().contiguous())
    assert t.kernels == 2  # the add and the copy; view and transpose move nothing
    assert t.read == 8000 + 4000 and t.written == 4000 + 4000


def test_argument_checks_are_not_counted():
    from ddpm_fast import reference
    from ddpm_fast.schedule import make_betas, schedule_buffers

    b = schedule_buffers(make_betas("linear", 10))
    x, t = torch.randn(4, 3, 5, 5), torch.tensor([0, 1, 2, 3])
    counted = count_eager(
        lambda: reference.q_sample(x, t, x, b["sqrt_alphas_cumprod"], b["sqrt_one_minus_alphas_cumprod"])
    )
    assert counted.kernels == 5  # two gathers, two multiplies, one add: no min/max/item
    assert counted.written == 3 * x.numel() * 4 + 2 * 4 * 4


def test_fused_design_moves_less_than_eager_for_each_op():
    for name, eager, fused in traffic.op_rows():
        assert fused.kernels <= eager.kernels, name
        if not name.startswith("attention bwd"):
            assert fused.read + fused.written < 0.5 * (eager.read + eager.written), name
        else:
            assert fused.read + fused.written < eager.read + eager.written, name


def test_sampling_step_of_a_small_unet():
    cfg = UNetConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), num_groups=8, image_size=32)
    name, eager, fused = traffic.sampling_step_row(batch=2, config=cfg)
    assert "batch 2" in name
    assert fused.kernels < eager.kernels and fused.read + fused.written < eager.read + eager.written
