"""How each GroupNorm(+SiLU) launch is planned (ddpm_fast.kernels.group_norm_silu holds the
kernels, launchers and op): groups per program (several in NHWC, so that a pixel's slice is long),
tiles and warps that compile without spilling, and whether a group is split over programs (the
two-kernel path, where the programs are too few to fill the GPU and each is too big to stream
through one SM). A forward call's plan is computed once per (shape, strides, dtype, device,
options) (_common.Plans); under the interpreter the plans are its one core's
(_common.plans_for_interpreter).
"""

import math

import torch

from ddpm_fast.kernels._common import Plans, cdiv, meta_key, next_power_of_2, plans_for_interpreter

MAX_TILE_FWD = 16384  # values held in registers by the one-kernel forward
MAX_TILE_BWD = 16384  # the backward keeps xhat and dh of the tile live between its passes
MIN_SPLIT_BYTES = 256 * 1024  # a program's groups smaller than this stream through one SM (~50 GB/s) in
# about what the split path's second launch costs: one kernel, however few programs
MIN_CONTIGUOUS_BYTES = 64  # NHWC: take groups together until a pixel's slice is this long
MAX_TILE_MULTI = 8192  # ... while the tile of several groups stays this small (more spills registers)
MAX_TILE_LOOP = 8192  # the tile of kernels that loop over a group (the split path): 16384 spilled 16-104 B
# there (128 channels of 128x128, found by compiling the split path at big groups)
MAX_TILE_LOOP_BWD = 4096  # the looped backward keeps more live: 8192 spilled 16 B under Triton 3.6 on sm_90


def _as_bchw(x: torch.Tensor) -> torch.Tensor:
    """(B, C, *spatial) as a (B, C, HW) view (a copy only if the spatial dims do not collapse)."""
    return x.reshape(x.shape[0], x.shape[1], math.prod(x.shape[2:]))  # (-1 is ambiguous for a batch of 0)


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-D channels_last x (kept NHWC end to end), else contiguous."""
    if x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _num_warps(tile: int, per_thread: int, most: int = 16) -> int:
    """Warps for a tile of `tile` values, about `per_thread` values per thread (registers); at least
    4 (with 2, ptxas gave the split-statistics kernel an 8-byte stack frame at small tiles)."""
    return max(4, min(most, tile // (32 * per_thread)))


def _bwd_warps(tile: int) -> int:
    """The backward keeps two tile-sized tensors live: 16 values per thread up to 16 warps, and 32
    warps (64 registers each) for the largest tile; measured spill-free with ddpm_fast.tools.aot."""
    return 32 if tile > 8192 else _num_warps(tile, 16)


def _target_programs(device: torch.device) -> int:
    """Programs that fill the GPU: two per SM (132 SMs on an H100 when there is no GPU to ask);
    one for the interpreter, which runs them one after another (plans_for_interpreter)."""
    if plans_for_interpreter(device):
        return 1
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 264


def group_block(G: int, cpg: int, hw: int, stride_c: int, element_size: int, interpreter: bool = False) -> int:
    """Groups per program: 1 in NCHW (a group is one contiguous run); in NHWC (stride_c == 1) as
    many as make a pixel's slice MIN_CONTIGUOUS_BYTES long (a power of two, at most G), fewer
    where that many would not fit one tile of MAX_TILE_MULTI with the whole of HW (one read beats
    longer runs; bigger multi-group tiles spill registers in the backward). For the interpreter
    (plans_for_interpreter), in any layout, as many groups as one tile of MAX_TILE_FWD holds
    with the whole of HW: fewer programs, and no registers to spill."""
    if interpreter:
        gb = next_power_of_2(G)
        while gb > 1 and next_power_of_2(gb * cpg) * next_power_of_2(hw) > MAX_TILE_FWD:
            gb //= 2
        return gb
    if stride_c != 1 or cpg * element_size >= MIN_CONTIGUOUS_BYTES:
        return 1
    gb = min(next_power_of_2(cdiv(MIN_CONTIGUOUS_BYTES, cpg * element_size)), next_power_of_2(G))
    while gb > 1 and next_power_of_2(gb * cpg) * next_power_of_2(hw) > MAX_TILE_MULTI:
        gb //= 2
    return gb


def _tile(gb: int, cpg: int, hw: int, max_tile: int) -> tuple[int, int]:
    block_c = next_power_of_2(gb * cpg)
    return block_c, min(next_power_of_2(hw), max(16, max_tile // block_c))


def forward_plan(B: int, G: int, cpg: int, hw: int, device: torch.device, split=None, gb: int = 1,
                 element_size: int = 4):  # fmt: skip
    """(split, BLOCK_C, BLOCK_HW). split = 0: one kernel, each program's groups in one tile;
    split = k: statistics then apply, each group spread over k programs. `split` overrides.

    The split path costs a second launch (a few us from the host, ~1 us in a CUDA graph) and a
    second read of x; it pays only where the programs are too few to fill the GPU and each one's
    groups are too big to stream through one SM in that time (MIN_SPLIT_BYTES), or where the
    groups do not fit a tile. So the paper's U-Net runs one kernel per GroupNorm at every batch
    (its largest group, 4 channels of 32x32, is 16 KB in float32)."""
    block_c, block_hw = _tile(gb, cpg, hw, MAX_TILE_FWD)
    fits = cdiv(hw, block_hw) == 1
    if split is None:
        programs, target = B * cdiv(G, gb), _target_programs(device)
        if fits and (programs >= target or gb * cpg * hw * element_size < MIN_SPLIT_BYTES):
            split = 0
        else:  # enough programs to fill the GPU, each with at least one 16-wide tile
            split = max(1, min(cdiv(target, programs), cdiv(hw, 16)))
    if split == 0:
        if not fits:
            raise ValueError(f"split=0 needs {gb} group(s) of {cpg} x {hw} values to fit in a tile of {MAX_TILE_FWD}")
        return 0, block_c, block_hw
    # Smaller tiles for split groups, so that each program has its share to loop over.
    block_hw = min(block_hw, max(16, MAX_TILE_LOOP // block_c))
    return split, block_c, min(block_hw, max(16, next_power_of_2(cdiv(hw, split))))


class _FwdPlan:
    """One forward launch's host work, from (x, add)'s metadata and the options (see Plans)."""

    def __init__(self, x, num_groups, add, split):
        B, C = x.shape[:2]
        G, cpg = num_groups, C // num_groups
        self.copy_x = not _collapses(x)  # spatial dims that do not collapse: x is copied per call
        x3 = _as_bchw(x) if self.copy_x else None
        x_strides = x3.stride() if x3 is not None else (x.stride(0), x.stride(1), _hw_stride(x))
        hw = math.prod(x.shape[2:])
        self.memory_format = output_memory_format(x)
        y = torch.empty(x.shape, dtype=x.dtype, device="meta", memory_format=self.memory_format)
        self.y_size, self.y_stride = tuple(y.shape), y.stride()
        y_strides = (y.stride(0), y.stride(1), _hw_stride(y))
        self.stats_shape = (B, G)
        self.device = x.device
        self.empty = x.numel() == 0
        if self.empty:
            return
        gb = group_block(G, cpg, hw, x_strides[1], x.element_size(), plans_for_interpreter(x.device))
        self.ngb = ngb = cdiv(G, gb)
        self.split, block_c, block_hw = forward_plan(B, G, cpg, hw, x.device, split, gb, x.element_size())
        stride_a = (add.stride(0), add.stride(1)) if add is not None else (0, 0)
        meta = dict(HAS_ADD=add is not None, GB=gb, BLOCK_C=block_c, BLOCK_HW=block_hw,
                    num_warps=_num_warps(block_c * block_hw, 16))  # fmt: skip
        if self.split == 0:
            self.grid = (B * ngb,)
            self.ints = (G, ngb, cpg, hw)
            self.strides = (*x_strides, *stride_a, *y_strides)
            # the fused kernel's constexprs in its order (HAS_ADD, SILU, GB, BLOCK_C, BLOCK_HW, EVEN_HW)
            even_hw = block_hw == hw
            self.constexprs = {silu: (add is not None, silu, gb, block_c, block_hw, even_hw) for silu in (False, True)}
            self.num_warps = meta["num_warps"]
            return
        chunk = cdiv(cdiv(hw, self.split), block_hw) * block_hw
        split = cdiv(hw, chunk)
        self.grid = (B * ngb, split)
        self.parts = B * G * split * 3
        self.ints = (G, ngb, cpg, hw, chunk, split)
        self.stats_strides = (*x_strides, *stride_a)
        self.strides = (*x_strides, *stride_a, *y_strides)
        self.stats_meta = meta
        self.meta = dict(meta, BLOCK_S=max(2, next_power_of_2(split)))


def _collapses(x: torch.Tensor) -> bool:
    """x's spatial dims collapse to one stride (a (B, C, HW) view of x exists)."""
    expected = None
    for size, stride in reversed(list(zip(x.shape[2:], x.stride()[2:]))):
        if size == 1:
            continue
        if expected is not None and stride != expected:
            return False
        expected = stride * size
    return True


def _hw_stride(x: torch.Tensor) -> int:
    """The stride of x's collapsed spatial dims: that of the innermost one longer than 1."""
    for size, stride in reversed(list(zip(x.shape[2:], x.stride()[2:]))):
        if size != 1:
            return stride
    return 1


_FWD_PLANS = Plans()


def _fwd_plan(x, num_groups, add, split) -> _FwdPlan:
    return _FWD_PLANS.get((meta_key(x), meta_key(add), num_groups, split), lambda: _FwdPlan(x, num_groups, add, split))
