"""pytest-benchmark suites: each fused kernel and the whole train and sampling step, timed
against the eager reference on the same inputs.

    pytest benchmarks/ --benchmark-only

On a CUDA device every case runs, synchronised inside the timed function, and extra_info
carries GB/s (memory-bound ops) or TFLOP/s (attention) computed from the bytes or FLOPs the
op must move. Without CUDA the fused cases skip with a reason and the eager ones run on the
CPU (fewer rounds, smaller batches for the whole-model steps): CPU timings, not GPU ones.
"""

import pytest
import torch

from ddpm_fast import kernels, reference
from ddpm_fast.schedule import POSTERIOR_STEP_BUFFERS, make_betas, schedule_buffers

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
IMPLS = ["eager", "fused"]


def pytest_configure(config):
    # A benchmark measures the real path: never Triton's interpreter.
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise pytest.UsageError("unset TRITON_INTERPRET to benchmark: the interpreter is not a GPU")


def skip_unless_runnable(impl: str) -> None:
    if impl == "fused" and not CUDA:
        pytest.skip("fused Triton kernels are timed on a CUDA device; this machine has none")


def _sync():
    if CUDA:
        torch.cuda.synchronize()


@pytest.fixture
def measure(benchmark):
    """measure(group, fn, bytes=..., flops=...): time fn() (synchronised), group eager and
    fused side by side, and record the throughput the op reaches."""

    def run(
        group: str,
        fn,
        bytes: int | None = None,
        flops: float | None = None,
        rounds: int | None = None,
        iterations: int | None = None,
    ):
        benchmark.group = group

        def timed():
            out = fn()
            _sync()
            return out

        if CUDA:
            benchmark.pedantic(
                timed, rounds=rounds or 20, iterations=iterations or 5, warmup_rounds=3 if rounds is None else 1
            )
        else:
            benchmark.pedantic(timed, rounds=3, iterations=1, warmup_rounds=1)
        mean = benchmark.stats.stats.mean
        benchmark.extra_info["device"] = torch.cuda.get_device_name() if CUDA else "cpu"
        if bytes is not None:
            benchmark.extra_info["bytes"] = bytes
            benchmark.extra_info["GB/s"] = round(bytes / mean / 1e9, 2)
        if flops is not None:
            benchmark.extra_info["flops"] = flops
            benchmark.extra_info["TFLOP/s"] = round(flops / mean / 1e12, 3)

    return run


BUFS = schedule_buffers(make_betas("linear", 1000))
STEP = POSTERIOR_STEP_BUFFERS


def ops(impl: str):
    """The module whose op a case times: ddpm_fast.kernels (fused) or ddpm_fast.reference (eager)."""
    return kernels if impl == "fused" else reference


def buffers(*names):
    return [BUFS[n].to(DEVICE) for n in names]
