"""@triton.jit helpers the elementwise kernels share (q_sample, the DDPM and DDIM steps,
DPM-Solver++): a launch covers a (B, N) view of the images, each program BLOCK columns of one
sample's row, and gathers that sample's per-timestep coefficients once."""

import triton
import triton.language as tl


@triton.jit
def sample_block(N, blocks_per_row, BLOCK: tl.constexpr):
    """(b, cols, mask): this program's sample (int64, so b * stride passes 2^31 safely), its
    BLOCK columns, and which of them lie inside the row of N."""
    pid = tl.program_id(0)
    b = (pid // blocks_per_row).to(tl.int64)
    cols = (pid % blocks_per_row) * BLOCK + tl.arange(0, BLOCK)
    return b, cols, cols < N


@triton.jit
def clamped_index(IDX_ptr, b, stride, n):
    """IDX[b] clamped into [0, n): every gather by it stays in bounds whatever the index holds."""
    return tl.minimum(tl.maximum(tl.load(IDX_ptr + b * stride), 0), n - 1)
