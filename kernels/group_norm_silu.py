"""Fused GroupNorm + SiLU (or GroupNorm alone), an optional per-channel add folded in, forward and backward.

The arithmetic, forward and backward, is written out above the kernels (group_norm_kernels.py);
the launch plans are in group_norm_plan.py.

Contract
- x: (B, C, *spatial), float32 / float16 / bfloat16, NCHW-contiguous, channels_last (read and
  written NHWC-native: no layout copy) or any layout whose spatial dims collapse to one stride
  (others are copied once); weight, bias: (C,) of any float dtype or None; add: (B, C) or None,
  any strides (a column slice, an expanded row). Output: x's dtype and memory format.
- Each program owns GB whole groups (a contiguous range of GB * C/G channels) of one sample. In
  NCHW a group is one contiguous run, GB = 1; in NHWC a pixel's channels are contiguous, so GB
  groups are taken together until a pixel's slice is >= 64 bytes: full sectors, vector loads.
  Group statistics are reduced from per-channel sums with a small one-hot (any C/G, odd too).
- Statistics in float32 by a two-pass method over the on-chip tile (mean first, then the sum
  of squared deviations), of x' minus the group's first value (a pivot, so that data far from 0
  keeps its digits); partial statistics of a split group are merged with Chan's formula. Never
  E[x^2] - E[x]^2. The (pivot-relative) mean and rstd are kept in float32 (B, G) for the backward.
- Paths. Forward: one kernel per (sample, group block) holding the groups in registers when they
  fit a tile (<= 16384 values: every group of the paper's U-Net) and the programs fill the GPU;
  otherwise two kernels, partial statistics over chunks of each group then the apply, with the
  groups split over up to SPLIT programs so that batch-1 sampling fills the GPU too.
  Backward: one kernel per (sample, group block), the tile on chip for every group of the paper's
  U-Net (<= 16384 values), looped in two passes beyond; dgamma and dbeta are summed over the batch
  from float32 per-sample partials by one small kernel (both at once, in the parameters' dtype):
  deterministic, no atomics, one launch per layer.
- Every gather is bounded: no argument value makes a kernel read out of bounds.
- Tested under TRITON_INTERPRET=1 against F.group_norm (+ F.silu) in float64: output and the
  gradients of x, gamma, beta and add, per dtype, odd shapes, channels_last in and out, strided
  and expanded adds, non-contiguous upstream gradients, mean 1e3 / std 1e-2 inputs, every path;
  compiled for sm_80/90 at the layouts the U-Net launches (python -m ddpm_fast.tools.aot).

Traffic per element (float32, bytes), one tensor pass = 4 (`python -m ddpm_fast.tools.traffic`):
  forward, fused, groups on chip: read x, write y: 8 (the add is B*C values: nothing).
    split path: read x twice, write y: 12.
    eager: x + add (8), group_norm (8, plus the statistics pass inside it), silu (8): 24-28.
  backward, fused: read x, dy, write dx: 12 (20 when a tile does not hold the groups).
    eager: silu backward (12), group_norm backward (read dy, x, write dx: 12, plus its
    reductions), the add's backward (read 4): 28-32.
"""

import torch

from ddpm_fast import checks, reference
from ddpm_fast.kernels import _common
from ddpm_fast.kernels._common import (
    Plans,
    cdiv,
    direct_launch,
    meta_key,
    next_power_of_2,
    on_input_device,
    plans_for_interpreter,
    use_triton,
)
from ddpm_fast.kernels.group_norm_kernels import (
    _gn_param_grad_kernel,
    _gn_silu_apply_kernel,
    _gn_silu_bwd_kernel,
    _gn_silu_fwd_fused_kernel,
    _gn_stats_kernel,
)
from ddpm_fast.kernels.group_norm_plan import (
    MAX_TILE_BWD,
    MAX_TILE_LOOP_BWD,
    _as_bchw,
    _bwd_warps,
    _fwd_plan,
    _tile,
    group_block,
    output_memory_format,
)

# -- launchers --------------------------------------------------------------------------------------


def group_norm_act_fwd(x, num_groups, weight, bias, eps, add, silu, split=None, plan=None, stats=None):
    """y, mean, rstd. `split` overrides the plan (0: one kernel; k: statistics over k chunks);
    `plan`: the call's _FwdPlan where the caller has it; `stats`: (mean, rstd) buffers to write
    (a caller that will not read them passes scratch it keeps)."""
    if plan is None or split is not None:
        plan = _fwd_plan(x, num_groups, add, split)
    y = x.new_empty_strided(plan.y_size, plan.y_stride)  # half the host time of torch.empty_strided
    if stats is None:
        mean = x.new_empty(plan.stats_shape, dtype=torch.float32)
        stats = mean, torch.empty_like(mean)
    mean, rstd = stats
    if plan.empty:
        return y, mean, rstd
    if plan.copy_x:
        x = _as_bchw(x)
    add_arg = add if add is not None else x
    with _common.launch_device(plan.device):  # the tensors' GPU current (multi-GPU)
        if plan.split == 0:  # the constexprs by position (a keyword dict costs the host ~0.3 us)
            _gn_silu_fwd_fused_kernel[plan.grid](
                x, add_arg, weight, bias, y, mean, rstd, *plan.ints, eps, *plan.strides, *plan.constexprs[silu],
                num_warps=plan.num_warps,
            )  # fmt: skip
        else:
            parts = torch.empty(plan.parts, dtype=torch.float32, device=x.device)
            _gn_stats_kernel[plan.grid](x, add_arg, parts, *plan.ints, *plan.stats_strides, **plan.stats_meta)
            _gn_silu_apply_kernel[plan.grid](
                x, add_arg, weight, bias, y, mean, rstd, parts, *plan.ints, eps, *plan.strides, SILU=silu, **plan.meta,
            )  # fmt: skip
    return y, mean, rstd


def _add_args(add, x3):
    if add is None:
        return x3, 0, 0
    return add, add.stride(0), add.stride(1)


@on_input_device
def group_norm_act_bwd(dy, x, weight, bias, add, mean, rstd, num_groups, silu):
    """dx (x's layout), dweight and dbias (the parameters' dtypes), dadd (add's dtype, or an empty
    tensor without an add)."""
    B, C = x.shape[:2]
    G, cpg = num_groups, C // num_groups
    x3, g3 = _as_bchw(x), _as_bchw(dy)
    if (x3.stride(1) == 1) != (g3.stride(1) == 1) and 0 not in g3.stride():
        # dy NHWC where x is NCHW or the reverse: one of the two would be read across its rows
        # (and the tile's registers spill): bring dy to x's layout first.
        g3 = _as_bchw(dy.contiguous(memory_format=output_memory_format(x)))
    hw = x3.shape[2]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))
    d3 = _as_bchw(dx)
    dw = torch.empty(C, dtype=weight.dtype, device=x.device)
    db = torch.empty(C, dtype=bias.dtype, device=x.device)
    dadd = torch.empty(B, C, dtype=add.dtype, device=x.device) if add is not None else x.new_empty(0)
    if x.numel() == 0:
        return dx, dw.zero_(), db.zero_(), dadd
    parts = torch.empty(2, B, C, dtype=torch.float32, device=x.device)
    gb = group_block(G, cpg, hw, x3.stride(1), x.element_size(), plans_for_interpreter(x.device))
    ngb = cdiv(G, gb)
    block_c, block_hw = _tile(gb, cpg, hw, MAX_TILE_BWD)
    if cdiv(hw, block_hw) > 1:  # the group is looped over in two passes: a smaller tile
        block_c, block_hw = _tile(gb, cpg, hw, min(MAX_TILE_BWD, MAX_TILE_LOOP_BWD))
    add_arg, stride_ab, stride_ac = _add_args(add, x3)
    _gn_silu_bwd_kernel[(B * ngb,)](
        x3, add_arg, weight, bias, g3, mean, rstd, d3, dadd if add is not None else parts, parts[0], parts[1],
        G, ngb, C, cpg, hw, *x3.stride(), stride_ab, stride_ac, *g3.stride(), *d3.stride(),
        HAS_ADD=add is not None, SILU=silu, ONE_TILE=cdiv(hw, block_hw) == 1, GB=gb, BLOCK_C=block_c,
        BLOCK_HW=block_hw, EVEN_HW=block_hw == hw, num_warps=_bwd_warps(block_c * block_hw),
    )  # fmt: skip
    block_pc = min(128, next_power_of_2(C))
    _gn_param_grad_kernel[(cdiv(C, block_pc),)](
        parts[0], parts[1], dw, db, B, C, BLOCK_B=min(32, next_power_of_2(B)), BLOCK_C=block_pc, num_warps=4,
    )  # fmt: skip
    return dx, dw, db, dadd


# -- the custom op: its path, fake (meta) kernel and autograd formula ---------------------------------


@torch.library.custom_op("ddpm_fast::group_norm_act", mutates_args=())
def group_norm_act_op(
    x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float, add: torch.Tensor | None,
    silu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(y, mean, rstd): the Triton kernels, or their eager twin where Triton does not run."""
    if use_triton(x.device):
        return group_norm_act_fwd(x, num_groups, weight, bias, eps, add, silu)
    y, mean, rstd = reference.group_norm_act_fwd(x, num_groups, weight, bias, eps, add, silu)
    return y.contiguous(memory_format=output_memory_format(x)), mean, rstd


@group_norm_act_op.register_fake
def _(x, num_groups, weight, bias, eps, add, silu):
    stats = x.new_empty(x.shape[0], num_groups, dtype=torch.float32)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))
    return y, stats, torch.empty_like(stats)


@torch.library.custom_op("ddpm_fast::group_norm_act_backward", mutates_args=())
def group_norm_act_backward_op(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, add: torch.Tensor | None,
    mean: torch.Tensor, rstd: torch.Tensor, num_groups: int, silu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(dx, dweight, dbias, dadd); dadd is empty without an add."""
    if use_triton(x.device):
        return group_norm_act_bwd(dy, x, weight, bias, add, mean, rstd, num_groups, silu)
    dx, dw, db, dadd = reference.group_norm_act_bwd(dy, x, weight, bias, add, mean, rstd, num_groups, silu)
    dadd = dadd.to(add.dtype) if add is not None else x.new_empty(0)
    return (dx.to(x.dtype).contiguous(memory_format=output_memory_format(x)), dw.to(weight.dtype),
            db.to(bias.dtype), dadd)  # fmt: skip


@group_norm_act_backward_op.register_fake
def _(dy, x, weight, bias, add, mean, rstd, num_groups, silu):
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))
    dadd = x.new_empty(x.shape[:2], dtype=add.dtype) if add is not None else x.new_empty(0)
    return dx, torch.empty_like(weight), torch.empty_like(bias), dadd


def _setup_context(ctx, inputs, output):
    x, num_groups, weight, bias, eps, add, silu = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, add, mean, rstd)
    ctx.num_groups, ctx.silu = num_groups, silu
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, add, mean, rstd = ctx.saved_tensors
    dx, dw, db, dadd = group_norm_act_backward_op(dy, x, weight, bias, add, mean, rstd, ctx.num_groups, ctx.silu)
    needs = ctx.needs_input_grad
    return (dx if needs[0] else None, None, dw if needs[2] else None, db if needs[3] else None, None,
            dadd if add is not None and needs[5] else None, None)  # fmt: skip


group_norm_act_op.register_autograd(_backward, setup_context=_setup_context)


# -- the functional entry points --------------------------------------------------------------------


class _Call:
    """A public call's checked metadata: its forward plan, stand-ins for a missing weight or
    bias, and scratch statistics for calls that no backward will read."""

    def __init__(self, x, num_groups, weight, bias, add, eps):
        checks.check_group_norm(x, num_groups, weight, bias, add, eps)
        C = x.shape[1]
        self.weight = torch.ones(C, device=x.device) if weight is None else None
        self.bias = torch.zeros(C, device=x.device) if bias is None else None
        self.plan = _fwd_plan(x, num_groups, add, None)
        mean = torch.empty(self.plan.stats_shape, dtype=torch.float32, device=x.device)
        self.stats = mean, torch.empty_like(mean)


_CALLS = Plans()


def _group_norm(x, num_groups, weight, bias, eps, add, silu):
    # (meta_key written out for x: a call per tensor costs ~2% of the call)
    key = (x.shape, x.stride(), x.dtype, x.device, meta_key(add), meta_key(weight), meta_key(bias), type(num_groups),
           num_groups, type(eps), eps)  # fmt: skip
    call = _CALLS.entries.get(key)
    if call is None:  # checks on a miss only
        call = _CALLS.add(key, _Call(x, num_groups, weight, bias, add, eps))
    w = weight if weight is not None else call.weight
    b = bias if bias is not None else call.bias
    if direct_launch(x, w, b, add):  # eager, no gradient: the launcher itself
        return group_norm_act_fwd(x, num_groups, w, b, float(eps), add, silu, None, call.plan, call.stats)[0]
    return group_norm_act_op(x, num_groups, w, b, float(eps), add, silu)[0]


def group_norm_silu(x, num_groups, weight=None, bias=None, eps=1e-5, add=None):
    """Fused twin of ddpm_fast.reference.group_norm_silu (same signature, same result)."""
    return _group_norm(x, num_groups, weight, bias, eps, add, True)


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5):
    """Fused twin of ddpm_fast.reference.group_norm: the same kernels with the activation off."""
    return _group_norm(x, num_groups, weight, bias, eps, None, False)
