"""Fused GroupNorm + SiLU (or GroupNorm alone), an optional per-channel add folded in, forward and backward.

    x'   = x + add[:, :, None, None]                  (add optional: the ResBlock's time embedding)
    xhat = (x' - mean_g) * rstd_g,  rstd_g = 1 / sqrt(var_g + eps)   over each group's C/G * HW values
    h    = xhat * gamma_c + beta_c,  y = silu(h) = h * sigmoid(h)   (y = h with the activation off)
Backward, with dh = dy * sigmoid(h) * (1 + h * (1 - sigmoid(h))) (dh = dy without SiLU), n = C/G * HW:
    dbeta_c  = sum_{b,hw} dh,   dgamma_c = sum_{b,hw} dh * xhat
    dx'      = rstd * (gamma dh - (S1 + xhat * S2) / n),   S1 = sum_g gamma dh,  S2 = sum_g gamma dh xhat
    dx = dx',  dadd[b, c] = sum_hw dx'

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
import triton
import triton.language as tl

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

# -- per-group reductions from per-channel vectors ------------------------------------------------


@triton.jit
def _to_groups(v, gid, GB: tl.constexpr):
    """[GB] per-group sums of the per-channel values v [BLOCK_C]; gid is each channel's group in
    the block (>= GB for padding channels, which fall out)."""
    onehot = gid[None, :] == tl.arange(0, GB)[:, None]
    return tl.sum(tl.where(onehot, v[None, :], 0.0), axis=1)


@triton.jit
def _to_channels(vg, gid, GB: tl.constexpr):
    """[BLOCK_C] each channel's value of the per-group vector vg [GB]."""
    onehot = gid[None, :] == tl.arange(0, GB)[:, None]
    return tl.sum(tl.where(onehot, vg[:, None], 0.0), axis=0)


@triton.jit
def _block(pid, NGB, G, CPG, GB: tl.constexpr, BLOCK_C: tl.constexpr):
    """Sample b, the block's first group g0, its channels c (BLOCK_C), their groups in the block
    (gid) and mask, and the block's groups gg [GB] with their mask."""
    b, gblk = (pid // NGB).to(tl.int64), pid % NGB
    g0 = gblk * GB
    ngroups = tl.minimum(GB, G - g0)
    cc = tl.arange(0, BLOCK_C)
    gid = cc // CPG
    cmask = gid < ngroups
    gid = tl.where(cmask, gid, GB)
    gg = tl.arange(0, GB)
    return b, g0, g0 * CPG + cc, gid, cmask, g0 + gg, gg < ngroups


@triton.jit
def _pivots(X_ptr, ADD_ptr, gg, gmask, CPG, stride_xc, stride_ac, HAS_ADD: tl.constexpr):
    """Each group's first value x'[b, g * C/G, 0]: statistics are taken of x' - pivot, so that
    data far from 0 (mean 1e3, spread 1e-2) keeps its digits through the float32 sums.
    (X_ptr and ADD_ptr point at sample b: per-sample offsets stay 32-bit, C * HW < 2^31.)"""
    c = gg * CPG
    k = tl.load(X_ptr + c * stride_xc, mask=gmask, other=0.0).to(tl.float32)
    if HAS_ADD:
        k += tl.load(ADD_ptr + c * stride_ac, mask=gmask, other=0.0).to(tl.float32)
    return k


@triton.jit
def _load_shifted(X_ptr, ADD_ptr, c, hw, mask, cmask, pivot_c, stride_xc, stride_xhw, stride_ac,
                  HAS_ADD: tl.constexpr, EVEN_HW: tl.constexpr = False):  # fmt: skip
    """x' - pivot over a [BLOCK_C, BLOCK_HW] tile in float32, 0 outside the groups. (EVEN_HW: the
    tile spans HW exactly, and padding channels load 0 with a pivot of 0: no select needed.)"""
    x = tl.load(X_ptr + c[:, None] * stride_xc + hw[None, :] * stride_xhw, mask=mask, other=0.0).to(tl.float32)
    if HAS_ADD:
        x += tl.load(ADD_ptr + c * stride_ac, mask=cmask, other=0.0).to(tl.float32)[:, None]
    if EVEN_HW:
        return x - pivot_c[:, None]
    return tl.where(mask, x - pivot_c[:, None], 0.0)


@triton.jit
def _act(h, SILU: tl.constexpr):
    if SILU:
        return h * tl.sigmoid(h)
    return h


# -- forward ----------------------------------------------------------------------------------------


@triton.jit
def _gn_silu_fwd_fused_kernel(
    X_ptr, ADD_ptr, W_ptr, B_ptr, Y_ptr, MEAN_ptr, RSTD_ptr,
    G, NGB, CPG, HW, eps,
    stride_xb, stride_xc, stride_xhw, stride_ab, stride_ac, stride_yb, stride_yc, stride_yhw,
    HAS_ADD: tl.constexpr, SILU: tl.constexpr, GB: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
    EVEN_HW: tl.constexpr,
):  # fmt: skip
    b, g0, c, gid, cmask, gg, gmask = _block(tl.program_id(0), NGB, G, CPG, GB, BLOCK_C)
    X_ptr += b * stride_xb  # this sample
    ADD_ptr += b * stride_ab
    Y_ptr += b * stride_yb
    hw = tl.arange(0, BLOCK_HW)
    mask = cmask[:, None] & (hw < HW)[None, :]
    pivot = _to_channels(_pivots(X_ptr, ADD_ptr, gg, gmask, CPG, stride_xc, stride_ac, HAS_ADD), gid, GB)
    x = _load_shifted(X_ptr, ADD_ptr, c, hw, mask, cmask, pivot, stride_xc, stride_xhw, stride_ac, HAS_ADD, EVEN_HW)
    # Two-pass statistics on the on-chip groups: the mean, then squared deviations from it.
    n = CPG * HW
    mean_g = _to_groups(tl.sum(x, axis=1), gid, GB) / n  # of x' - pivot
    d = x - _to_channels(mean_g, gid, GB)[:, None]  # padding channels: 0 - 0
    if not EVEN_HW:
        d = tl.where(mask, d, 0.0)
    rstd_g = 1.0 / tl.sqrt(_to_groups(tl.sum(d * d, axis=1), gid, GB) / n + eps)
    tl.store(MEAN_ptr + b * G + gg, mean_g, mask=gmask)
    tl.store(RSTD_ptr + b * G + gg, rstd_g, mask=gmask)
    # Normalise, scale and shift per channel, activation, store in y's dtype and layout.
    scale = _to_channels(rstd_g, gid, GB) * tl.load(W_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    h = d * scale[:, None] + tl.load(B_ptr + c, mask=cmask, other=0.0).to(tl.float32)[:, None]
    y_offs = c[:, None] * stride_yc + hw[None, :] * stride_yhw
    tl.store(Y_ptr + y_offs, _act(h, SILU).to(Y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gn_stats_kernel(
    X_ptr, ADD_ptr, PART_ptr,
    G, NGB, CPG, HW, chunk, SPLIT,
    stride_xb, stride_xc, stride_xhw, stride_ab, stride_ac,
    HAS_ADD: tl.constexpr, GB: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):  # fmt: skip
    """Partial statistics (count, mean, M2) per group of x' - pivot over HW range [s chunk, (s + 1) chunk)."""
    s = tl.program_id(1)
    b, g0, c, gid, cmask, gg, gmask = _block(tl.program_id(0), NGB, G, CPG, GB, BLOCK_C)
    X_ptr += b * stride_xb  # this sample
    ADD_ptr += b * stride_ab
    pivot = _to_channels(_pivots(X_ptr, ADD_ptr, gg, gmask, CPG, stride_xc, stride_ac, HAS_ADD), gid, GB)
    count = 0.0
    mean = tl.zeros((GB,), tl.float32)
    m2 = tl.zeros((GB,), tl.float32)
    for hw0 in range(s * chunk, tl.minimum((s + 1) * chunk, HW), BLOCK_HW):
        hw = hw0 + tl.arange(0, BLOCK_HW)
        mask = cmask[:, None] & (hw < HW)[None, :]
        x = _load_shifted(X_ptr, ADD_ptr, c, hw, mask, cmask, pivot, stride_xc, stride_xhw, stride_ac, HAS_ADD)
        # Two passes over the tile, then Chan et al.'s merge into the running statistics.
        n_t = tl.sum((hw < HW).to(tl.float32), axis=0) * CPG
        mean_t = _to_groups(tl.sum(x, axis=1), gid, GB) / n_t
        d = tl.where(mask, x - _to_channels(mean_t, gid, GB)[:, None], 0.0)
        m2_t = _to_groups(tl.sum(d * d, axis=1), gid, GB)
        total = count + n_t
        delta = mean_t - mean
        mean += delta * (n_t / total)
        m2 += m2_t + delta * delta * (count * n_t / total)
        count = total
    base = PART_ptr + ((b * G + gg) * SPLIT + s) * 3
    tl.store(base, tl.zeros((GB,), tl.float32) + count, mask=gmask)
    tl.store(base + 1, mean, mask=gmask)
    tl.store(base + 2, m2, mask=gmask)


@triton.jit
def _gn_silu_apply_kernel(
    X_ptr, ADD_ptr, W_ptr, B_ptr, Y_ptr, MEAN_ptr, RSTD_ptr, PART_ptr,
    G, NGB, CPG, HW, chunk, SPLIT, eps,
    stride_xb, stride_xc, stride_xhw, stride_ab, stride_ac, stride_yb, stride_yc, stride_yhw,
    HAS_ADD: tl.constexpr, SILU: tl.constexpr, GB: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
    BLOCK_S: tl.constexpr,
):  # fmt: skip
    s = tl.program_id(1)
    b, g0, c, gid, cmask, gg, gmask = _block(tl.program_id(0), NGB, G, CPG, GB, BLOCK_C)
    X_ptr += b * stride_xb  # this sample
    ADD_ptr += b * stride_ab
    Y_ptr += b * stride_yb
    # Merge each group's partial statistics (Chan et al.): mean = sum n_i mean_i / n,
    # M2 = sum M2_i + n_i (mean_i - mean)^2.
    ss = tl.arange(0, BLOCK_S)
    pmask = gmask[:, None] & (ss < SPLIT)[None, :]
    parts = PART_ptr + ((b * G + gg)[:, None] * SPLIT + ss[None, :]) * 3
    n_i = tl.load(parts, mask=pmask, other=0.0)
    mean_i = tl.load(parts + 1, mask=pmask, other=0.0)
    m2_i = tl.load(parts + 2, mask=pmask, other=0.0)
    n = tl.maximum(tl.sum(n_i, axis=1), 1.0)
    mean_g = tl.sum(n_i * mean_i, axis=1) / n
    dm = mean_i - mean_g[:, None]
    rstd_g = 1.0 / tl.sqrt(tl.sum(m2_i + n_i * dm * dm, axis=1) / n + eps)
    if s == 0:
        tl.store(MEAN_ptr + b * G + gg, mean_g, mask=gmask)
        tl.store(RSTD_ptr + b * G + gg, rstd_g, mask=gmask)
    pivot = _to_channels(_pivots(X_ptr, ADD_ptr, gg, gmask, CPG, stride_xc, stride_ac, HAS_ADD), gid, GB)
    mean = _to_channels(mean_g, gid, GB)
    scale = _to_channels(rstd_g, gid, GB) * tl.load(W_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    shift = tl.load(B_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    for hw0 in range(s * chunk, tl.minimum((s + 1) * chunk, HW), BLOCK_HW):
        hw = hw0 + tl.arange(0, BLOCK_HW)
        mask = cmask[:, None] & (hw < HW)[None, :]
        x = _load_shifted(X_ptr, ADD_ptr, c, hw, mask, cmask, pivot, stride_xc, stride_xhw, stride_ac, HAS_ADD)
        h = (x - mean[:, None]) * scale[:, None] + shift[:, None]
        y_offs = c[:, None] * stride_yc + hw[None, :] * stride_yhw
        tl.store(Y_ptr + y_offs, _act(h, SILU).to(Y_ptr.dtype.element_ty), mask=mask)


# -- backward ---------------------------------------------------------------------------------------


@triton.jit
def _bwd_tile(X_ptr, ADD_ptr, DY_ptr, c, hw, cmask, HW, pivot, mean, rstd, w, bias,
              stride_xc, stride_xhw, stride_ac, stride_gc, stride_ghw, HAS_ADD: tl.constexpr, SILU: tl.constexpr,
              EVEN_HW: tl.constexpr = False):  # fmt: skip
    """Recompute xhat for one tile and return (xhat, dh, mask), dh = dL/dh. Padding channels
    have mean = rstd = 0, so their xhat (and later dx) is 0 without a select. (EVEN_HW: the mask
    is the channels' alone, one predicate per row.)"""
    if EVEN_HW:
        mask = cmask[:, None]
    else:
        mask = cmask[:, None] & (hw < HW)[None, :]
    x = _load_shifted(X_ptr, ADD_ptr, c, hw, mask, cmask, pivot, stride_xc, stride_xhw, stride_ac, HAS_ADD, EVEN_HW)
    dy = tl.load(DY_ptr + c[:, None] * stride_gc + hw[None, :] * stride_ghw, mask=mask, other=0.0)
    xhat = (x - mean[:, None]) * rstd[:, None]
    if not EVEN_HW:
        xhat = tl.where(mask, xhat, 0.0)
    dh = dy.to(tl.float32)
    if SILU:
        h = xhat * w[:, None] + bias[:, None]
        sig = tl.sigmoid(h)
        dh = dh * sig * (1.0 + h * (1.0 - sig))  # d silu(h) / dh
    return xhat, dh, mask


@triton.jit
def _gn_silu_bwd_kernel(
    X_ptr, ADD_ptr, W_ptr, B_ptr, DY_ptr, MEAN_ptr, RSTD_ptr, DX_ptr, DADD_ptr, DW_PART_ptr, DB_PART_ptr,
    G, NGB, C, CPG, HW,
    stride_xb, stride_xc, stride_xhw, stride_ab, stride_ac, stride_gb, stride_gc, stride_ghw,
    stride_db, stride_dc, stride_dhw,
    HAS_ADD: tl.constexpr, SILU: tl.constexpr, ONE_TILE: tl.constexpr, GB: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr, EVEN_HW: tl.constexpr,
):  # fmt: skip
    """One tile (ONE_TILE): x and dy are read once, xhat and dh kept in registers between the two
    passes. Else both passes loop over the group."""
    b, g0, c, gid, cmask, gg, gmask = _block(tl.program_id(0), NGB, G, CPG, GB, BLOCK_C)
    X_ptr += b * stride_xb  # this sample
    ADD_ptr += b * stride_ab
    DY_ptr += b * stride_gb
    DX_ptr += b * stride_db
    mean = _to_channels(tl.load(MEAN_ptr + b * G + gg, mask=gmask, other=0.0), gid, GB)
    rstd = _to_channels(tl.load(RSTD_ptr + b * G + gg, mask=gmask, other=0.0), gid, GB)
    pivot = _to_channels(_pivots(X_ptr, ADD_ptr, gg, gmask, CPG, stride_xc, stride_ac, HAS_ADD), gid, GB)
    w = tl.load(W_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    bias = tl.load(B_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    n = CPG * HW
    # Pass 1: per-channel sums of dh * xhat and dh (this sample's share of dgamma, dbeta).
    if ONE_TILE:
        hw = tl.arange(0, BLOCK_HW)
        xhat, dh, mask = _bwd_tile(X_ptr, ADD_ptr, DY_ptr, c, hw, cmask, HW, pivot, mean, rstd, w, bias,
                                   stride_xc, stride_xhw, stride_ac, stride_gc, stride_ghw, HAS_ADD, SILU,
                                   EVEN_HW)  # fmt: skip
        dw = tl.sum(dh * xhat, axis=1)
        db = tl.sum(dh, axis=1)
    else:
        dw = tl.zeros((BLOCK_C,), tl.float32)
        db = tl.zeros((BLOCK_C,), tl.float32)
        for hw0 in range(0, HW, BLOCK_HW):
            xhat, dh, mask = _bwd_tile(X_ptr, ADD_ptr, DY_ptr, c, hw0 + tl.arange(0, BLOCK_HW), cmask, HW, pivot,
                                       mean, rstd, w, bias, stride_xc, stride_xhw, stride_ac, stride_gc, stride_ghw,
                                       HAS_ADD, SILU)  # fmt: skip
            dw += tl.sum(dh * xhat, axis=1)
            db += tl.sum(dh, axis=1)
    tl.store(DW_PART_ptr + b * C + c, dw, mask=cmask)
    tl.store(DB_PART_ptr + b * C + c, db, mask=cmask)
    s1 = _to_channels(_to_groups(w * db, gid, GB) / n, gid, GB)  # mean of gamma dh over the group
    s2 = _to_channels(_to_groups(w * dw, gid, GB) / n, gid, GB)  # mean of gamma dh xhat
    # Pass 2: dx' = rstd (gamma dh - S1 - xhat S2); the add's gradient sums it over HW.
    if ONE_TILE:
        dx = rstd[:, None] * (w[:, None] * dh - s1[:, None] - xhat * s2[:, None])
        if not EVEN_HW:
            dx = tl.where(mask, dx, 0.0)
        d_offs = c[:, None] * stride_dc + hw[None, :] * stride_dhw
        tl.store(DX_ptr + d_offs, dx.to(DX_ptr.dtype.element_ty), mask=mask)
        dadd = tl.sum(dx, axis=1)
    else:
        dadd = tl.zeros((BLOCK_C,), tl.float32)
        for hw0 in range(0, HW, BLOCK_HW):
            hw = hw0 + tl.arange(0, BLOCK_HW)
            xhat, dh, mask = _bwd_tile(X_ptr, ADD_ptr, DY_ptr, c, hw, cmask, HW, pivot, mean, rstd, w, bias,
                                       stride_xc, stride_xhw, stride_ac, stride_gc, stride_ghw, HAS_ADD,
                                       SILU)  # fmt: skip
            dx = tl.where(mask, rstd[:, None] * (w[:, None] * dh - s1[:, None] - xhat * s2[:, None]), 0.0)
            d_offs = c[:, None] * stride_dc + hw[None, :] * stride_dhw
            tl.store(DX_ptr + d_offs, dx.to(DX_ptr.dtype.element_ty), mask=mask)
            dadd += tl.sum(dx, axis=1)
    if HAS_ADD:
        tl.store(DADD_ptr + b * C + c, dadd.to(DADD_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _gn_param_grad_kernel(
    DW_PART_ptr, DB_PART_ptr, DW_ptr, DB_ptr, B, C,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """dgamma, dbeta = the per-sample float32 partials summed over the batch, in a fixed order,
    stored in the parameters' dtypes: both in one launch."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    dw = tl.zeros((BLOCK_C,), tl.float32)
    db = tl.zeros((BLOCK_C,), tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        offs = rows.to(tl.int64)[:, None] * C + c[None, :]
        mask = (rows < B)[:, None] & cmask[None, :]
        dw += tl.sum(tl.load(DW_PART_ptr + offs, mask=mask, other=0.0), axis=0)
        db += tl.sum(tl.load(DB_PART_ptr + offs, mask=mask, other=0.0), axis=0)
    tl.store(DW_ptr + c, dw.to(DW_ptr.dtype.element_ty), mask=cmask)
    tl.store(DB_ptr + c, db.to(DB_ptr.dtype.element_ty), mask=cmask)


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
    call = _CALLS.find(key)
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
