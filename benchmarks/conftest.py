"""pytest-benchmark suites: each fused kernel and the whole train and sampling step, timed side by
side (one benchmark group per case) against what a user would pick instead:

  eager        the plain PyTorch op (ddpm_fast.reference) or DDPM
  fused        the Triton kernel (ddpm_fast.kernels) or FastDDPM
  compile      torch.compile of the eager op or step (Inductor, default mode)
  compile-max  the same with mode="max-autotune-no-cudagraphs"
  sdpa         torch.nn.functional.scaled_dot_product_attention (attention only)

    pytest benchmarks/ --benchmark-only --benchmark-json=bench.json
    ddpm-fast bench-report bench.json        # one markdown table of ratios

On a CUDA device every case runs, synchronised inside the timed function; extra_info carries GB/s
(memory-bound ops) or TFLOP/s (attention) from the bytes or FLOPs the op must move, and the
fraction of the device's peak. Without CUDA the fused, max-autotune and whole-step compile cases
skip with a reason and a CPU-sized subset of the rest runs: CPU timings, not GPU ones.
"""

import os

import pytest
import torch

from ddpm_fast import kernels, reference
from ddpm_fast.schedule import POSTERIOR_STEP_BUFFERS, make_betas, schedule_buffers
from ddpm_fast.tools import benchreport

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
IMPLS = ["eager", "fused", "compile", "compile-max"]
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def pytest_configure(config):
    # A benchmark measures the real path: never Triton's interpreter.
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise pytest.UsageError("unset TRITON_INTERPRET to benchmark: the interpreter is not a GPU")
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = 64  # each compile case starts from a reset anyway


def skip_unless_runnable(impl: str, whole_step: bool = False) -> None:
    if CUDA:
        return
    if impl in ("fused", "fused+cuda-graph"):
        pytest.skip("fused Triton kernels are timed on a CUDA device; this machine has none")
    if impl == "compile-max":
        pytest.skip("max-autotune tunes GPU kernels; timed on a CUDA device only")
    if impl == "compile" and whole_step:
        pytest.skip("compiling the whole U-Net step takes minutes on a CPU; timed on a CUDA device only")


def compiled(fn, impl: str):
    """fn as the impl runs it: itself, or torch.compile'd (from a fresh Dynamo state, so one
    case's graphs never count against another's)."""
    if impl not in ("compile", "compile-max"):
        return fn
    import torch._dynamo

    torch._dynamo.reset()
    return torch.compile(fn, mode="max-autotune-no-cudagraphs" if impl == "compile-max" else None, dynamic=False)


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def peak(dtype: torch.dtype | None = None) -> dict:
    """This GPU's peak memory bandwidth (GB/s) and, for `dtype`, its dense matmul TFLOP/s."""
    if not CUDA:
        return {}
    props = torch.cuda.get_device_properties(DEVICE)
    half = None if dtype is None else dtype in (torch.float16, torch.bfloat16)
    return benchreport.peak(props.name, props.memory_clock_rate, props.memory_bus_width, half)


@pytest.fixture
def measure(benchmark, request):
    """measure(group, fn, bytes=..., flops=..., dtype=...): time fn() (synchronised) in the
    benchmark group `group` (the impls side by side) and record the throughput it reaches and its
    fraction of the device's peak."""
    impl = request.node.callspec.params.get("impl", "eager") if hasattr(request.node, "callspec") else "eager"

    def run(group, fn, bytes=None, flops=None, dtype=None, rounds=None, iterations=None):
        benchmark.group = group

        def timed():
            out = fn()
            _sync()
            return out

        if CUDA:
            benchmark.pedantic(timed, rounds=rounds or 20, iterations=iterations or 5,
                               warmup_rounds=3 if rounds is None else 1)  # fmt: skip
        else:
            benchmark.pedantic(timed, rounds=3, iterations=1, warmup_rounds=1)
        mean = benchmark.stats.stats.mean
        info = benchmark.extra_info
        info["impl"] = impl
        info["device"] = torch.cuda.get_device_name() if CUDA else "cpu"
        info["torch"], info["triton"] = torch.__version__, _triton_version()
        limits = peak(dtype)
        if bytes is not None:
            info["bytes"] = bytes
            info["GB/s"] = round(bytes / mean / 1e9, 2)
            if "peak GB/s" in limits:
                info["peak GB/s"] = limits["peak GB/s"]
                info["fraction of peak"] = round(info["GB/s"] / limits["peak GB/s"], 3)
        if flops is not None:
            info["flops"] = flops
            info["TFLOP/s"] = round(flops / mean / 1e12, 3)
            if "peak TFLOP/s" in limits:
                info["peak TFLOP/s"] = limits["peak TFLOP/s"]
                info["fraction of peak"] = round(info["TFLOP/s"] / limits["peak TFLOP/s"], 3)

    return run


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:  # pragma: no cover
        return "none"


BUFS = schedule_buffers(make_betas("linear", 1000))
STEP = POSTERIOR_STEP_BUFFERS


def ops(impl: str):
    """The module whose op a case times: ddpm_fast.kernels (fused) or ddpm_fast.reference (eager,
    and what torch.compile compiles)."""
    return kernels if impl == "fused" else reference


def op(impl: str, name: str):
    """The callable a case times for op `name`: the kernel, the eager twin, or its compilation."""
    return compiled(getattr(ops(impl), name), impl)


def buffers(*names):
    return [BUFS[n].to(DEVICE) for n in names]
