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
- q, k: (B, H, L, d); v: (B, H, L, d_v); any strides. The layout read best has the head dim
  contiguous (token-major, as the U-Net's AttnBlock now produces q, k, v from one GEMM); the
  transposed views of a conv output (L contiguous) also run, and compile without spills: read in
  place where L % 16 == 0, else copied to token-major first (`_tile_friendly`).
  L any length >= 1, d and d_v from 1 to 256, any B * H (the grid is one flat axis); float32,
  float16, bfloat16, all three the same dtype, on one device. Output: (B, H, L, d_v), q's dtype.
- float16 / bfloat16 run on tensor cores (mma on sm_80, wgmma on sm_90 where Triton emits it);
  tiles (BLOCK_M 64-128, 2-4 stages) are autotuned on a GPU over a short list pruned by head
  dim and dtype, keyed on (L, d, d_v, the head-dim strides, dtype); the interpreter runs one
  fixed tile. Scores, softmax and accumulation in float32. float32 inputs multiply on tensor
  cores: in TF32 where torch allows it for the eager matmul too (torch.backends.cuda.matmul.fp32_precision
  or the legacy allow_tf32: _common.tf32_matmul), else as 3xTF32 (float32-level error) at every
  head dim: past 128 in the forward and 64 in the backward (where a 3xTF32 tile holding the whole
  head dim spills registers) the kernels run chunked, the head dim split over programs at 256
  (TF32X3_CHUNKED).
- bfloat16: Triton's interpreter computes tl.dot of bfloat16 operands wrongly, so under the
  interpreter (only) bfloat16 tiles are widened to float32 before each tl.dot (DOT_F32).
  That is the same arithmetic as the GPU's bfloat16 MMA: a product of two bfloat16 values is
  exact in float32 and both accumulate in float32; P is rounded to bfloat16 before P V on
  both paths. So the interpreter tests check our bfloat16 kernel's arithmetic; the one part
  they cannot check is the hardware MMA itself.
- A PyTorch custom op (ddpm_fast::attention, with a fake kernel and an autograd formula).
- Tested under TRITON_INTERPRET=1 against the eager twin in float64: output, dq, dk, dv for
  L in {16, 49, 64, 256}, d in {32, 64, 256}, batch 1 and 3, several heads, the U-Net's
  token-major q/k/v, transposed and strided inputs, non-contiguous upstream gradients and
  B * H > 65,535; every autotune config compiles for sm_80 and sm_90 without spills and within
  shared memory (python -m ddpm_fast.aot, tests/test_compile.py).

FLOPs: forward 4 B H L^2 d (two matmuls), backward 10 B H L^2 d (five, one the recompute); a
split kernel recomputes its products over the whole head dim once per program (TF32X3_CHUNKED).
Traffic: reads q, k, v once per query block and writes the output: O(B H L d), where the
eager path writes and reads the (B, H, L, L) scores and probabilities several times (a split
kernel's programs of one block are neighbours in the grid: their re-reads are L2 hits).
"""

import math

import torch
import triton
import triton.language as tl

from ddpm_fast import checks, reference
from ddpm_fast.kernels._common import (
    Plans,
    cdiv,
    direct_call,
    interpreter_on,
    meta_key,
    on_input_device,
    tf32_matmul,
    use_triton,
)

MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634


@triton.jit
def _mm(a, b, DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    """a @ b accumulated in float32 (DOT_F32: widen the operands first; see the header)."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _mm_chunked(
    a_ptr, a_rows, a_valid, stride_ar, stride_ak, b_ptr, b_rows, b_valid, stride_br, stride_bk, K,
    BLOCK_K: tl.constexpr, CHUNK: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """a[a_rows, :K] @ b[b_rows, :K]^T in float32, CHUNK columns of the head dim at a time, each
    chunk loaded where it is used (from L1/L2 after its first read): the split kernels' product
    over the whole head dim without holding a (rows, head dim) tile of either operand."""
    acc = tl.zeros((a_rows.shape[0], b_rows.shape[0]), tl.float32)
    for c in tl.static_range(0, BLOCK_K, CHUNK):
        offs_k = c + tl.arange(0, CHUNK)
        k_valid = offs_k < K
        a = tl.load(a_ptr + a_rows[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                    mask=a_valid[:, None] & k_valid[None, :], other=0.0)  # fmt: skip
        bT = tl.load(b_ptr + b_rows[None, :] * stride_br + offs_k[:, None] * stride_bk,
                     mask=b_valid[None, :] & k_valid[:, None], other=0.0)  # fmt: skip
        acc += _mm(a, bT, DOT_F32, PRECISION)
    return acc


@triton.jit
def _attn_fwd_kernel(
    Q_ptr, K_ptr, V_ptr, O_ptr, LSE_ptr,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    H, L, D, DV, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    SPLIT: tl.constexpr, D_CHUNK: tl.constexpr, DV_CHUNK: tl.constexpr, R_CHUNK: tl.constexpr,
    EVEN_N: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # One flat grid: the query blocks of one (batch, head) are neighbours, so its K and V stay in L2;
    # with SPLIT > 1 the SPLIT programs of one query block (one DV_CHUNK of the output each) too.
    pid = tl.program_id(0)
    pid_c = 0
    if SPLIT > 1:
        pid_c = pid % SPLIT
        pid = pid // SPLIT
    num_m = tl.cdiv(L, BLOCK_M)
    pid_bh, pid_m = pid // num_m, pid % num_m
    b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = pid_c * DV_CHUNK + tl.arange(0, DV_CHUNK)
    q_base = Q_ptr + b * stride_qb + h * stride_qh
    k_base = K_ptr + b * stride_kb + h * stride_kh
    if R_CHUNK == 0:
        q = tl.load(q_base + offs_m[:, None] * stride_ql + offs_d[None, :] * stride_qd,
                    mask=(offs_m < L)[:, None] & (offs_d < D)[None, :], other=0.0)  # fmt: skip
    kT_ptrs = k_base + offs_n[None, :] * stride_kl + offs_d[:, None] * stride_kd
    v_ptrs = V_ptr + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vl + offs_dv[None, :] * stride_vd

    # Running row max (base-2 units), running sum of exponentials and output accumulator.
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, DV_CHUNK), tl.float32)
    for start_n in range(0, L, BLOCK_N):
        kn = start_n + offs_n
        # s = q k^T * scale * log2(e): exp2 of it is exp of the scaled score.
        if R_CHUNK == 0:
            kT = tl.load(kT_ptrs + start_n * stride_kl, mask=(kn < L)[None, :] & (offs_d < D)[:, None], other=0.0)
            s = _mm(q, kT, DOT_F32, PRECISION) * qk_scale
        else:
            s = _mm_chunked(q_base, offs_m, offs_m < L, stride_ql, stride_qd, k_base, kn, kn < L, stride_kl, stride_kd,
                            D, BLOCK_D, R_CHUNK, DOT_F32, PRECISION) * qk_scale  # fmt: skip
        if not EVEN_N:
            s = tl.where((kn < L)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)  # rescales what was accumulated under the old max
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptrs + start_n * stride_vl, mask=(kn < L)[:, None] & (offs_dv < DV)[None, :], other=0.0)
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, DOT_F32, PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    o_ptrs = O_ptr + pid_bh.to(tl.int64) * L * DV + offs_m[:, None] * DV + offs_dv[None, :]
    tl.store(o_ptrs, acc.to(O_ptr.dtype.element_ty), mask=(offs_m < L)[:, None] & (offs_dv < DV)[None, :])
    # base 2; with SPLIT > 1 every program of the query block has the same, the first writes it
    tl.store(LSE_ptr + pid_bh.to(tl.int64) * L + offs_m, m_i + tl.log2(l_i), mask=(offs_m < L) & (pid_c == 0))


@triton.jit
def _attn_bwd_preprocess_kernel(
    O_ptr, DO_ptr, DELTA_ptr,
    stride_dob, stride_doh, stride_dol, stride_dod,
    H, L, DV,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """delta = rowsum(dO * O) per query, in float32."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(L, BLOCK_M)
    pid_bh, pid_m = pid // num_m, pid % num_m
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
    SPLIT: tl.constexpr, D_CHUNK: tl.constexpr, DV_CHUNK: tl.constexpr, R_CHUNK: tl.constexpr,
    EVEN_M: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    pid_c = 0
    if SPLIT > 1:  # SPLIT programs per key block, one D_CHUNK of dK and one DV_CHUNK of dV each
        pid_c = pid % SPLIT
        pid = pid // SPLIT
    num_n = tl.cdiv(L, BLOCK_N)
    pid_bh, pid_n = pid // num_n, pid % num_n
    b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = pid_c * D_CHUNK + tl.arange(0, D_CHUNK)
    offs_dv = pid_c * DV_CHUNK + tl.arange(0, DV_CHUNK)
    n_valid = offs_n < L
    row_base = pid_bh.to(tl.int64) * L
    q_base = Q_ptr + b * stride_qb + h * stride_qh
    k_base = K_ptr + b * stride_kb + h * stride_kh
    v_base = V_ptr + b * stride_vb + h * stride_vh
    do_base = DO_ptr + b * stride_dob + h * stride_doh
    if R_CHUNK == 0:
        k = tl.load(k_base + offs_n[:, None] * stride_kl + offs_d[None, :] * stride_kd,
                    mask=n_valid[:, None] & (offs_d < D)[None, :], other=0.0)  # fmt: skip
        v = tl.load(v_base + offs_n[:, None] * stride_vl + offs_dv[None, :] * stride_vd,
                    mask=n_valid[:, None] & (offs_dv < DV)[None, :], other=0.0)  # fmt: skip
    q_ptrs = q_base + offs_m[:, None] * stride_ql + offs_d[None, :] * stride_qd
    do_ptrs = do_base + offs_m[:, None] * stride_dol + offs_dv[None, :] * stride_dod
    dk = tl.zeros((BLOCK_N, D_CHUNK), tl.float32)
    dv = tl.zeros((BLOCK_N, DV_CHUNK), tl.float32)
    for start_m in range(0, L, BLOCK_M):
        qm = start_m + offs_m
        m_valid = qm < L
        q = tl.load(q_ptrs + start_m * stride_ql, mask=m_valid[:, None] & (offs_d < D)[None, :], other=0.0)
        do = tl.load(do_ptrs + start_m * stride_dol, mask=m_valid[:, None] & (offs_dv < DV)[None, :], other=0.0)
        lse = tl.load(LSE_ptr + row_base + qm, mask=m_valid, other=0.0)
        delta = tl.load(DELTA_ptr + row_base + qm, mask=m_valid, other=0.0)
        # P recomputed from the saved log-sum-exp: no running max needed.
        if R_CHUNK == 0:
            s = _mm(q, tl.trans(k), DOT_F32, PRECISION) * qk_scale
        else:
            s = _mm_chunked(q_base, qm, m_valid, stride_ql, stride_qd, k_base, offs_n, n_valid, stride_kl, stride_kd,
                            D, BLOCK_D, R_CHUNK, DOT_F32, PRECISION) * qk_scale  # fmt: skip
        p = tl.exp2(s - lse[:, None])
        if EVEN_M:
            p = tl.where(n_valid[None, :], p, 0.0)
        else:
            p = tl.where(m_valid[:, None] & n_valid[None, :], p, 0.0)
        dv += _mm(tl.trans(p.to(do.dtype)), do, DOT_F32, PRECISION)
        if R_CHUNK == 0:
            dp = _mm(do, tl.trans(v), DOT_F32, PRECISION)
        else:
            dp = _mm_chunked(do_base, qm, m_valid, stride_dol, stride_dod, v_base, offs_n, n_valid, stride_vl,
                             stride_vd, DV, BLOCK_DV, R_CHUNK, DOT_F32, PRECISION)  # fmt: skip
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
    SPLIT: tl.constexpr, D_CHUNK: tl.constexpr, DV_CHUNK: tl.constexpr, R_CHUNK: tl.constexpr,
    EVEN_N: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    pid_c = 0
    if SPLIT > 1:  # SPLIT programs per query block, one D_CHUNK of dQ each
        pid_c = pid % SPLIT
        pid = pid // SPLIT
    num_m = tl.cdiv(L, BLOCK_M)
    pid_bh, pid_m = pid // num_m, pid % num_m
    b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = pid_c * D_CHUNK + tl.arange(0, D_CHUNK)
    m_valid = offs_m < L
    row_base = pid_bh.to(tl.int64) * L
    q_base = Q_ptr + b * stride_qb + h * stride_qh
    k_base = K_ptr + b * stride_kb + h * stride_kh
    v_base = V_ptr + b * stride_vb + h * stride_vh
    do_base = DO_ptr + b * stride_dob + h * stride_doh
    if R_CHUNK == 0:
        offs_dv = tl.arange(0, BLOCK_DV)
        q = tl.load(q_base + offs_m[:, None] * stride_ql + offs_d[None, :] * stride_qd,
                    mask=m_valid[:, None] & (offs_d < D)[None, :], other=0.0)  # fmt: skip
        do = tl.load(do_base + offs_m[:, None] * stride_dol + offs_dv[None, :] * stride_dod,
                     mask=m_valid[:, None] & (offs_dv < DV)[None, :], other=0.0)  # fmt: skip
        vT_ptrs = v_base + offs_n[None, :] * stride_vl + offs_dv[:, None] * stride_vd
    lse = tl.load(LSE_ptr + row_base + offs_m, mask=m_valid, other=0.0)
    delta = tl.load(DELTA_ptr + row_base + offs_m, mask=m_valid, other=0.0)
    k_ptrs = k_base + offs_n[:, None] * stride_kl + offs_d[None, :] * stride_kd
    dq = tl.zeros((BLOCK_M, D_CHUNK), tl.float32)
    for start_n in range(0, L, BLOCK_N):
        kn = start_n + offs_n
        n_valid = kn < L
        k = tl.load(k_ptrs + start_n * stride_kl, mask=n_valid[:, None] & (offs_d < D)[None, :], other=0.0)
        if R_CHUNK == 0:
            vT = tl.load(vT_ptrs + start_n * stride_vl, mask=n_valid[None, :] & (offs_dv < DV)[:, None], other=0.0)
            s = _mm(q, tl.trans(k), DOT_F32, PRECISION) * qk_scale
            dp = _mm(do, vT, DOT_F32, PRECISION)
        else:
            s = _mm_chunked(q_base, offs_m, m_valid, stride_ql, stride_qd, k_base, kn, n_valid, stride_kl, stride_kd,
                            D, BLOCK_D, R_CHUNK, DOT_F32, PRECISION) * qk_scale  # fmt: skip
            dp = _mm_chunked(do_base, offs_m, m_valid, stride_dol, stride_dod, v_base, kn, n_valid, stride_vl,
                             stride_vd, DV, BLOCK_DV, R_CHUNK, DOT_F32, PRECISION)  # fmt: skip
        p = tl.exp2(s - lse[:, None])
        if not EVEN_N:
            p = tl.where(n_valid[None, :], p, 0.0)
        ds = p * (dp - delta[:, None])
        dq += _mm(ds.to(k.dtype), k, DOT_F32, PRECISION)
    tl.store(DQ_ptr + (row_base + offs_m[:, None]) * D + offs_d[None, :], (dq * scale).to(DQ_ptr.dtype.element_ty),
             mask=m_valid[:, None] & (offs_d < D)[None, :])  # fmt: skip


# -- configurations: a short list per (dtype class, head dim, GPU generation), autotuned on a GPU ------

# (BLOCK_M, BLOCK_N, num_warps, num_stages). "half" runs on tensor cores; "float32" as 3xTF32 or
# TF32 (see _precision), holding bigger tiles in registers: smaller tiles, and entries that only
# one precision compiles clean (spill_free keeps, per launch, those clean at its own). The
# ("float32", d, "chunked") lists are the chunked 3xTF32 kernels' (TF32X3_CHUNKED): tiles of 16-32
# by 16-32, 4 or 8 warps, compiled for sm_80 and sm_90 under Triton 3.6 and 3.8 at 256 and 49
# tokens, token-major and transposed; the first entry of each is clean in all of those, the
# second under 3.8 (3.6 spills 8-24 B in it, pruned on the GPU).
# The list for a head dim (padded to a power of two, at least 64) holds
# every configuration the autotuner may pick on that GPU generation: sm80 (A100, and any GPU
# before Hopper) and sm90 (H100, and newer), which allocate registers differently (a tile that
# fits one spills on the other). Under Triton 3.9 each compiles without spills and within shared
# memory at the U-Net's token-major layout and the transposed one, IEEE and TF32 for float32, at
# 256 tokens and at 49, whose masked last tiles need more registers (searched with ddpm_fast.aot;
# entries that spilled only there were dropped). Other Triton releases spill a few entries: on a
# GPU spill_free drops those before tuning, and tests/test_compile.py checks that every launch
# keeps a clean one under the installed Triton. The first entry is the fixed one used where there
# is no autotuning.
FWD_CONFIGS = {
    "sm80": {
        ("half", 64): [(128, 64, 8, 4), (128, 128, 8, 3), (64, 128, 4, 2)],
        ("half", 128): [(128, 32, 8, 3), (64, 64, 8, 3)],
        ("half", 256): [(64, 64, 8, 2), (64, 32, 8, 3), (64, 32, 8, 2)],
        ("float32", 64): [(64, 32, 8, 2), (32, 32, 8, 2)],
        # Triton 3.6 spills 16-24 B in the first; 3xTF32 under 3.6 spills in both: the last two for it
        ("float32", 128): [(64, 32, 8, 2), (32, 32, 8, 2), (16, 32, 4, 2), (16, 32, 8, 1)],
        ("float32", 256): [(64, 16, 8, 2)],
        ("float32", 256, "chunked"): [(16, 16, 8, 2), (16, 32, 8, 2)],
    },
    "sm90": {
        ("half", 64): [(128, 64, 8, 4), (128, 128, 8, 3), (128, 64, 4, 3)],
        ("half", 128): [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 8, 3)],
        ("half", 256): [(128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 8, 3)],
        ("float32", 64): [(64, 32, 8, 2), (32, 64, 8, 2), (32, 32, 8, 2)],
        # Triton 3.8 spills 8 B in the first; 3xTF32 under 3.6 spills in both: the last two for it
        ("float32", 128): [(32, 64, 8, 2), (32, 32, 8, 2), (16, 32, 4, 2), (16, 32, 8, 1)],
        ("float32", 256): [(32, 16, 8, 1), (16, 16, 4, 1)],
        ("float32", 256, "chunked"): [(16, 16, 8, 2), (16, 32, 8, 2)],
    },
}
# Backward: the dK/dV kernel (BLOCK_N keys per program, looping over BLOCK_M queries) and the dQ
# kernel (BLOCK_M queries per program, looping over BLOCK_N keys); BLOCK_M >= 64 where it fits.
DKDV_CONFIGS = {
    "sm80": {
        ("half", 64): [(64, 64, 8, 2), (64, 32, 4, 2)],
        ("half", 128): [(64, 32, 8, 2), (64, 64, 8, 1), (32, 64, 8, 2)],
        ("half", 256): [(64, 32, 8, 1), (32, 64, 8, 1)],
        ("float32", 64): [(16, 32, 4, 1), (16, 16, 4, 1)],
        ("float32", 128): [(32, 32, 8, 1), (16, 32, 4, 1)],
        ("float32", 256): [(16, 16, 8, 1)],
        ("float32", 128, "chunked"): [(16, 32, 8, 1)],
        ("float32", 256, "chunked"): [(16, 32, 8, 1)],
    },
    "sm90": {
        ("half", 64): [(64, 64, 8, 2), (64, 64, 4, 3)],
        ("half", 128): [(64, 32, 8, 2), (64, 64, 8, 1), (32, 64, 8, 2)],
        ("half", 256): [(32, 64, 8, 1)],
        ("float32", 64): [(32, 32, 8, 1), (16, 32, 4, 1)],
        ("float32", 128): [(16, 16, 4, 1)],
        ("float32", 256): [(32, 16, 8, 1), (16, 16, 4, 1)],
        ("float32", 128, "chunked"): [(16, 32, 8, 1)],
        ("float32", 256, "chunked"): [(16, 32, 8, 1)],
    },
}
DQ_CONFIGS = {
    "sm80": {
        ("half", 64): [(128, 64, 8, 2), (128, 32, 4, 2), (64, 32, 4, 2)],
        ("half", 128): [(64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2)],
        ("half", 256): [(64, 32, 8, 2), (64, 64, 8, 2), (64, 16, 8, 2)],
        ("float32", 64): [(64, 32, 8, 1), (32, 32, 4, 1)],
        ("float32", 128): [(32, 32, 4, 1), (32, 16, 4, 1)],
        ("float32", 256): [(16, 16, 4, 1)],
        ("float32", 128, "chunked"): [(32, 16, 8, 1), (16, 32, 8, 1)],
        ("float32", 256, "chunked"): [(16, 32, 8, 1), (32, 16, 8, 1)],
    },
    "sm90": {
        ("half", 64): [(128, 64, 8, 2), (128, 128, 8, 2), (64, 64, 4, 3)],
        ("half", 128): [(64, 64, 8, 2), (128, 64, 8, 2), (128, 32, 8, 2)],
        ("half", 256): [(64, 32, 8, 2), (64, 16, 8, 2)],
        ("float32", 64): [(64, 32, 8, 1), (32, 32, 8, 1)],
        ("float32", 128): [(16, 32, 8, 1), (16, 64, 8, 1)],
        ("float32", 256): [(16, 32, 8, 2), (16, 16, 4, 2)],
        ("float32", 128, "chunked"): [(32, 16, 8, 1), (16, 32, 8, 1)],
        ("float32", 256, "chunked"): [(16, 32, 8, 1), (32, 16, 8, 1)],
    },
}


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))  # tl.dot needs K >= 16


def _arch() -> str:
    """The tables' GPU generation for the target Triton compiles for: "sm90" from Hopper on, else
    "sm80"; the interpreter runs the sm80 tiles."""
    if interpreter_on():
        return "sm80"
    from triton.runtime import driver

    return "sm90" if driver.active.get_current_target().arch >= 90 else "sm80"


def _table_key(dtype: torch.dtype, block_d: int, chunked: bool = False) -> tuple:
    """A table's key: (dtype class, head dim padded to a power of two >= 64), and "chunked" for
    the chunked 3xTF32 kernels (see TF32X3_CHUNKED), whose tiles hold less."""
    key = ("float32" if dtype == torch.float32 else "half", max(64, block_d))
    return (*key, "chunked") if chunked else key


def _configs(tables) -> list:
    """Every entry of every table as a triton.Config, tagged with the table it belongs to."""
    out = []
    for arch, table in tables.items():
        for key, entries in table.items():
            for m, n, warps, stages in entries:
                config = triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)
                config.table = (arch, *key)
                out.append(config)
    return out


def _pruner(tables, kernel):
    def prune(configs, named_args, **kwargs):
        block = max(kwargs["BLOCK_D"], kwargs["BLOCK_DV"])
        key = (_arch(), *_table_key(named_args["Q_ptr"].dtype, block, kwargs["R_CHUNK"] > 0))
        return spill_free(kernel, [c for c in configs if c.table == key], named_args, kwargs)

    return prune


def spill_free(kernel, configs, named_args, kwargs):
    """The configs whose kernel, compiled for this GPU at this launch, spills no registers (all of
    them where each spills): no spilling configuration is ever timed or picked, whichever Triton
    compiles (a list clean under one Triton release can spill under another: 3.8 gave 4-16 B to
    five float32 entries that 3.9 compiles clean). Each config is compiled here once per tuning
    key (warmup: no launch), then reused from Triton's cache by the benchmark that follows. A
    config that fails to compile is kept: the autotuner's benchmark already rules those out.
    Without a GPU (the interpreter, ahead-of-time compilation) nothing is pruned."""
    if interpreter_on() or not torch.cuda.is_available() or len(configs) < 2:
        return configs
    args = list(named_args.values())
    meta = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
    clean = []
    for config in configs:
        try:
            compiled = kernel.warmup(*args, grid=(1,), **meta, **config.all_kwargs())
            compiled._init_handles()  # loads the cubin: n_spills is the driver's count
            spills = compiled.n_spills
        except Exception:  # noqa: BLE001 (OutOfResources and the like: left to the autotuner's benchmark)
            spills = 0
        if not spills:
            clean.append(config)
    return clean or configs


def _fixed(tables, dtype: torch.dtype, block_d: int, chunked: bool = False) -> dict:
    m, n, warps, stages = tables[_arch()][_table_key(dtype, block_d, chunked)][0]
    return dict(BLOCK_M=m, BLOCK_N=n, num_warps=warps, num_stages=stages)


_TUNING_KEY = ["L", "D", "DV", "stride_qd", "stride_kd", "stride_vd"]
_attn_fwd = triton.heuristics({"EVEN_N": lambda a: a["L"] % a["BLOCK_N"] == 0})(_attn_fwd_kernel)
_attn_dkdv = triton.heuristics({"EVEN_M": lambda a: a["L"] % a["BLOCK_M"] == 0})(_attn_bwd_dkdv_kernel)
_attn_dq = triton.heuristics({"EVEN_N": lambda a: a["L"] % a["BLOCK_N"] == 0})(_attn_bwd_dq_kernel)


def _autotuned(kernel, tables):
    """The kernel autotuned over its tables, keyed on what changes the best tile (_TUNING_KEY: the
    token count, head dims and head-dim strides; Triton adds the dtypes) and not on the batch or
    the number of heads (the grid), so a new batch size reuses the choice. The choice is cached
    on disk (Triton's cache_results, in its cache dir, keyed on the kernel source, the GPU, the
    Triton version and the configurations left after spill_free): a second process, or a second
    run of `ddpm-fast sample`, tunes nothing."""
    prune = {"early_config_prune": _pruner(tables, kernel)}
    return triton.autotune(_configs(tables), key=_TUNING_KEY, prune_configs_by=prune, cache_results=True)(kernel)


_attn_fwd_tuned = _autotuned(_attn_fwd, FWD_CONFIGS)
_attn_dkdv_tuned = _autotuned(_attn_dkdv, DKDV_CONFIGS)
_attn_dq_tuned = _autotuned(_attn_dq, DQ_CONFIGS)


def _launch(fixed_fn, tuned_fn, table, dtype, block_d, programs, args, meta):
    """Launch over a flat grid of `programs(BLOCK)` programs: autotuned on a GPU, one fixed
    tile under the interpreter."""
    if interpreter_on():
        cfg = _fixed(table, dtype, block_d, meta["R_CHUNK"] > 0)
        fixed_fn[(programs(cfg),)](*args, **meta, **cfg)
    else:
        tuned_fn[lambda cfg: (programs(cfg),)](*args, **meta)


# -- launchers ----------------------------------------------------------------------------------------


# 3xTF32 needs the high and low TF32 parts of each operand tile live at once: about twice the
# registers of one float32 tile. Searched by compiling for sm_80 and sm_90 (tiles of 16-64 by
# 16-64, 4-16 warps, 1-2 stages) at 256 and 49 tokens, token-major and transposed: a tile holding
# the whole head dim compiles without spilling under Triton 3.6 and 3.8 up to head dim 128 in the
# forward and 64 in the backward (at 128, 3.6's sm_90 dQ kernel spills 8-184 B in every tile
# tried; at 256 every tile of every kernel spills, 0.1-17 KB per thread). Past these the kernels
# run "chunked": the products over the head dim (q k^T, and dO v^T in the backward) are summed
# R_CHUNK columns at a time, loaded where used (_mm_chunked), and where the accumulators
# themselves are too big the head dim of the outputs is split over SPLIT programs per block of
# rows. A split kernel recomputes the products over the whole head dim once per program: at
# d = 256 the forward does 1.5x the MMAs of an unsplit one, the backward 1.6x.
TF32X3_HOLD = {"fwd": 128, "bwd": 64}
TF32X3_CHUNKED = {"fwd": {256: (2, 128)}, "bwd": {128: (1, 64), 256: (2, 64)}}  # head dim -> (SPLIT, R_CHUNK)


def _precision(dtype: torch.dtype) -> tuple[bool, str]:
    """(DOT_F32, PRECISION). float32 runs on tensor cores: "tf32" where torch lets its own
    float32 matmuls use TF32 (_common.tf32_matmul), else "tf32x3" (each operand split into a TF32
    high part and a TF32 remainder, three MMAs: a b ~ a_hi b_hi + a_hi b_lo + a_lo b_hi,
    float32-level error, where IEEE FMA dots run at a fraction of cuBLAS). The interpreter
    computes every dot in IEEE float32 whatever the precision (numpy), so its tests check the
    rest of the kernel (the chunked kernels included); 3xTF32's arithmetic itself is checked on a CPU by an
    eager emulation (tests/test_attention.py) and on a GPU by `ddpm-fast check`."""
    if dtype != torch.float32:
        return dtype == torch.bfloat16 and interpreter_on(), "ieee"  # half dots: precision unused
    if not interpreter_on() and tf32_matmul():
        return False, "tf32"
    return False, "tf32x3"


def _split(precision: str, block_d: int, block_dv: int, kernel: str) -> dict:
    """SPLIT, D_CHUNK, DV_CHUNK (the head dims of one program's outputs) and R_CHUNK (0: the head
    dim held whole) for `kernel` ("fwd" or "bwd"): 3xTF32 past TF32X3_HOLD runs chunked
    (TF32X3_CHUNKED; output chunks of at least 16, tl.dot's least K, a chunk past a short head
    dim masked out); everything else holds its tiles whole."""
    block = max(block_d, block_dv)
    if precision != "tf32x3" or block <= TF32X3_HOLD[kernel]:
        return dict(SPLIT=1, D_CHUNK=block_d, DV_CHUNK=block_dv, R_CHUNK=0)
    split, r_chunk = TF32X3_CHUNKED[kernel][block]
    return dict(SPLIT=split, D_CHUNK=max(16, block_d // split), DV_CHUNK=max(16, block_dv // split), R_CHUNK=r_chunk)


def _reads_well(x: torch.Tensor) -> bool:
    return x.stride(-1) == 1 or all(s % 16 == 0 for s, n in zip(x.stride(), x.shape) if n > 1 and s != 1)


def _tile_friendly(x: torch.Tensor) -> torch.Tensor:
    """x as the kernels read it well: as it is when its head dim is contiguous (the U-Net's
    token-major q, k, v) or every stride but the unit one is a multiple of 16 elements (a
    transposed view with L % 16 == 0); else a contiguous copy. A transposed view with
    L % 16 != 0 (a 7x7 map) is loaded element by element, and its tiles then spill registers
    (up to 1.1 KB per thread at d = 256 on sm_90, found by compiling what the tests launch);
    the copy costs one pass over x, against the L^2 d of attention itself."""
    return x if _reads_well(x) else x.contiguous()


class _FwdPlan:
    """One forward launch's host work, from q, k, v's metadata (see _common.Plans)."""

    def __init__(self, q, k, v):
        B, H, L, D = q.shape
        DV = v.shape[-1]
        self.copy = tuple(not _reads_well(x) for x in (q, k, v))  # _tile_friendly's choice
        strides = [x.stride() if not c else x.contiguous().stride() for x, c in zip((q, k, v), self.copy)]
        self.o_size, self.lse_size = (B, H, L, DV), (B, H, L)
        self.empty = B * H * L * DV == 0
        self.ints = (*strides[0], *strides[1], *strides[2], H, L, D, DV)
        self.block_d, self.block_dv = _block_d(D), _block_d(DV)
        self.programs, self.L = B * H, L
        self.dtype = q.dtype
        self.launches = {}  # precision -> (constexprs, grid)

    def launch(self, precision):
        """The launch's constexprs and grid at `precision` ((DOT_F32, PRECISION): TF32 may be
        switched between calls)."""
        found = self.launches.get(precision)
        if found is None:
            dot_f32, prec = precision
            meta = dict(BLOCK_D=self.block_d, BLOCK_DV=self.block_dv, DOT_F32=dot_f32, PRECISION=prec)
            meta.update(_split(prec, self.block_d, self.block_dv, "fwd"))
            programs, L, split = self.programs, self.L, meta["SPLIT"]
            found = self.launches[precision] = (meta, lambda cfg: (programs * cdiv(L, cfg["BLOCK_M"]) * split,))
        return found


_FWD_PLANS = Plans()


def _fwd_plan(q, k, v) -> _FwdPlan:
    return _FWD_PLANS.get((meta_key(q), meta_key(k), meta_key(v)), lambda: _FwdPlan(q, k, v))


@on_input_device
def attention_fwd(q, k, v, scale, plan=None, lse=None):
    """(o, lse); `plan`: the call's _FwdPlan where the caller has it; `lse`: a buffer to write the
    log-sum-exp to (a caller that runs no backward passes scratch it keeps)."""
    if plan is None:
        plan = _fwd_plan(q, k, v)
    if any(plan.copy):
        q, k, v = (x.contiguous() if c else x for x, c in zip((q, k, v), plan.copy))
    o = q.new_empty(plan.o_size)  # (new_empty: half the host time of torch.empty(..., dtype, device))
    if lse is None:
        lse = q.new_empty(plan.lse_size, dtype=torch.float32)
    if plan.empty:
        return o, lse
    meta, grid = plan.launch(_precision(q.dtype))
    if interpreter_on():  # the interpreter's one tile, looked up here: plans are shared with GPU launches
        cfg = _fixed(FWD_CONFIGS, plan.dtype, max(plan.block_d, plan.block_dv), meta["R_CHUNK"] > 0)
        _attn_fwd[grid(cfg)](q, k, v, o, lse, *plan.ints, scale * LOG2E, **meta, **cfg)
    else:
        _attn_fwd_tuned[grid](q, k, v, o, lse, *plan.ints, scale * LOG2E, **meta)
    return o, lse


@on_input_device
def attention_bwd(do, q, k, v, o, lse, scale):
    do, q, k, v = map(_tile_friendly, (do, q, k, v))
    B, H, L, D = q.shape
    DV = v.shape[-1]
    dq = torch.empty(B, H, L, D, dtype=q.dtype, device=q.device)
    dk = torch.empty(B, H, L, D, dtype=k.dtype, device=q.device)
    dv = torch.empty(B, H, L, DV, dtype=v.dtype, device=q.device)
    if dq.numel() == 0:
        return dq, dk, dv
    delta = torch.empty_like(lse)
    block_d, block_dv = _block_d(D), _block_d(DV)
    _attn_bwd_preprocess_kernel[(B * H * triton.cdiv(L, 64),)](
        o, do, delta, *do.stride(), H, L, DV, BLOCK_M=64, BLOCK_DV=block_dv, num_warps=4,
    )  # fmt: skip
    dot_f32, precision = _precision(q.dtype)
    args = (*q.stride(), *k.stride(), *v.stride(), *do.stride(), H, L, D, DV, scale * LOG2E, scale)
    meta = dict(BLOCK_D=block_d, BLOCK_DV=block_dv, DOT_F32=dot_f32, PRECISION=precision)
    meta.update(_split(precision, block_d, block_dv, "bwd"))
    bd, split = max(block_d, block_dv), meta["SPLIT"]
    _launch(_attn_dkdv, _attn_dkdv_tuned, DKDV_CONFIGS, q.dtype, bd,
            lambda cfg: B * H * triton.cdiv(L, cfg["BLOCK_N"]) * split, (q, k, v, do, lse, delta, dk, dv, *args),
            meta)  # fmt: skip
    _launch(_attn_dq, _attn_dq_tuned, DQ_CONFIGS, q.dtype, bd,
            lambda cfg: B * H * triton.cdiv(L, cfg["BLOCK_M"]) * split, (q, k, v, do, lse, delta, dq, *args),
            meta)  # fmt: skip
    return dq, dk, dv


# -- the custom op: its path, fake (meta) kernel and autograd formula ---------------------------------


@torch.library.custom_op("ddpm_fast::attention", mutates_args=())
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse): the Triton kernel, or its eager twin where Triton does not run."""
    if use_triton(q.device):
        return attention_fwd(q, k, v, scale)
    o, lse = reference.attention_fwd(q, k, v, scale)
    return o.contiguous(), lse.contiguous()


@attention_op.register_fake
def _(q, k, v, scale):
    B, H, L, _ = q.shape
    return q.new_empty(B, H, L, v.shape[-1]), q.new_empty(B, H, L, dtype=torch.float32)


@torch.library.custom_op("ddpm_fast::attention_backward", mutates_args=())
def attention_backward_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    if use_triton(q.device):
        return attention_bwd(do, q, k, v, o, lse, scale)
    return tuple(g.contiguous() for g in reference.attention_bwd(do, q, k, v, o, lse, scale))


@attention_backward_op.register_fake
def _(do, q, k, v, o, lse, scale):
    return q.new_empty(q.shape), k.new_empty(q.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = attention_backward_op(do, q, k, v, o, lse, ctx.scale)
    return dq, dk, dv, None


attention_op.register_autograd(_backward, setup_context=_setup_context)


# -- the functional entry point -----------------------------------------------------------------------


class _Call:
    """A public call's checked arguments: its forward plan and scratch for the log-sum-exp of
    calls that no backward will read."""

    def __init__(self, q, k, v, scale):
        checks.check_attention(q, k, v)
        for name, x in (("q", q), ("v", v)):
            if not 1 <= x.shape[-1] <= MAX_HEAD_DIM:
                raise ValueError(f"{name}'s head dim must be in [1, {MAX_HEAD_DIM}], got {x.shape[-1]}")
        if scale is None:
            scale = q.shape[-1] ** -0.5
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise TypeError(f"scale must be a finite number, got {scale!r}")
        self.scale = float(scale)
        self.plan = _fwd_plan(q, k, v)
        self.lse = torch.empty(self.plan.lse_size, dtype=torch.float32, device=q.device)


_CALLS = Plans()


def attention(q, k, v, scale=None):
    """Fused twin of ddpm_fast.reference.attention (same signature, same result)."""
    key = (meta_key(q), meta_key(k), meta_key(v), type(scale), scale)
    call = _CALLS.get(key, lambda: _Call(q, k, v, scale))  # checks on a miss only
    if direct_call(q, k, v) and use_triton(q.device):  # eager, no gradient: the launcher itself
        return attention_fwd(q, k, v, call.scale, plan=call.plan, lse=call.lse)[0]
    return attention_op(q, k, v, call.scale)[0]
