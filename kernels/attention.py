"""Fused (flash) attention for the U-Net: softmax(q k^T * scale) v, non-causal, forward and backward.

The algorithm, forward and backward, is written out above the kernels (attention_kernels.py);
tiles, precision and plans are in attention_plan.py.

Contract
- q, k: (B, H, L, d); v: (B, H, L, d_v); any strides. The layout read best has the head dim
  contiguous (token-major, as the U-Net's AttnBlock now produces q, k, v from one GEMM); the
  transposed views of a conv output (L contiguous) also run, and compile without spills: read in
  place where L % 16 == 0, else copied to token-major first (`_tile_friendly`).
  L any length >= 1, d and d_v from 1 to 512, any B * H (the grid is one flat axis); float32,
  float16, bfloat16, all three the same dtype, on one device. Output: (B, H, L, d_v), q's dtype.
- float16 / bfloat16 run on tensor cores (mma on sm_80, wgmma on sm_90 where Triton emits it);
  tiles (BLOCK_M 64-128, 2-4 stages) are autotuned on a GPU over a short list pruned by head
  dim and dtype, keyed on (L, d, d_v, the head-dim strides, dtype); the interpreter runs one
  fixed tile. Scores, softmax and accumulation in float32. float32 inputs multiply on tensor
  cores: in TF32 where torch allows it for the eager matmul too (torch.backends.cuda.matmul.fp32_precision
  or the legacy allow_tf32: _common.tf32_matmul), else as 3xTF32 (float32-level error) at every
  head dim: past 128 in the forward and 64 in the backward (where a 3xTF32 tile holding the whole
  head dim spills registers) the kernels run chunked, the head dim split over programs at 256
  (TF32X3_CHUNKED). At 512 (one head of 512 channels, as in the google/ddpm-*-256 checkpoints)
  every precision runs chunked (CHUNKED): half over 2 programs of 256, float32 over 4 of 128
  forward and 8 of 64 backward.
- bfloat16: Triton's interpreter computes tl.dot of bfloat16 operands wrongly, so under the
  interpreter (only) bfloat16 tiles are widened to float32 before each tl.dot (DOT_F32).
  That is the same arithmetic as the GPU's bfloat16 MMA: a product of two bfloat16 values is
  exact in float32 and both accumulate in float32; P is rounded to bfloat16 before P V on
  both paths. So the interpreter tests check our bfloat16 kernel's arithmetic; the one part
  they cannot check is the hardware MMA itself.
- A PyTorch custom op (ddpm_fast::attention, with a fake kernel and an autograd formula).
- Tested under TRITON_INTERPRET=1 against the eager twin in float64: output, dq, dk, dv for
  L in {16, 49, 64, 256}, d in {32, 64, 256, 512}, batch 1 and 3, several heads, the U-Net's
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
from ddpm_fast.kernels.attention_kernels import (
    _attn_bwd_preprocess_kernel,
    _attn_dkdv,
    _attn_dq,
    _attn_fwd,
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

MAX_HEAD_DIM = 512
LOG2E = 1.4426950408889634


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
    constexprs, grid, chunked = plan.launch(_precision(plan.dtype))
    with _common.launch_device(plan.device):  # the tensors' GPU current (multi-GPU)
        if _common.INTERPRET:  # the interpreter's one tile, looked up here: plans are shared with GPU launches
            cfg = _fixed(FWD_CONFIGS, plan.dtype, max(plan.block_d, plan.block_dv), chunked)
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
    # (64, 512) float32 tiles of o and dO spilled 4.5-5 KB, (32, 512) 16 B under Triton 3.6
    rows = 64 if block_dv <= 256 else 8192 // block_dv
    _attn_bwd_preprocess_kernel[(B * H * cdiv(L, rows),)](
        o, do, delta, *do.stride(), H, L, DV, BLOCK_M=rows, BLOCK_DV=block_dv, num_warps=4,
    )  # fmt: skip
    dot_f32, precision = _precision(q.dtype)
    args = (*q.stride(), *k.stride(), *v.stride(), *do.stride(), H, L, D, DV, scale * LOG2E, scale)
    meta = dict(BLOCK_D=block_d, BLOCK_DV=block_dv, DOT_F32=dot_f32, PRECISION=precision)
    dkdv, dq_meta = (dict(meta, **_split(precision, block_d, block_dv, kernel)) for kernel in ("dkdv", "dq"))
    bd = max(block_d, block_dv)
    _launch(_attn_dkdv, _attn_dkdv_tuned, DKDV_CONFIGS, q.dtype, bd,
            lambda cfg: B * H * cdiv(L, cfg["BLOCK_N"]) * dkdv["SPLIT"], (q, k, v, do, lse, delta, dk, dv, *args),
            dkdv)  # fmt: skip
    _launch(_attn_dq, _attn_dq_tuned, DQ_CONFIGS, q.dtype, bd,
            lambda cfg: B * H * cdiv(L, cfg["BLOCK_M"]) * dq_meta["SPLIT"], (q, k, v, do, lse, delta, dq, *args),
            dq_meta)  # fmt: skip
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
    call = _CALLS.entries.get(key)
    if call is None:  # checks on a miss only
        call = _CALLS.add(key, _Call(q, k, v, scale))
    if direct_launch(q, k, v):  # eager, no gradient: the launcher itself
        return attention_fwd(q, k, v, call.scale, call.plan, call.lse)[0]
    return attention_op(q, k, v, call.scale)[0]
