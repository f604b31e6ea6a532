"""Fused (flash) attention for the U-Net: softmax(q k^T * scale) v, non-causal, forward and backward.

Forward (Dao et al. 2022, online softmax): for each block of BLOCK_M queries, loop over
blocks of BLOCK_N keys keeping the running row max m, the running sum l and the output
accumulator in float32; rows are rescaled by exp(m_old - m_new) as m grows. The L x L
scores never leave the chip. Saved for the backward: q, k, v, the output and the per-row
log-sum-exp (B, H, L) in float32: memory linear in L (the eager path keeps L x L probabilities).
Backward (recompute): delta = rowsum(dO * O); P = exp(S - lse) recomputed block by block;
    dV = P^T dO,  dP = dO V^T,  dS = P * (dP - delta),  dQ = scale dS K,  dK = scale dS^T Q
in two kernels, one over key blocks (dK, dV) and one over query blocks (dQ): no atomics,
deterministic.

Contract
- q, k: (B, H, L, d); v: (B, H, L, d_v); any strides (the U-Net passes transposed views);
  L any length >= 1 (16, 49, 64, 256, 1024 ...), d and d_v from 1 to 256; float32, float16,
  bfloat16, all three the same dtype, on one device. Output: (B, H, L, d_v), q's dtype.
- Scores, softmax and accumulation in float32. float32 inputs multiply in IEEE float32, or
  TF32 where torch.backends.cuda.matmul.allow_tf32 allows it for the eager matmul too.
- bfloat16: Triton's interpreter computes tl.dot of bfloat16 operands wrongly, so under the
  interpreter (only) bfloat16 tiles are widened to float32 before each tl.dot (DOT_F32).
  That is the same arithmetic as the GPU's bfloat16 MMA: a product of two bfloat16 values is
  exact in float32 and both accumulate in float32; P is rounded to bfloat16 before P V on
  both paths. So the interpreter tests check our bfloat16 kernel's arithmetic; the one part
  they cannot check is the hardware MMA itself.
- Tested under TRITON_INTERPRET=1 against the eager twin in float64: output, dq, dk, dv for
  L in {16, 49, 64, 256}, d in {32, 64, 256}, batch 1 and 3, several heads, non-contiguous
  inputs and upstream gradients; compiled for sm_80 and sm_90 at d = 64 and 256 without
  spills and within shared memory.

FLOPs: forward 4 B H L^2 d (two matmuls), backward 10 B H L^2 d (five, one the recompute).
Traffic: reads q, k, v once per query block and writes the output: O(B H L d), where the
eager path writes and reads the (B, H, L, L) scores and probabilities several times.
"""

import math

import torch
import triton
import triton.language as tl

from ddpm_fast import checks, reference
from ddpm_fast.kernels._common import interpreter_on, use_triton

MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634


@triton.jit
def _mm(a, b, DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    """a @ b accumulated in float32 (DOT_F32: widen the operands first; see the header)."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _attn_fwd_kernel(
    Q_ptr, K_ptr, V_ptr, O_ptr, LSE_ptr,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    H, L, D, DV, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_base = Q_ptr + b * stride_qb + h * stride_qh
    k_base = K_ptr + b * stride_kb + h * stride_kh
    v_base = V_ptr + b * stride_vb + h * stride_vh
    q_mask = (offs_m < L)[:, None] & (offs_d < D)[None, :]
    q = tl.load(q_base + offs_m[:, None] * stride_ql + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0)

    # Running row max (base-2 units), running sum of exponentials and output accumulator.
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
    for start_n in range(0, L, BLOCK_N):
        kn = start_n + offs_n
        kT = tl.load(k_base + kn[None, :] * stride_kl + offs_d[:, None] * stride_kd,
                     mask=(kn < L)[None, :] & (offs_d < D)[:, None], other=0.0)  # fmt: skip
        # s = q k^T * scale * log2(e): exp2 of it is exp of the scaled score.
        s = _mm(q, kT, DOT_F32, PRECISION) * qk_scale
        s = tl.where((kn < L)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)  # rescales what was accumulated under the old max
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + kn[:, None] * stride_vl + offs_dv[None, :] * stride_vd,
                    mask=(kn < L)[:, None] & (offs_dv < DV)[None, :], other=0.0)  # fmt: skip
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, DOT_F32, PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    o_ptrs = O_ptr + pid_bh.to(tl.int64) * L * DV + offs_m[:, None] * DV + offs_dv[None, :]
    tl.store(o_ptrs, acc.to(O_ptr.dtype.element_ty), mask=(offs_m < L)[:, None] & (offs_dv < DV)[None, :])
    tl.store(LSE_ptr + pid_bh.to(tl.int64) * L + offs_m, m_i + tl.log2(l_i), mask=offs_m < L)  # base 2


@triton.jit
def _attn_bwd_preprocess_kernel(
    O_ptr, DO_ptr, DELTA_ptr,
    stride_dob, stride_doh, stride_dol, stride_dod,
    H, L, DV,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """delta = rowsum(dO * O) per query, in float32."""
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask = (offs_m < L)[:, None] & (offs_dv < DV)[None, :]
    o = tl.load(O_ptr + pid_bh.to(tl.int64) * L * DV + offs_m[:, None] * DV + offs_dv[None, :], mask=mask, other=0.0)
    do_base = DO_ptr + b * stride_dob + h * stride_doh
    do = tl.load(do_base + offs_m[:, None] * stride_dol + offs_dv[None, :] * stride_dod, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA_ptr + pid_bh.to(tl.int64) * L + offs_m, delta, mask=offs_m < L)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q_ptr, K_ptr, V_ptr, DO_ptr, LSE_ptr, DELTA_ptr, DK_ptr, DV_ptr,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_dob, stride_doh, stride_dol, stride_dod,
    H, L, D, DV, qk_scale, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_n, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_valid = offs_n < L
    q_base = Q_ptr + b * stride_qb + h * stride_qh
    do_base = DO_ptr + b * stride_dob + h * stride_doh
    row_base = pid_bh.to(tl.int64) * L
    k = tl.load(K_ptr + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kl + offs_d[None, :] * stride_kd,
                mask=n_valid[:, None] & (offs_d < D)[None, :], other=0.0)  # fmt: skip
    v = tl.load(V_ptr + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vl + offs_dv[None, :] * stride_vd,
                mask=n_valid[:, None] & (offs_dv < DV)[None, :], other=0.0)  # fmt: skip
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), tl.float32)
    for start_m in range(0, L, BLOCK_M):
        qm = start_m + offs_m
        m_valid = qm < L
        q = tl.load(q_base + qm[:, None] * stride_ql + offs_d[None, :] * stride_qd,
                    mask=m_valid[:, None] & (offs_d < D)[None, :], other=0.0)  # fmt: skip
        do = tl.load(do_base + qm[:, None] * stride_dol + offs_dv[None, :] * stride_dod,
                     mask=m_valid[:, None] & (offs_dv < DV)[None, :], other=0.0)  # fmt: skip
        lse = tl.load(LSE_ptr + row_base + qm, mask=m_valid, other=0.0)
        delta = tl.load(DELTA_ptr + row_base + qm, mask=m_valid, other=0.0)
        # P recomputed from the saved log-sum-exp: no running max needed.
        s = _mm(q, tl.trans(k), DOT_F32, PRECISION) * qk_scale
        p = tl.where(m_valid[:, None] & n_valid[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dv += _mm(tl.trans(p.to(do.dtype)), do, DOT_F32, PRECISION)
        dp = _mm(do, tl.trans(v), DOT_F32, PRECISION)
        ds = p * (dp - delta[:, None])
        dk += _mm(tl.trans(ds.to(q.dtype)), q, DOT_F32, PRECISION)
    out = pid_bh.to(tl.int64) * L
    tl.store(DK_ptr + (out + offs_n[:, None]) * D + offs_d[None, :], (dk * scale).to(DK_ptr.dtype.element_ty),
             mask=n_valid[:, None] & (offs_d < D)[None, :])  # fmt: skip
    tl.store(DV_ptr + (out + offs_n[:, None]) * DV + offs_dv[None, :], dv.to(DV_ptr.dtype.element_ty),
             mask=n_valid[:, None] & (offs_dv < DV)[None, :])  # fmt: skip


@triton.jit
def _attn_bwd_dq_kernel(
    Q_ptr, K_ptr, V_ptr, DO_ptr, LSE_ptr, DELTA_ptr, DQ_ptr,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_dob, stride_doh, stride_dol, stride_dod,
    H, L, D, DV, qk_scale, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_valid = offs_m < L
    row_base = pid_bh.to(tl.int64) * L
    q = tl.load(Q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :] * stride_qd,
                mask=m_valid[:, None] & (offs_d < D)[None, :], other=0.0)  # fmt: skip
    do_base = DO_ptr + b * stride_dob + h * stride_doh
    do = tl.load(do_base + offs_m[:, None] * stride_dol + offs_dv[None, :] * stride_dod,
                 mask=m_valid[:, None] & (offs_dv < DV)[None, :], other=0.0)  # fmt: skip
    lse = tl.load(LSE_ptr + row_base + offs_m, mask=m_valid, other=0.0)
    delta = tl.load(DELTA_ptr + row_base + offs_m, mask=m_valid, other=0.0)
    k_base = K_ptr + b * stride_kb + h * stride_kh
    v_base = V_ptr + b * stride_vb + h * stride_vh
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start_n in range(0, L, BLOCK_N):
        kn = start_n + offs_n
        n_valid = kn < L
        k = tl.load(k_base + kn[:, None] * stride_kl + offs_d[None, :] * stride_kd,
                    mask=n_valid[:, None] & (offs_d < D)[None, :], other=0.0)  # fmt: skip
        vT = tl.load(v_base + kn[None, :] * stride_vl + offs_dv[:, None] * stride_vd,
                     mask=n_valid[None, :] & (offs_dv < DV)[:, None], other=0.0)  # fmt: skip
        s = _mm(q, tl.trans(k), DOT_F32, PRECISION) * qk_scale
        p = tl.where(m_valid[:, None] & n_valid[None, :], tl.exp2(s - lse[:, None]), 0.0)
        ds = p * (_mm(do, vT, DOT_F32, PRECISION) - delta[:, None])
        dq += _mm(ds.to(k.dtype), k, DOT_F32, PRECISION)
    tl.store(DQ_ptr + (row_base + offs_m[:, None]) * D + offs_d[None, :], (dq * scale).to(DQ_ptr.dtype.element_ty),
             mask=m_valid[:, None] & (offs_d < D)[None, :])  # fmt: skip


# -- launchers ----------------------------------------------------------------------------


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))  # tl.dot needs K >= 16


# (BLOCK_M, BLOCK_N, num_warps, num_stages) by head dim (padded), for the forward and the
# backward. float32 multiplies on the FMA units (no tensor cores in IEEE mode), which holds
# the tiles in registers: its tiles differ. Each entry compiles for sm_80 and sm_90 without
# spills and within shared memory (tests/test_compile.py checks them all through ddpm_fast.aot).
_CONFIGS = {
    # dtype class, backward: {max head dim: config}
    ("half", False): {64: (64, 64, 4, 2), 128: (64, 32, 4, 2), 256: (64, 32, 8, 1)},
    ("half", True): {64: (32, 64, 4, 1), 128: (32, 32, 4, 1), 256: (16, 32, 8, 1)},
    ("float32", False): {32: (64, 32, 4, 2), 64: (32, 64, 4, 2), 128: (64, 32, 4, 2), 256: (32, 32, 4, 2)},
    ("float32", True): {128: (32, 32, 4, 1), 256: (16, 32, 4, 1)},
}


def _config(block_d: int, dtype: torch.dtype, backward: bool) -> dict:
    table = _CONFIGS["float32" if dtype == torch.float32 else "half", backward]
    m, n, warps, stages = table[min(d for d in table if d >= block_d)]
    return dict(BLOCK_M=m, BLOCK_N=n, num_warps=warps, num_stages=stages)


def _precision(dtype: torch.dtype) -> tuple[bool, str]:
    dot_f32 = dtype == torch.bfloat16 and interpreter_on()
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not interpreter_on()
    return dot_f32, "tf32" if tf32 else "ieee"


def attention_fwd(q, k, v, scale):
    B, H, L, D = q.shape
    DV = v.shape[-1]
    o = torch.empty(B, H, L, DV, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, L, dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse
    cfg = _config(max(_block_d(D), _block_d(DV)), q.dtype, backward=False)
    dot_f32, precision = _precision(q.dtype)
    grid = (triton.cdiv(L, cfg["BLOCK_M"]), B * H)
    _attn_fwd_kernel[grid](
        q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(), H, L, D, DV, scale * LOG2E,
        BLOCK_D=_block_d(D), BLOCK_DV=_block_d(DV), DOT_F32=dot_f32, PRECISION=precision, **cfg,
    )  # fmt: skip
    return o, lse


def attention_bwd(do, q, k, v, o, lse, scale):
    B, H, L, D = q.shape
    DV = v.shape[-1]
    dq = torch.empty(B, H, L, D, dtype=q.dtype, device=q.device)
    dk = torch.empty_like(dq)
    dv = torch.empty(B, H, L, DV, dtype=v.dtype, device=q.device)
    if dq.numel() == 0:
        return dq, dk, dv
    delta = torch.empty_like(lse)
    _attn_bwd_preprocess_kernel[(triton.cdiv(L, 64), B * H)](
        o, do, delta, *do.stride(), H, L, DV, BLOCK_M=64, BLOCK_DV=_block_d(DV), num_warps=4,
    )  # fmt: skip
    cfg = _config(max(_block_d(D), _block_d(DV)), q.dtype, backward=True)
    dot_f32, precision = _precision(q.dtype)
    args = (*q.stride(), *k.stride(), *v.stride(), *do.stride(), H, L, D, DV, scale * LOG2E, scale)
    meta = dict(BLOCK_D=_block_d(D), BLOCK_DV=_block_d(DV), DOT_F32=dot_f32, PRECISION=precision, **cfg)
    _attn_bwd_dkdv_kernel[(triton.cdiv(L, cfg["BLOCK_N"]), B * H)](q, k, v, do, lse, delta, dk, dv, *args, **meta)
    _attn_bwd_dq_kernel[(triton.cdiv(L, cfg["BLOCK_M"]), B * H)](q, k, v, do, lse, delta, dq, *args, **meta)
    return dq, dk, dv


class AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        o, lse = attention_fwd(q, k, v, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale = scale
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = attention_bwd(do, q, k, v, o, lse, ctx.scale)
        return dq, dk, dv, None


def attention(q, k, v, scale=None):
    """Fused twin of ddpm_fast.reference.attention (same signature, same result)."""
    if not use_triton(q.device):
        return reference.attention(q, k, v, scale)
    checks.check_attention(q, k, v)
    for name, x in (("q", q), ("v", v)):
        if not 1 <= x.shape[-1] <= MAX_HEAD_DIM:
            raise ValueError(f"{name}'s head dim must be in [1, {MAX_HEAD_DIM}], got {x.shape[-1]}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite number, got {scale!r}")
    return AttentionFunction.apply(q, k, v, float(scale))
