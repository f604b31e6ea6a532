"""The Triton kernels of the fused GroupNorm + SiLU (ddpm_fast.kernels.group_norm_silu holds the
contract, launchers, custom op and entry points; group_norm_plan the plans):

    x'   = x + add[:, :, None, None]                  (add optional: the ResBlock's time embedding)
    xhat = (x' - mean_g) * rstd_g,  rstd_g = 1 / sqrt(var_g + eps)   over each group's C/G * HW values
    h    = xhat * gamma_c + beta_c,  y = silu(h) = h * sigmoid(h)   (y = h with the activation off)
Backward, with dh = dy * sigmoid(h) * (1 + h * (1 - sigmoid(h))) (dh = dy without SiLU), n = C/G * HW:
    dbeta_c  = sum_{b,hw} dh,   dgamma_c = sum_{b,hw} dh * xhat
    dx'      = rstd * (gamma dh - (S1 + xhat * S2) / n),   S1 = sum_g gamma dh,  S2 = sum_g gamma dh xhat
    dx = dx',  dadd[b, c] = sum_hw dx'

Forward: one kernel with each program's groups on chip (_gn_silu_fwd_fused_kernel), or partial
statistics over chunks of each group (_gn_stats_kernel) and then the apply (_gn_silu_apply_kernel).
Backward: one kernel per (sample, group block) (_gn_silu_bwd_kernel), then dgamma and dbeta summed
over the batch from per-sample partials (_gn_param_grad_kernel).
"""

import triton
import triton.language as tl

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
