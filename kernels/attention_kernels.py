"""The Triton kernels of the fused attention (ddpm_fast.kernels.attention holds the contract,
launchers, custom op and entry point; attention_plan the tiles, precision and plans).

Forward (Dao et al. 2022, online softmax): for each block of BLOCK_M queries, loop over
blocks of BLOCK_N keys keeping the running row max m, the running sum l and the output
accumulator in float32; rows are rescaled by exp(m_old - m_new) as m grows. The L x L
scores never leave the chip. Saved for the backward: q, k, v, the output and the per-row
log-sum-exp (B, H, L) in float32: memory linear in L (the eager path keeps L x L probabilities).
Backward (recompute): delta = rowsum(dO * O); P = exp(S - lse) recomputed block by block;
    dV = P^T dO,  dP = dO V^T,  dS = P * (dP - delta),  dQ = scale dS K,  dK = scale dS^T Q
in two kernels, one over key blocks (dK, dV) and one over query blocks (dQ): no atomics,
deterministic.

The tile (BLOCK_M, BLOCK_N) is the autotuner's; EVEN_N / EVEN_M (no masked last block) are set
by the heuristics below from L and the tile.
"""

import triton
import triton.language as tl


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
