"""Kernels per step, counted on any machine (a CPU included): what a GPU would launch.

    python -m ddpm_fast.tools.launches            # a sampling step of the paper's U-Net, batch 1 and 16

A launch is a Triton kernel (each launch of a @triton.jit or autotuned kernel: the launch itself
is replaced by a no-op that records it, so nothing is compiled or interpreted) or an ATen op that
runs a device kernel: every op the dispatcher reaches except views, allocations and metadata
(those launch nothing). Composite ops are counted as what they decompose into (F.linear: one
addmm), convolutions as one kernel (cuDNN may run a few more, the same for both paths), so the
count is a floor of what Nsight would list and compares fairly between the eager and fused paths.
"""

import argparse
import collections
import contextlib
import os

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ATen ops that launch no kernel: allocations and metadata (views are told by their schema).
_NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "lift_fresh",
              "alias", "set_", "resize_", "_local_scalar_dense", "_unsafe_view"}  # fmt: skip


class _AtenCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name.startswith("aten::"):
            short = name[len("aten::") :]
            if not func.is_view and short not in _NO_KERNEL:
                self.ops[short] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _stubbed_triton(record: collections.Counter):
    """Every Triton launch recorded (by kernel name) and not run."""
    from triton.runtime.jit import KernelInterface

    real = KernelInterface.__getitem__

    def getitem(self, grid):
        fn = self
        while not hasattr(fn, "__name__") and hasattr(fn, "fn"):
            fn = fn.fn
        name = getattr(fn, "__name__", type(self).__name__)
        return lambda *args, **kwargs: record.update([name])

    KernelInterface.__getitem__ = getitem
    try:
        yield
    finally:
        KernelInterface.__getitem__ = real


def count_launches(fn) -> dict:
    """{"triton": n, "aten": n, "total": n, "triton_kernels": {...}, "aten_ops": {...}} for fn()."""
    triton_launches = collections.Counter()
    counter = _AtenCounter()
    with _stubbed_triton(triton_launches), counter:
        fn()
    triton_n, aten_n = sum(triton_launches.values()), sum(counter.ops.values())
    return dict(triton=triton_n, aten=aten_n, total=triton_n + aten_n, triton_kernels=dict(triton_launches),
                aten_ops=dict(counter.ops))  # fmt: skip


def sampling_step_launches(batch: int, fused: bool = True, config=None) -> dict:
    """Launches of one DDPM sampling step (the U-Net and the reverse step) at `batch`, fused
    (FastDDPM with its kernels on: DDPM_FAST_KERNELS=triton for the count) or eager (DDPM)."""
    from ddpm_fast import DDPM, FastDDPM, UNet
    from ddpm_fast.kernels import kernel_mode

    torch.manual_seed(0)
    model = UNet(config)
    size = model.config.image_size
    ddpm = (FastDDPM if fused else DDPM)(model, image_size=size, channels=model.config.in_channels).eval()
    x = torch.randn(batch, model.config.in_channels, size, size)
    t = torch.full((batch,), 500, dtype=torch.long)
    with torch.no_grad(), kernel_mode("triton" if fused else "eager"):
        count_launches(lambda: ddpm._p_sample(x, t, None, True, None))  # warm: plans and caches built, as in a loop
        return count_launches(lambda: ddpm._p_sample(x, t, None, True, None))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ddpm_fast.tools.launches", description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: launches are counted, never run")
    for batch in args.batch:
        for fused in (False, True):
            n = sampling_step_launches(batch, fused)
            print(f"sampling step, 35.7M U-Net, batch {batch}, {'fused' if fused else 'eager'}: {n['total']} kernels "
                  f"({n['triton']} Triton + {n['aten']} ATen)")  # fmt: skip
            print("  ", ", ".join(f"{k} {v}" for k, v in sorted(n["aten_ops"].items(), key=lambda kv: -kv[1])))


if __name__ == "__main__":
    main()
