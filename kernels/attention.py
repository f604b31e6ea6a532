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
  shared memory (python -m ddpm_fast.tools.aot, tests/tools/test_compile.py).

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
from ddpm_fast.kernels import _common
from ddpm_fast.kernels._common import (
    Plans,
    cdiv,
    direct_launch,
    interpreter_on,
    on_input_device,
    use_triton,
)
from ddpm_fast.kernels.attention_plan import (
    DKDV_CONFIGS,
    DQ_CONFIGS,
    FWD_CONFIGS,
    _autotuned,
    _block_d,
    _fixed,
    _fwd_plan,
    _precision,
    _split,
    _tile_friendly,
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
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, SPLIT: tl.constexpr, D_CHUNK: tl.constexpr,
    DV_CHUNK: tl.constexpr, R_CHUNK: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr,
):  # fmt: skip
    # (The tile, the autotuner's, and EVEN_N, its heuristic's, come last: a launch passes the
    # constexprs before them by position, which costs the host less than keywords.)
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


_attn_fwd = triton.heuristics({"EVEN_N": lambda a: a["L"] % a["BLOCK_N"] == 0})(_attn_fwd_kernel)
_attn_dkdv = triton.heuristics({"EVEN_M": lambda a: a["L"] % a["BLOCK_M"] == 0})(_attn_bwd_dkdv_kernel)
_attn_dq = triton.heuristics({"EVEN_N": lambda a: a["L"] % a["BLOCK_N"] == 0})(_attn_bwd_dq_kernel)


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


def attention_fwd(q, k, v, scale, plan=None, lse=None):
    """(o, lse); `plan`: the call's _FwdPlan where the caller has it; `lse`: a buffer to write the
    log-sum-exp to (a caller that runs no backward passes scratch it keeps)."""
    if plan is None:
        plan = _fwd_plan(q, k, v)
    if plan.copies:
        q, k, v = (x.contiguous() if c else x for x, c in zip((q, k, v), plan.copy))
    o = q.new_empty_strided(plan.o_size, plan.o_stride)  # (the cheapest allocation: ~0.6x torch.empty's host time)
    if lse is None:
        lse = q.new_empty(plan.lse_size, dtype=torch.float32)
    if plan.empty:
        return o, lse
    constexprs, grid = plan.launch(_precision(plan.dtype))
    with _common.launch_device(plan.device):  # the tensors' GPU current (multi-GPU)
        if _common.INTERPRET:  # the interpreter's one tile, looked up here: plans are shared with GPU launches
            cfg = _fixed(FWD_CONFIGS, plan.dtype, max(plan.block_d, plan.block_dv), constexprs[5] > 0)
            _attn_fwd[grid(cfg)](q, k, v, o, lse, *plan.ints, scale * LOG2E, *constexprs, **cfg)
        else:
            _attn_fwd_tuned[grid](q, k, v, o, lse, *plan.ints, scale * LOG2E, *constexprs)
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
    _attn_bwd_preprocess_kernel[(B * H * cdiv(L, 64),)](
        o, do, delta, *do.stride(), H, L, DV, BLOCK_M=64, BLOCK_DV=block_dv, num_warps=4,
    )  # fmt: skip
    dot_f32, precision = _precision(q.dtype)
    args = (*q.stride(), *k.stride(), *v.stride(), *do.stride(), H, L, D, DV, scale * LOG2E, scale)
    meta = dict(BLOCK_D=block_d, BLOCK_DV=block_dv, DOT_F32=dot_f32, PRECISION=precision)
    meta.update(_split(precision, block_d, block_dv, "bwd"))
    bd, split = max(block_d, block_dv), meta["SPLIT"]
    _launch(_attn_dkdv, _attn_dkdv_tuned, DKDV_CONFIGS, q.dtype, bd,
            lambda cfg: B * H * cdiv(L, cfg["BLOCK_N"]) * split, (q, k, v, do, lse, delta, dk, dv, *args),
            meta)  # fmt: skip
    _launch(_attn_dq, _attn_dq_tuned, DQ_CONFIGS, q.dtype, bd,
            lambda cfg: B * H * cdiv(L, cfg["BLOCK_M"]) * split, (q, k, v, do, lse, delta, dq, *args),
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
    # (meta_key written out: a call per tensor costs ~2% of the call)
    key = (q.shape, q.stride(), q.dtype, q.device, k.shape, k.stride(), k.dtype, k.device, v.shape, v.stride(), v.dtype,
           v.device, type(scale), scale)  # fmt: skip
    call = _CALLS.find(key)
    if call is None:  # checks on a miss only
        call = _CALLS.add(key, _Call(q, k, v, scale))
    if direct_launch(q, k, v):  # eager, no gradient: the launcher itself
        return attention_fwd(q, k, v, call.scale, call.plan, call.lse)[0]
    return attention_op(q, k, v, call.scale)[0]
