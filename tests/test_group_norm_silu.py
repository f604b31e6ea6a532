"""kernels.group_norm_silu against F.group_norm + F.silu computed in float64, under Triton's interpreter."""

import importlib

import pytest
import torch
import torch.nn.functional as F
from helpers import DTYPES, TOL

from ddpm_fast import GroupNormSiLU, kernels, reference

gn_module = importlib.import_module("ddpm_fast.kernels.group_norm_silu")
plan_module = importlib.import_module("ddpm_fast.kernels.group_norm_plan")

# tensors on the tests' device; the grids and tiles a GPU runs, not the interpreter's (conftest.py)
pytestmark = [pytest.mark.on_device, pytest.mark.gpu_plans]

# (B, C, H, W, groups): the U-Net's shapes scaled down, and odd ones.
SHAPES = [
    (2, 64, 8, 8, 32),
    (2, 128, 16, 16, 32),
    (1, 6, 5, 7, 3),
    (3, 6, 5, 7, 3),
    (1, 32, 4, 4, 32),
    (7, 12, 3, 3, 4),
]


@pytest.fixture(autouse=True)
def _triton_path(monkeypatch):
    monkeypatch.setenv("DDPM_FAST_KERNELS", "triton")


def inputs(shape, dtype, with_add=True, loc=0.0, scale=1.0, memory_format=torch.contiguous_format):
    B, C, H, W, G = shape
    x = (torch.randn(B, C, H, W, dtype=torch.float64) * scale + loc).to(dtype).contiguous(memory_format=memory_format)
    w = (1 + 0.5 * torch.randn(C)).to(dtype)
    b = (0.5 * torch.randn(C)).to(dtype)
    a = torch.randn(B, C).to(dtype) if with_add else None
    return G, x, w, b, a


def run(op, G, x, w, b, a, grad, double=False):
    """Output and gradients (x, weight, bias, add) of op; double=True runs it on float64 copies."""
    leaves = [t if t is None else t.detach().to(torch.float64 if double else t.dtype).requires_grad_()
              for t in (x, w, b, a)]  # fmt: skip
    if double:
        leaves[0] = leaves[0].detach().contiguous().requires_grad_()
    out = op(leaves[0], G, leaves[1], leaves[2], 1e-5, leaves[3])
    if grad == "sum":
        out.sum().backward()
    else:
        out.backward(grad.to(out.dtype))
    return [out.detach()] + [None if t is None else t.grad for t in leaves]


def eager64(x, G, w, b, eps, a):
    if a is not None:
        x = x + a[:, :, None, None]
    return F.silu(F.group_norm(x, G, w, b, eps))


def assert_matches(fused, ref, dtype):
    tol = TOL[dtype]
    for name, f, r in zip(("y", "dx", "dweight", "dbias", "dadd"), fused, ref):
        if r is None:
            assert f is None, name
            continue
        # Sums over many values (dweight, dbias, dadd) carry a little more rounding.
        t = tol if name in ("y", "dx") else {k: 4 * v for k, v in tol.items()}
        torch.testing.assert_close(f.double(), r, **t, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("with_add", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_and_backward_match_float64(shape, dtype, with_add):
    G, x, w, b, a = inputs(shape, dtype, with_add)
    grad = torch.randn(x.shape)
    fused = run(kernels.group_norm_silu, G, x, w, b, a, grad)
    assert fused[0].dtype == dtype and fused[0].shape == x.shape
    assert_matches(fused, run(eager64, G, x, w, b, a, grad, double=True), dtype)


@pytest.mark.parametrize("split", [0, 1, 3, 8])
def test_every_forward_path(split, monkeypatch):
    """One kernel (split 0), and statistics over 1, 3 or 8 chunks of each group then the apply."""
    G, x, w, b, a = inputs((2, 16, 12, 10, 4), torch.float32)
    real = gn_module.group_norm_act_fwd
    monkeypatch.setattr(gn_module, "group_norm_act_fwd", lambda *args, **kw: real(*args, **kw, split=split))
    grad = torch.randn(x.shape)
    assert_matches(run(kernels.group_norm_silu, G, x, w, b, a, grad), run(eager64, G, x, w, b, a, grad, True),
                   torch.float32)  # fmt: skip


def test_groups_are_split_across_programs_only_where_it_pays():
    """The split path's second launch pays only for groups too big for one SM to stream in that
    time: the paper's U-Net (at most 16 KB per group) runs one kernel per GroupNorm at batch 1 too;
    a batch-1 256x256 map (1 MB groups) and groups that do not fit a tile are split."""
    cpu = torch.device("cpu")
    assert plan_module.forward_plan(1, 32, 4, 32 * 32, cpu)[0] == 0  # the U-Net's 32x32 level, batch 1
    assert plan_module.forward_plan(1, 32, 8, 4 * 4, cpu)[0] == 0  # tiny groups: one kernel
    assert plan_module.forward_plan(1, 32, 4, 256 * 256, cpu)[0] > 1  # 1 MB groups, 32 programs
    assert plan_module.forward_plan(128, 32, 4, 256 * 256, cpu)[0] == 1  # enough programs; no tile holds a group
    assert plan_module.forward_plan(128, 32, 4, 32 * 32, cpu)[0] == 0


def test_backward_over_groups_larger_than_a_tile(monkeypatch):
    monkeypatch.setattr(gn_module, "MAX_TILE_BWD", 64)  # forces the two-pass tile loop
    G, x, w, b, a = inputs((2, 8, 9, 11, 2), torch.float32)
    grad = torch.randn(x.shape)
    assert_matches(run(kernels.group_norm_silu, G, x, w, b, a, grad), run(eager64, G, x, w, b, a, grad, True),
                   torch.float32)  # fmt: skip


@pytest.mark.parametrize("split", [0, 2])
def test_large_mean_small_spread_stays_accurate(split, monkeypatch):
    """mean 1e3, std 1e-2: E[x^2] - E[x]^2 in float32 would lose every digit of the variance."""
    real = gn_module.group_norm_act_fwd
    monkeypatch.setattr(gn_module, "group_norm_act_fwd", lambda *args, **kw: real(*args, **kw, split=split))
    G, x, w, b, a = inputs((2, 64, 8, 8, 32), torch.float32, with_add=False, loc=1e3, scale=1e-2)
    grad = torch.randn(x.shape)
    fused = run(kernels.group_norm_silu, G, x, w, b, a, grad)
    ref = run(eager64, G, x, w, b, a, grad, double=True)
    # Statistics of x - pivot keep float32's usual accuracy here (torch's own float32
    # GroupNorm is off by about 2e-3 relative on these inputs).
    assert_matches(fused, ref, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_channels_last(dtype):
    G, x, w, b, a = inputs((2, 64, 8, 8, 32), dtype, memory_format=torch.channels_last)
    assert not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    grad = torch.randn(x.shape)
    fused = run(kernels.group_norm_silu, G, x, w, b, a, grad)
    assert fused[0].is_contiguous(memory_format=torch.channels_last)
    assert_matches(fused, run(eager64, G, x, w, b, a, grad, double=True), dtype)


@pytest.mark.parametrize("grad_kind", ["sum", "strided", "channels_last"])
def test_non_contiguous_upstream_gradients(grad_kind):
    G, x, w, b, a = inputs((3, 6, 5, 7, 3), torch.float32)
    if grad_kind == "strided":
        grad = torch.randn(3, 6, 5, 14)[..., ::2]
    elif grad_kind == "channels_last":
        grad = torch.randn(x.shape).contiguous(memory_format=torch.channels_last)
    else:
        grad = "sum"
    assert grad == "sum" or not grad.is_contiguous()
    assert_matches(run(kernels.group_norm_silu, G, x, w, b, a, grad), run(eager64, G, x, w, b, a, grad, True),
                   torch.float32)  # fmt: skip


def test_non_contiguous_input():
    G, x, w, b, a = inputs((3, 6, 5, 14, 3), torch.float32)
    x = x[..., ::2]
    grad = torch.randn(x.shape)
    assert_matches(run(kernels.group_norm_silu, G, x, w, b, a, grad), run(eager64, G, x, w, b, a, grad, True),
                   torch.float32)  # fmt: skip


@pytest.mark.parametrize("add_kind", ["column_slice", "expanded", "transposed"])
def test_non_contiguous_add_is_read_with_its_strides(add_kind):
    """The time embedding's add as the U-Net may hand it over: a column slice of a wider
    projection, one row broadcast over the batch, a transposed view."""
    G, x, w, b, _ = inputs((3, 6, 5, 7, 3), torch.float32, with_add=False)
    if add_kind == "column_slice":
        a = torch.randn(3, 10)[:, 2:8]
    elif add_kind == "expanded":
        a = torch.randn(1, 6).expand(3, 6)
    else:
        a = torch.randn(6, 3).t()
    assert not a.is_contiguous()
    grad = torch.randn(x.shape)
    fused = run(kernels.group_norm_silu, G, x, w, b, a, grad)
    assert_matches(fused, run(eager64, G, x, w, b, a, grad, double=True), torch.float32)


def group_norm64(x, G, w, b, eps, a=None):
    return F.group_norm(x, G, w, b, eps)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_group_norm_without_the_activation(dtype, memory_format):
    """The attention block's GroupNorm: the same kernels with SiLU off."""
    G, x, w, b, _ = inputs((2, 32, 6, 5, 8), dtype, with_add=False, memory_format=memory_format)
    grad = torch.randn(x.shape)
    op = lambda x, G, w, b, eps, a: kernels.group_norm(x, G, w, b, eps)  # noqa: E731
    fused = run(op, G, x, w, b, None, grad)
    assert fused[0].is_contiguous(memory_format=memory_format)
    assert_matches(fused, run(group_norm64, G, x, w, b, None, grad, double=True), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(2, 64, 8, 8, 32), (3, 24, 5, 7, 4), (2, 48, 4, 4, 16)], ids=str)
def test_channels_last_is_read_nhwc_native(shape, dtype, monkeypatch):
    """NHWC: several groups per program so that a pixel's slice is long; no layout copy of x,
    y, dy or dx; every plan (groups in one tile, split statistics, looped backward) exact."""
    G, x, w, b, a = inputs(shape, dtype, memory_format=torch.channels_last)
    C = shape[1]
    assert plan_module.group_block(G, C // G, shape[2] * shape[3], 1, x.element_size()) > 1
    grad = torch.randn(x.shape).contiguous(memory_format=torch.channels_last)
    reshapes = []
    real = gn_module._as_bchw
    monkeypatch.setattr(gn_module, "_as_bchw", lambda t: reshapes.append(real(t).data_ptr() == t.data_ptr()) or real(t))
    fused = run(kernels.group_norm_silu, G, x, w, b, a, grad)
    assert all(reshapes) and len(reshapes) == 3  # x, dy, dx backward: views, not copies
    assert not plan_module._FwdPlan(x, G, a, None).copy_x  # the forward passes x and y as they lie
    assert fused[0].is_contiguous(memory_format=torch.channels_last)
    assert fused[1].is_contiguous(memory_format=torch.channels_last)
    expected = run(eager64, G, x, w, b, a, grad, double=True)
    assert_matches(fused, expected, dtype)
    monkeypatch.setattr(gn_module, "MAX_TILE_BWD", 64)  # the looped backward, several groups per program
    real_fwd = gn_module.group_norm_act_fwd
    monkeypatch.setattr(gn_module, "group_norm_act_fwd", lambda *args, **kw: real_fwd(*args, **kw, split=3))
    assert_matches(run(kernels.group_norm_silu, G, x, w, b, a, grad), expected, dtype)


def test_every_unet_group_stays_on_chip_in_the_backward():
    """Every GroupNorm of the paper's U-Net, NCHW and NHWC, fp32 and half: forward and backward
    hold the whole group (block) in one tile, so x and dy are read once."""
    from ddpm_fast.tools.aot import UNET_GROUP_NORMS

    for channels, size in UNET_GROUP_NORMS:
        cpg, hw = channels // 32, size * size
        for stride_c in (hw, 1):
            for element_size in (4, 2):
                gb = plan_module.group_block(32, cpg, hw, stride_c, element_size)
                for max_tile in (plan_module.MAX_TILE_FWD, gn_module.MAX_TILE_BWD):
                    block_c, block_hw = plan_module._tile(gb, cpg, hw, max_tile)
                    assert block_hw >= hw, (channels, size, stride_c, element_size)


def test_backward_reduces_the_parameter_gradients_in_one_kernel(monkeypatch):
    """dgamma and dbeta: one small deterministic kernel for both, no torch.sum launches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        seen: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(func._schema.name)
            return func(*args, **(kwargs or {}))

    G, x, w, b, a = inputs((3, 16, 6, 6, 4), torch.float32)
    x, w, b, a = (t.requires_grad_() for t in (x, w, b, a))
    y = kernels.group_norm_silu(x, G, w, b, 1e-5, add=a)
    launches = []
    real = gn_module._gn_param_grad_kernel
    monkeypatch.setattr(
        gn_module,
        "_gn_param_grad_kernel",
        type(
            "K",
            (),
            {"__getitem__": lambda self, grid: lambda *args, **kw: launches.append(grid) or real[grid](*args, **kw)},
        )(),
    )
    with Ops() as mode:
        y.backward(torch.randn(y.shape))
    assert not [n for n in mode.seen if n.endswith(("sum", "sum.dim_IntList"))], mode.seen
    assert len(launches) == 1 and w.grad is not None and b.grad is not None


def test_backward_is_deterministic():
    G, x, w, b, a = inputs((3, 16, 6, 6, 4), torch.float32)
    grad = torch.randn(x.shape)
    first, second = run(kernels.group_norm_silu, G, x, w, b, a, grad), run(kernels.group_norm_silu, G, x, w, b, a, grad)
    for f, s in zip(first, second):
        assert torch.equal(f, s)


def test_module_is_a_drop_in_for_group_norm_then_silu():
    gn = torch.nn.GroupNorm(8, 32)
    with torch.no_grad():
        gn.weight.normal_(), gn.bias.normal_()
    fused = GroupNormSiLU(8, 32)
    fused.load_state_dict(gn.state_dict())
    fused.fused = True
    x = torch.randn(2, 32, 5, 5)
    torch.testing.assert_close(fused(x), F.silu(gn(x)), rtol=1e-5, atol=1e-5)
    plain = GroupNormSiLU(8, 32, eps=1e-6, affine=False)
    plain.fused = True
    assert plain.weight is None and len(plain.state_dict()) == 0
    torch.testing.assert_close(plain(x), F.silu(F.group_norm(x, 8, eps=1e-6)), rtol=1e-5, atol=1e-5)


def test_bad_inputs_name_the_argument():
    x = torch.randn(2, 6, 4, 4)
    with pytest.raises(ValueError, match="^num_groups must be a positive int dividing the 6 channels"):
        kernels.group_norm_silu(x, 4)
    with pytest.raises(ValueError, match="^x must have at least 3 dimensions"):
        kernels.group_norm_silu(x[0, 0], 1)
    with pytest.raises(ValueError, match="^weight must have 6 elements"):
        kernels.group_norm_silu(x, 3, torch.ones(5), torch.zeros(6))
    with pytest.raises(ValueError, match="^add must have shape \\(2, 6\\)"):
        kernels.group_norm_silu(x, 3, add=torch.ones(2, 5))
    with pytest.raises(ValueError, match="num_channels \\(6\\) must be divisible by num_groups \\(4\\)"):
        GroupNormSiLU(4, 6)
    for eps in (0.0, -1e-5, float("nan"), float("inf"), "1e-5"):  # 0 or NaN gave inf / NaN outputs, silently
        for op in (kernels.group_norm_silu, kernels.group_norm, reference.group_norm_silu, reference.group_norm):
            with pytest.raises(ValueError, match="^eps must be a positive finite number"):
                op(x, 3, eps=eps)
