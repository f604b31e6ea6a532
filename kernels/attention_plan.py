"""What each attention launch runs: its tiles, its precision, its split of the head dim, and the
per-shape plan of a forward call (ddpm_fast.kernels.attention holds the kernels, launchers and op).

- Tiles: a short list per (dtype class, head dim, GPU generation), autotuned on a GPU (keyed on
  what changes the best tile, cached on disk, configurations that spill pruned at compile time);
  the interpreter runs the first entry.
- Precision: float32 runs on tensor cores, in TF32 where torch allows it, else as 3xTF32; past
  TF32X3_HOLD the 3xTF32 kernels run chunked (TF32X3_CHUNKED).
- Plans: a forward call's strides, sizes and constexprs, computed once per (shape, strides,
  dtype, device) (_common.Plans).
"""

import torch
import triton

from ddpm_fast.kernels import _common
from ddpm_fast.kernels._common import Plans, cdiv, interpreter_on, meta_key, next_power_of_2, tf32_matmul

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
# 256 tokens and at 49, whose masked last tiles need more registers (searched with ddpm_fast.tools.aot;
# entries that spilled only there were dropped). Other Triton releases spill a few entries: on a
# GPU spill_free drops those before tuning, and tests/tools/test_compile.py checks that every launch
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
        ("half", 512, "chunked"): [(64, 32, 8, 2), (64, 16, 8, 2), (32, 64, 8, 1)],
        ("float32", 512, "chunked"): [(16, 16, 8, 1), (16, 32, 8, 1)],
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
        ("half", 512, "chunked"): [(64, 32, 8, 2), (64, 64, 8, 1), (128, 32, 8, 1)],
        ("float32", 512, "chunked"): [(16, 16, 8, 2), (16, 32, 8, 1)],
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
        ("half", 512, "chunked"): [(32, 32, 8, 1), (64, 32, 8, 1)],  # Triton 3.6 spills 16 B in the second
        ("float32", 512, "chunked"): [(16, 16, 8, 1)],
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
        ("half", 512, "chunked"): [(32, 64, 8, 1)],
        ("float32", 512, "chunked"): [(16, 16, 8, 1)],
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
        ("half", 512, "chunked"): [(64, 32, 8, 1), (64, 16, 8, 1), (32, 32, 8, 1)],
        ("float32", 512, "chunked"): [(16, 32, 8, 1)],
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
        ("half", 512, "chunked"): [(64, 16, 8, 2), (64, 16, 8, 1), (32, 32, 8, 1)],
        ("float32", 512, "chunked"): [(16, 16, 8, 1)],
    },
}


def _block_d(d: int) -> int:
    return max(16, next_power_of_2(d))  # tl.dot needs K >= 16


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
        named = {**named_args, **kwargs}  # the constexprs come by position (the forward) or by keyword
        block = max(named["BLOCK_D"], named["BLOCK_DV"])
        key = (_arch(), *_table_key(named["Q_ptr"].dtype, block, named["R_CHUNK"] > 0))
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


def _autotuned(kernel, tables):
    """The kernel autotuned over its tables, keyed on what changes the best tile (_TUNING_KEY: the
    token count, head dims and head-dim strides; Triton adds the dtypes) and not on the batch or
    the number of heads (the grid), so a new batch size reuses the choice. The choice is cached
    on disk (Triton's cache_results, in its cache dir, keyed on the kernel source, the GPU, the
    Triton version and the configurations left after spill_free): a second process, or a second
    run of `ddpm-fast sample`, tunes nothing."""
    prune = {"early_config_prune": _pruner(tables, kernel)}
    return triton.autotune(_configs(tables), key=_TUNING_KEY, prune_configs_by=prune, cache_results=True)(kernel)


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
TF32X3_HOLD = {"fwd": 128, "dkdv": 64, "dq": 64}
TF32X3_CHUNKED = {
    "fwd": {256: (2, 128), 512: (4, 64)},
    "dkdv": {128: (1, 64), 256: (2, 64), 512: (8, 32)},
    "dq": {128: (1, 64), 256: (2, 64), 512: (8, 64)},
}
# At 512 3xTF32 takes smaller pieces than at 256: the forward sums q k^T 64 columns at a time
# (with 128, as at 256, every tile spilled 16-120 B under Triton 3.6), and the backward splits
# its outputs over 8 programs of 64 (with 4 of 128 no dK/dV tile was free of spills on sm_90,
# 8-144 B), summing 32 columns at a time in the dK/dV kernel and 64 in the dQ kernel: under
# Triton 3.6 on sm_90 each spilled 8-32 B in every tile tried at the other's width.
# Half precision and TF32 hold the whole head dim up to 256 (their tiles above); at 512 (one head of
# 512 channels: the google/ddpm-*-256 checkpoints' 16x16 attention) they run chunked too, with
# per-program outputs as wide as a held 256 (half) or 3xTF32's own at 512 (TF32, which shares the
# float32 tile lists). Head dim -> (SPLIT, R_CHUNK), as TF32X3_CHUNKED. The 512 tile lists were
# searched by compiling for sm_80 and sm_90 under Triton 3.6 and 3.8 at 256 and 49 tokens,
# token-major and transposed: the chunked loops keep more in shared memory, which ruled out most
# tiles of two or more stages on A100 (163 KiB).
HOLD = {"fwd": 256, "dkdv": 256, "dq": 256}
CHUNKED = {
    "half": {"fwd": {512: (2, 128)}, "dkdv": {512: (2, 64)}, "dq": {512: (2, 64)}},
    "tf32": TF32X3_CHUNKED,
}


def _precision(dtype: torch.dtype) -> tuple[bool, str]:
    """(DOT_F32, PRECISION). float32 runs on tensor cores: "tf32" where torch lets its own
    float32 matmuls use TF32 (_common.tf32_matmul), else "tf32x3" (each operand split into a TF32
    high part and a TF32 remainder, three MMAs: a b ~ a_hi b_hi + a_hi b_lo + a_lo b_hi,
    float32-level error, where IEEE FMA dots run at a fraction of cuBLAS). The interpreter
    computes every dot in IEEE float32 whatever the precision (numpy), so its tests check the
    rest of the kernel (the chunked kernels included); 3xTF32's arithmetic itself is checked on a CPU by an
    eager emulation (tests/test_attention.py) and on a GPU by `ddpm-fast check`."""
    if dtype != torch.float32:
        return dtype == torch.bfloat16 and _common.INTERPRET, "ieee"  # half dots: precision unused
    if not _common.INTERPRET and tf32_matmul():
        return False, "tf32"
    return False, "tf32x3"


def _split(precision: str, block_d: int, block_dv: int, kernel: str) -> dict:
    """SPLIT, D_CHUNK, DV_CHUNK (the head dims of one program's outputs) and R_CHUNK (0: the head
    dim held whole) for `kernel` ("fwd", "dkdv" or "dq"): 3xTF32 past TF32X3_HOLD runs chunked
    (TF32X3_CHUNKED), half precision and TF32 past HOLD (CHUNKED); output chunks of at least 16,
    tl.dot's least K, a chunk past a short head dim masked out. Everything else holds its tiles
    whole."""
    block = max(block_d, block_dv)
    if precision == "tf32x3":
        hold, chunked = TF32X3_HOLD, TF32X3_CHUNKED
    else:
        hold, chunked = HOLD, CHUNKED["tf32" if precision == "tf32" else "half"]
    if block <= hold[kernel]:
        return dict(SPLIT=1, D_CHUNK=block_d, DV_CHUNK=block_dv, R_CHUNK=0)
    split, r_chunk = chunked[kernel][block]
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
        self.copies = any(self.copy)
        self.o_size, self.lse_size = (B, H, L, DV), (B, H, L)
        self.o_stride = (H * L * DV, L * DV, DV, 1)  # contiguous
        self.device = q.device
        self.empty = B * H * L * DV == 0
        self.ints = (*strides[0], *strides[1], *strides[2], H, L, D, DV)
        self.block_d, self.block_dv = _block_d(D), _block_d(DV)
        self.programs, self.L = B * H, L
        self.dtype = q.dtype
        self.launches = {}  # precision -> (constexprs, grid, chunked)

    def launch(self, precision):
        """The forward launch's constexprs before its tile, in the kernel's order (BLOCK_D,
        BLOCK_DV, SPLIT, D_CHUNK, DV_CHUNK, R_CHUNK, DOT_F32, PRECISION), its grid, and whether it
        runs chunked (R_CHUNK > 0: the tile tables' key), at `precision` ((DOT_F32, PRECISION):
        TF32 may be switched between calls)."""
        found = self.launches.get(precision)
        if found is None:
            dot_f32, prec = precision
            split = _split(prec, self.block_d, self.block_dv, "fwd")
            constexprs = (self.block_d, self.block_dv, split["SPLIT"], split["D_CHUNK"], split["DV_CHUNK"],
                          split["R_CHUNK"], dot_f32, prec)  # fmt: skip
            programs, L, n = self.programs, self.L, split["SPLIT"]
            grid = lambda cfg: (programs * cdiv(L, cfg["BLOCK_M"]) * n,)  # noqa: E731
            found = self.launches[precision] = (constexprs, grid, split["R_CHUNK"] > 0)
        return found


_FWD_PLANS = Plans()


def _fwd_plan(q, k, v) -> _FwdPlan:
    return _FWD_PLANS.get((meta_key(q), meta_key(k), meta_key(v)), lambda: _FwdPlan(q, k, v))
