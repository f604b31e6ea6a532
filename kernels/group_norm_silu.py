"""Fused GroupNorm + SiLU, with an optional per-channel add folded in, forward and backward.

    x'   = x + add[:, :, None, None]                  (add optional: the ResBlock's time embedding)
    xhat = (x' - mean_g) * rstd_g,  rstd_g = 1 / sqrt(var_g + eps)   over each group's C/G * HW values
    h    = xhat * gamma_c + beta_c,  y = silu(h) = h * sigmoid(h)
Backward, with dh = dy * sigmoid(h) * (1 + h * (1 - sigmoid(h))) and n = C/G * HW:
    dbeta_c  = sum_{b,hw} dh,   dgamma_c = sum_{b,hw} dh * xhat
    dx'      = rstd * (gamma dh - (S1 + xhat * S2) / n),   S1 = sum_g gamma dh,  S2 = sum_g gamma dh xhat
    dx = dx',  dadd[b, c] = sum_hw dx'

Contract
- x: (B, C, *spatial), float32 / float16 / bfloat16, NCHW-contiguous, channels_last or any
  layout whose spatial dims collapse to one stride (others are copied once); weight, bias:
  (C,) of any float dtype or None; add: (B, C) or None. Output: x's dtype and memory format.
- Statistics in float32 by a two-pass method over the on-chip group (mean first, then the
  sum of squared deviations), of x' minus the group's first value (a pivot, so that data far
  from 0 keeps its digits); partial statistics of a split group are merged with Chan's
  formula. Never E[x^2] - E[x]^2. The (pivot-relative) mean and rstd are kept in float32
  (B, G) for the backward, which reloads the pivot.
- Paths. Forward: one kernel per (sample, group) holding the group in registers when it fits
  in a tile (<= 16384 values: every group of the paper's U-Net) and B * G programs fill the
  GPU; otherwise two kernels, partial statistics over chunks of each group then the apply,
  with the group split over up to SPLIT programs so that batch-1 sampling fills the GPU too.
  Backward: one kernel per (sample, group), tiles looped in two passes where a group does not
  fit; dgamma and dbeta are reduced over the batch from float32 per-sample partials by
  torch.sum: deterministic, no atomics.
- Tested under TRITON_INTERPRET=1 against F.group_norm + F.silu in float64: output and the
  gradients of x, gamma, beta and add, per dtype, odd shapes, channels_last, non-contiguous
  upstream gradients, mean 1e3 / std 1e-2 inputs, both forward paths; compiled for sm_80/90.

Traffic per element (float32, bytes), one tensor pass = 4 (`python -m ddpm_fast.traffic`):
  forward, fused, group on chip: read x, write y: 8 (the add is B*C values: nothing).
    split path: read x twice, write y: 12.
    eager: x + add (8), group_norm (8, plus the statistics pass inside it), silu (8): 24-28.
  backward, fused: read x, dy, write dx: 12 (20 when a group does not fit and is read twice).
    eager: silu backward (12), group_norm backward (read dy, x, write dx: 12, plus its
    reductions), the add's backward (read 4): 28-32.
"""

import torch
import triton
import triton.language as tl

from ddpm_fast import checks, reference
from ddpm_fast.kernels._common import use_triton

MAX_TILE_FWD = 16384  # values of one group held in registers by the forward kernel
MAX_TILE_BWD = 4096  # the backward keeps ~6 tensors of the tile live
MIN_SPLIT_GROUP = 2048  # groups smaller than this are never split across programs


@triton.jit
def _pivot(X_ptr, ADD_ptr, b, g, CPG, C, stride_xb, stride_xc, HAS_ADD: tl.constexpr):
    """The group's first value: statistics are taken of x - pivot, so that data far from 0
    (mean 1e3, spread 1e-2) keeps its digits through the float32 sums."""
    k = tl.load(X_ptr + b * stride_xb + g * CPG * stride_xc).to(tl.float32)
    if HAS_ADD:
        k += tl.load(ADD_ptr + b * C + g * CPG).to(tl.float32)
    return k


@triton.jit
def _load_shifted(X_ptr, ADD_ptr, offs, mask, b, c, cmask, C, pivot, HAS_ADD: tl.constexpr):
    """x' - pivot over a [BLOCK_C, BLOCK_HW] tile in float32, 0 outside the group."""
    x = tl.load(X_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_ADD:
        x += tl.load(ADD_ptr + b * C + c, mask=cmask, other=0.0).to(tl.float32)[:, None]
    return tl.where(mask, x - pivot, 0.0)


@triton.jit
def _gn_silu_fwd_fused_kernel(
    X_ptr, ADD_ptr, W_ptr, B_ptr, Y_ptr, MEAN_ptr, RSTD_ptr,
    G, C, CPG, HW, eps,
    stride_xb, stride_xc, stride_xhw, stride_yb, stride_yc, stride_yhw,
    HAS_ADD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b, g = (pid // G).to(tl.int64), pid % G
    cc, hw = tl.arange(0, BLOCK_C), tl.arange(0, BLOCK_HW)
    c, cmask = g * CPG + cc, cc < CPG
    mask = cmask[:, None] & (hw < HW)[None, :]
    pivot = _pivot(X_ptr, ADD_ptr, b, g, CPG, C, stride_xb, stride_xc, HAS_ADD)
    x = _load_shifted(X_ptr, ADD_ptr, b * stride_xb + c[:, None] * stride_xc + hw[None, :] * stride_xhw,
                      mask, b, c, cmask, C, pivot, HAS_ADD)  # fmt: skip
    # Two-pass statistics on the on-chip group: the mean, then squared deviations from it.
    n = CPG * HW
    mean = tl.sum(tl.sum(x, axis=1), axis=0) / n  # of x' - pivot
    d = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(d * d, axis=1), axis=0) / n + eps)
    tl.store(MEAN_ptr + pid, mean)
    tl.store(RSTD_ptr + pid, rstd)
    # Normalise, scale and shift per channel, SiLU, store in y's dtype and layout.
    w = tl.load(W_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    bias = tl.load(B_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    h = d * rstd * w[:, None] + bias[:, None]
    y_offs = b * stride_yb + c[:, None] * stride_yc + hw[None, :] * stride_yhw
    tl.store(Y_ptr + y_offs, (h * tl.sigmoid(h)).to(Y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gn_stats_kernel(
    X_ptr, ADD_ptr, PART_ptr,
    G, C, CPG, HW, chunk, SPLIT,
    stride_xb, stride_xc, stride_xhw,
    HAS_ADD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):  # fmt: skip
    """Partial statistics (count, mean, M2) of x' - pivot over HW range [s chunk, (s + 1) chunk)."""
    pid, s = tl.program_id(0), tl.program_id(1)
    b, g = (pid // G).to(tl.int64), pid % G
    cc = tl.arange(0, BLOCK_C)
    c, cmask = g * CPG + cc, cc < CPG
    pivot = _pivot(X_ptr, ADD_ptr, b, g, CPG, C, stride_xb, stride_xc, HAS_ADD)
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for hw0 in range(s * chunk, tl.minimum((s + 1) * chunk, HW), BLOCK_HW):
        hw = hw0 + tl.arange(0, BLOCK_HW)
        mask = cmask[:, None] & (hw < HW)[None, :]
        x = _load_shifted(X_ptr, ADD_ptr, b * stride_xb + c[:, None] * stride_xc + hw[None, :] * stride_xhw,
                          mask, b, c, cmask, C, pivot, HAS_ADD)  # fmt: skip
        # Two passes over the tile, then Chan et al.'s merge into the running statistics.
        n_t = tl.sum(tl.sum(mask.to(tl.float32), axis=1), axis=0)
        mean_t = tl.sum(tl.sum(x, axis=1), axis=0) / n_t
        d = tl.where(mask, x - mean_t, 0.0)
        m2_t = tl.sum(tl.sum(d * d, axis=1), axis=0)
        total = count + n_t
        delta = mean_t - mean
        mean += delta * n_t / total
        m2 += m2_t + delta * delta * count * n_t / total
        count = total
    base = PART_ptr + (pid * SPLIT + s) * 3
    tl.store(base, count)
    tl.store(base + 1, mean)
    tl.store(base + 2, m2)


@triton.jit
def _gn_silu_apply_kernel(
    X_ptr, ADD_ptr, W_ptr, B_ptr, Y_ptr, MEAN_ptr, RSTD_ptr, PART_ptr,
    G, C, CPG, HW, chunk, SPLIT, eps,
    stride_xb, stride_xc, stride_xhw, stride_yb, stride_yc, stride_yhw,
    HAS_ADD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    pid, s = tl.program_id(0), tl.program_id(1)
    b, g = (pid // G).to(tl.int64), pid % G
    cc = tl.arange(0, BLOCK_C)
    c, cmask = g * CPG + cc, cc < CPG
    # Merge the group's partial statistics (Chan et al.): mean = sum n_i mean_i / n,
    # M2 = sum M2_i + n_i (mean_i - mean)^2.
    parts = PART_ptr + (pid * SPLIT + tl.arange(0, BLOCK_S)) * 3
    pmask = tl.arange(0, BLOCK_S) < SPLIT
    n_i = tl.load(parts, mask=pmask, other=0.0)
    mean_i = tl.load(parts + 1, mask=pmask, other=0.0)
    m2_i = tl.load(parts + 2, mask=pmask, other=0.0)
    n = tl.sum(n_i, axis=0)
    mean = tl.sum(n_i * mean_i, axis=0) / n
    dm = mean_i - mean
    rstd = 1.0 / tl.sqrt(tl.sum(m2_i + n_i * dm * dm, axis=0) / n + eps)
    if s == 0:
        tl.store(MEAN_ptr + pid, mean)
        tl.store(RSTD_ptr + pid, rstd)
    pivot = _pivot(X_ptr, ADD_ptr, b, g, CPG, C, stride_xb, stride_xc, HAS_ADD)
    w = tl.load(W_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    bias = tl.load(B_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    for hw0 in range(s * chunk, tl.minimum((s + 1) * chunk, HW), BLOCK_HW):
        hw = hw0 + tl.arange(0, BLOCK_HW)
        mask = cmask[:, None] & (hw < HW)[None, :]
        x = _load_shifted(X_ptr, ADD_ptr, b * stride_xb + c[:, None] * stride_xc + hw[None, :] * stride_xhw,
                          mask, b, c, cmask, C, pivot, HAS_ADD)  # fmt: skip
        h = (x - mean) * rstd * w[:, None] + bias[:, None]
        y_offs = b * stride_yb + c[:, None] * stride_yc + hw[None, :] * stride_yhw
        tl.store(Y_ptr + y_offs, (h * tl.sigmoid(h)).to(Y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gn_silu_bwd_tile(
    X_ptr, ADD_ptr, DY_ptr, b, c, cmask, hw, C, HW, pivot, mean, rstd, w, bias,
    stride_xb, stride_xc, stride_xhw, stride_gb, stride_gc, stride_ghw, HAS_ADD: tl.constexpr,
):  # fmt: skip
    """Recompute xhat and h for one tile and return (xhat, gamma * dh, dh, mask)."""
    mask = cmask[:, None] & (hw < HW)[None, :]
    x = _load_shifted(X_ptr, ADD_ptr, b * stride_xb + c[:, None] * stride_xc + hw[None, :] * stride_xhw,
                      mask, b, c, cmask, C, pivot, HAS_ADD)  # fmt: skip
    dy = tl.load(DY_ptr + b * stride_gb + c[:, None] * stride_gc + hw[None, :] * stride_ghw, mask=mask, other=0.0)
    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    h = xhat * w[:, None] + bias[:, None]
    sig = tl.sigmoid(h)
    dh = dy.to(tl.float32) * sig * (1.0 + h * (1.0 - sig))  # d silu(h) / dh
    return xhat, dh * w[:, None], dh, mask


@triton.jit
def _gn_silu_bwd_kernel(
    X_ptr, ADD_ptr, W_ptr, B_ptr, DY_ptr, MEAN_ptr, RSTD_ptr, DX_ptr, DADD_ptr, DW_PART_ptr, DB_PART_ptr,
    G, C, CPG, HW,
    stride_xb, stride_xc, stride_xhw, stride_gb, stride_gc, stride_ghw, stride_db, stride_dc, stride_dhw,
    HAS_ADD: tl.constexpr, ONE_TILE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b, g = (pid // G).to(tl.int64), pid % G
    cc = tl.arange(0, BLOCK_C)
    c, cmask = g * CPG + cc, cc < CPG
    mean = tl.load(MEAN_ptr + pid)
    rstd = tl.load(RSTD_ptr + pid)
    pivot = _pivot(X_ptr, ADD_ptr, b, g, CPG, C, stride_xb, stride_xc, HAS_ADD)
    w = tl.load(W_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    bias = tl.load(B_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    n = CPG * HW
    # Pass 1: per-channel sums of dh * xhat and dh (this sample's share of dgamma, dbeta).
    if ONE_TILE:
        hw = tl.arange(0, BLOCK_HW)
        xhat, gdh, dh, mask = _gn_silu_bwd_tile(
            X_ptr, ADD_ptr, DY_ptr, b, c, cmask, hw, C, HW, pivot, mean, rstd, w, bias,
            stride_xb, stride_xc, stride_xhw, stride_gb, stride_gc, stride_ghw, HAS_ADD,
        )  # fmt: skip
        dw = tl.sum(dh * xhat, axis=1)
        db = tl.sum(dh, axis=1)
    else:
        dw = tl.zeros((BLOCK_C,), tl.float32)
        db = tl.zeros((BLOCK_C,), tl.float32)
        for hw0 in range(0, HW, BLOCK_HW):
            xhat, gdh, dh, mask = _gn_silu_bwd_tile(
                X_ptr, ADD_ptr, DY_ptr, b, c, cmask, hw0 + tl.arange(0, BLOCK_HW), C, HW, pivot, mean, rstd, w, bias,
                stride_xb, stride_xc, stride_xhw, stride_gb, stride_gc, stride_ghw, HAS_ADD,
            )  # fmt: skip
            dw += tl.sum(dh * xhat, axis=1)
            db += tl.sum(dh, axis=1)
    tl.store(DW_PART_ptr + b * C + c, dw, mask=cmask)
    tl.store(DB_PART_ptr + b * C + c, db, mask=cmask)
    s1 = tl.sum(w * db, axis=0) / n  # mean of gamma dh over the group
    s2 = tl.sum(w * dw, axis=0) / n  # mean of gamma dh xhat
    # Pass 2: dx' = rstd (gamma dh - S1 - xhat S2); the add's gradient sums it over HW.
    if ONE_TILE:
        dx = tl.where(mask, rstd * (gdh - s1 - xhat * s2), 0.0)
        d_offs = b * stride_db + c[:, None] * stride_dc + hw[None, :] * stride_dhw
        tl.store(DX_ptr + d_offs, dx.to(DX_ptr.dtype.element_ty), mask=mask)
        dadd = tl.sum(dx, axis=1)
    else:
        dadd = tl.zeros((BLOCK_C,), tl.float32)
        for hw0 in range(0, HW, BLOCK_HW):
            hw = hw0 + tl.arange(0, BLOCK_HW)
            xhat, gdh, dh, mask = _gn_silu_bwd_tile(
                X_ptr, ADD_ptr, DY_ptr, b, c, cmask, hw, C, HW, pivot, mean, rstd, w, bias,
                stride_xb, stride_xc, stride_xhw, stride_gb, stride_gc, stride_ghw, HAS_ADD,
            )  # fmt: skip
            dx = tl.where(mask, rstd * (gdh - s1 - xhat * s2), 0.0)
            d_offs = b * stride_db + c[:, None] * stride_dc + hw[None, :] * stride_dhw
            tl.store(DX_ptr + d_offs, dx.to(DX_ptr.dtype.element_ty), mask=mask)
            dadd += tl.sum(dx, axis=1)
    if HAS_ADD:
        tl.store(DADD_ptr + b * C + c, dadd, mask=cmask)


# -- launchers ----------------------------------------------------------------------------


def _as_bchw(x: torch.Tensor) -> torch.Tensor:
    """(B, C, *spatial) as a (B, C, HW) view (a copy only if the spatial dims do not collapse)."""
    return x.reshape(x.shape[0], x.shape[1], -1)


def _num_warps(tile: int, per_thread: int) -> int:
    """Warps for a tile of `tile` values, about `per_thread` values per thread (registers)."""
    return max(2, min(16, tile // (32 * per_thread)))


def _target_programs(device: torch.device) -> int:
    """Programs that fill the GPU: two per SM (132 SMs on an H100 when there is no GPU to ask)."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 264


def _tile(cpg: int, hw: int, max_tile: int) -> tuple[int, int]:
    block_c = triton.next_power_of_2(cpg)
    block_hw = min(triton.next_power_of_2(hw), max(16, max_tile // block_c))
    return block_c, block_hw


def forward_plan(B: int, G: int, cpg: int, hw: int, device: torch.device, split=None) -> tuple[int, int, int]:
    """(split, BLOCK_C, BLOCK_HW). split = 0: one kernel, each group in one tile; split = k:
    statistics then apply, each group spread over k programs. `split` overrides the choice."""
    block_c, block_hw = _tile(cpg, hw, MAX_TILE_FWD)
    fits = triton.cdiv(hw, block_hw) == 1
    if split is None:
        programs, target = B * G, _target_programs(device)
        if fits and (programs >= target or cpg * hw < MIN_SPLIT_GROUP):
            split = 0
        else:  # enough programs to fill the GPU, each with at least one 16-wide tile
            split = max(1, min(triton.cdiv(target, programs), triton.cdiv(hw, 16)))
    if split == 0:
        if not fits:
            raise ValueError(f"split=0 needs a group ({cpg} x {hw} values) to fit in one tile of {MAX_TILE_FWD}")
        return 0, block_c, block_hw
    # Smaller tiles for split groups, so that each program has its share to loop over.
    return split, block_c, min(block_hw, max(16, triton.next_power_of_2(triton.cdiv(hw, split))))


def group_norm_silu_fwd(x, num_groups, weight, bias, eps, add, split=None):
    """y, mean, rstd. `split` overrides the plan (0: one kernel; k: statistics over k chunks)."""
    B, C = x.shape[:2]
    G, cpg = num_groups, C // num_groups
    x3 = _as_bchw(x)
    hw = x3.shape[2]
    y = torch.empty_like(x)  # keeps channels_last
    y3 = _as_bchw(y)
    mean = torch.empty(B * G, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    if x.numel() == 0:
        return y, mean.view(B, G), rstd.view(B, G)
    plan_split, block_c, block_hw = forward_plan(B, G, cpg, hw, x.device, split)
    add_arg = add if add is not None else x3
    strides = (*x3.stride(), *y3.stride())
    if plan_split == 0:
        _gn_silu_fwd_fused_kernel[(B * G,)](
            x3, add_arg, weight, bias, y3, mean, rstd, G, C, cpg, hw, eps, *strides,
            HAS_ADD=add is not None, BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=_num_warps(block_c * block_hw, 32),
        )  # fmt: skip
    else:
        chunk = triton.cdiv(triton.cdiv(hw, plan_split), block_hw) * block_hw
        split = triton.cdiv(hw, chunk)
        parts = torch.empty(B * G * split * 3, dtype=torch.float32, device=x.device)
        warps = _num_warps(block_c * block_hw, 16)
        _gn_stats_kernel[(B * G, split)](
            x3, add_arg, parts, G, C, cpg, hw, chunk, split, *x3.stride(),
            HAS_ADD=add is not None, BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=warps,
        )  # fmt: skip
        _gn_silu_apply_kernel[(B * G, split)](
            x3, add_arg, weight, bias, y3, mean, rstd, parts, G, C, cpg, hw, chunk, split, eps, *strides,
            HAS_ADD=add is not None, BLOCK_C=block_c, BLOCK_HW=block_hw,
            BLOCK_S=max(2, triton.next_power_of_2(split)), num_warps=warps,
        )  # fmt: skip
    return y, mean.view(B, G), rstd.view(B, G)


def group_norm_silu_bwd(dy, x, weight, bias, add, mean, rstd, num_groups):
    """dx, dweight, dbias, dadd (float32 partials reduced over the batch, in the params' dtypes)."""
    B, C = x.shape[:2]
    G, cpg = num_groups, C // num_groups
    x3, g3 = _as_bchw(x), _as_bchw(dy)
    hw = x3.shape[2]
    dx = torch.empty_like(x)
    d3 = _as_bchw(dx)
    dw_part = torch.empty(B, C, dtype=torch.float32, device=x.device)
    db_part = torch.empty_like(dw_part)
    dadd = torch.empty(B, C, dtype=torch.float32, device=x.device) if add is not None else None
    if x.numel():
        block_c, block_hw = _tile(cpg, hw, MAX_TILE_BWD)
        _gn_silu_bwd_kernel[(B * G,)](
            x3, add if add is not None else x3, weight, bias, g3, mean, rstd, d3,
            dadd if dadd is not None else dw_part, dw_part, db_part,
            G, C, cpg, hw, *x3.stride(), *g3.stride(), *d3.stride(),
            HAS_ADD=add is not None, ONE_TILE=triton.cdiv(hw, block_hw) == 1, BLOCK_C=block_c, BLOCK_HW=block_hw,
            num_warps=_num_warps(block_c * block_hw, 16),
        )  # fmt: skip
    else:
        dw_part.zero_(), db_part.zero_()
    return dx, dw_part.sum(0), db_part.sum(0), dadd


# -- autograd -------------------------------------------------------------------------------


class GroupNormSiLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, num_groups, weight, bias, eps, add, has_weight, has_bias):
        y, mean, rstd = group_norm_silu_fwd(x, num_groups, weight, bias, eps, add)
        ctx.save_for_backward(x, weight, bias, add, mean, rstd)
        ctx.num_groups, ctx.has_weight, ctx.has_bias = num_groups, has_weight, has_bias
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, bias, add, mean, rstd = ctx.saved_tensors
        dx, dw, db, dadd = group_norm_silu_bwd(dy, x, weight, bias, add, mean, rstd, ctx.num_groups)
        dw = dw.to(weight.dtype) if ctx.has_weight and ctx.needs_input_grad[2] else None
        db = db.to(bias.dtype) if ctx.has_bias and ctx.needs_input_grad[3] else None
        dadd = dadd.to(add.dtype) if add is not None and ctx.needs_input_grad[5] else None
        return dx if ctx.needs_input_grad[0] else None, None, dw, db, None, dadd, None, None


def group_norm_silu(x, num_groups, weight=None, bias=None, eps=1e-5, add=None):
    """Fused twin of ddpm_fast.reference.group_norm_silu (same signature, same result)."""
    if not use_triton(x.device):
        return reference.group_norm_silu(x, num_groups, weight, bias, eps, add)
    checks.check_group_norm(x, num_groups, weight, bias, add)
    C = x.shape[1]
    w = weight if weight is not None else torch.ones(C, device=x.device)
    b = bias if bias is not None else torch.zeros(C, device=x.device)
    return GroupNormSiLUFunction.apply(x, num_groups, w, b, float(eps), add, weight is not None, bias is not None)
