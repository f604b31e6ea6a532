"""Compile every Triton kernel that real code launches for a real GPU, on a machine without
one, and report registers, spills and shared memory per kernel.

    python -m ddpm_fast.aot                 # every op, float32 and float16, sm_80 and sm_90
    python -m ddpm_fast.aot --ops q_sample --cap 90 --json

How: a stand-in CUDA driver reports an sm_XX target, and each launch becomes a
compile-only warmup (nothing runs, no output is written); cuobjdump, shipped in the
triton wheel, reads the cubin. It needs TRITON_INTERPRET unset and the ops on their Triton
path for CPU tensors (DDPM_FAST_KERNELS=triton, which `main` sets), so it runs in a
process of its own: the tests start it as a subprocess.
"""

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile

# Largest shared memory one block may use, in bytes: A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB.
MAX_SHARED = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def _resource_usage(cubin: bytes) -> dict:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    return dict(zip(("regs", "stack", "shared", "local"), map(int, m.groups()))) if m else {"raw": out}


@contextlib.contextmanager
def capture(cap: int = 90):
    """Within the block, every Triton launch compiles for sm_<cap> instead of running; yields
    the list of compiled kernels (dicts: name, regs, stack, local, shared_meta, ...)."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaDriver
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("ahead-of-time compilation needs TRITON_INTERPRET unset")
    saved = driver._active
    fake = object.__new__(CudaDriver)  # no __init__: it would look for a GPU
    fake.get_current_target = lambda: GPUTarget("cuda", cap, 32)
    fake.get_current_device = lambda: 0
    fake.get_current_stream = lambda device=None: 0
    fake.get_device_capability = lambda device=None: (cap // 10, cap % 10)
    fake.get_active_torch_device = lambda: torch.device("cpu")
    driver.set_active(fake)
    seen: list[dict] = []
    real_run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = real_run(self, *args, grid=grid, warmup=True, **kwargs)
        if kernel is not None:
            info = _resource_usage(kernel.asm["cubin"])
            info.update(
                name=kernel.name,
                cap=cap,
                num_warps=kernel.metadata.num_warps,
                num_stages=kernel.metadata.num_stages,
                shared_meta=kernel.metadata.shared,
            )
            if info not in seen:
                seen.append(info)
        return kernel

    JITFunction.run = compile_only
    try:
        yield seen
    finally:
        JITFunction.run = real_run
        driver._active = saved


def problems(kernels: list[dict]) -> list[str]:
    """What would fail or run slowly on the GPU: register spills, too much shared memory."""
    out = []
    for k in kernels:
        if "raw" in k:
            out.append(f"{k['name']}: cuobjdump gave no resource line")
            continue
        if k["stack"] or k["local"]:
            out.append(f"{k['name']} sm_{k['cap']}: spills (stack {k['stack']} B, local {k['local']} B)")
        limit = MAX_SHARED.get(k["cap"])
        if limit and k["shared_meta"] > limit:
            out.append(f"{k['name']} sm_{k['cap']}: {k['shared_meta']} B shared memory > {limit} B available")
    return out


# -- what to compile: each op at the configurations the library launches ------------------


def _launch_q_sample(dtype):
    import torch

    from ddpm_fast import kernels
    from ddpm_fast.schedule import make_betas, schedule_buffers

    b = schedule_buffers(make_betas("linear", 1000))
    x = torch.randn(4, 3, 32, 32).to(dtype)
    t = torch.randint(0, 1000, (4,))
    x0 = x.clone().requires_grad_()
    out = kernels.q_sample(x0, t, x, b["sqrt_alphas_cumprod"], b["sqrt_one_minus_alphas_cumprod"])
    out.backward(torch.ones_like(out))


def _launch_posterior_step(dtype):
    import torch

    from ddpm_fast import kernels
    from ddpm_fast.schedule import POSTERIOR_STEP_BUFFERS, make_betas, schedule_buffers

    b = schedule_buffers(make_betas("linear", 1000))
    x = torch.randn(4, 3, 32, 32).to(dtype)
    t = torch.randint(1, 1000, (4,))
    step = [b[n] for n in POSTERIOR_STEP_BUFFERS]
    for prediction_type in ("epsilon", "sample", "v_prediction"):
        for noise in (x, None):
            kernels.posterior_step(x, x, t, noise, *step, prediction_type=prediction_type)
            kernels.ddim_step(x, x, t, t - 1, noise, b["alphas_cumprod"], 1.0, prediction_type)
        kernels.ddim_step(x, x, t, t - 1, None, b["alphas_cumprod"], 0.0, prediction_type)


# (channels, height/width) of every GroupNorm in the paper's CIFAR-10 U-Net (32 groups).
UNET_GROUP_NORMS = [(128, 32), (128, 16), (256, 32), (256, 16), (256, 8), (256, 4), (384, 32), (384, 16),
                    (512, 16), (512, 8), (512, 4)]  # fmt: skip


def _launch_group_norm_silu(dtype):
    """Forward and backward at training batch 128 (one kernel per group) and sampling batch 1
    (split groups), with and without the time-embedding add. Nothing runs, so empty tensors."""
    import torch

    from ddpm_fast import kernels

    for channels, size in UNET_GROUP_NORMS:
        for batch in (128, 1):
            x = torch.empty(batch, channels, size, size, dtype=dtype).requires_grad_()
            w = torch.empty(channels, requires_grad=True)
            add = torch.empty(batch, channels, dtype=dtype, requires_grad=True)
            for a in (add, None):
                y = kernels.group_norm_silu(x, 32, w, w, 1e-5, add=a)
                y.backward(torch.empty_like(y))


def _launch_attention(dtype):
    """Forward and backward at head dims 32 to 256; the paper's U-Net attends over 256 tokens
    of 256 channels (16x16), one head."""
    import torch

    from ddpm_fast import kernels

    for d in (32, 64, 128, 256):
        q = torch.empty(2, 1, 256, d, dtype=dtype).requires_grad_()
        out = kernels.attention(q, q, q)
        out.backward(torch.empty_like(out))


LAUNCHERS = {
    "q_sample": _launch_q_sample,
    "attention": _launch_attention,
    "posterior_step": _launch_posterior_step,
    "group_norm_silu": _launch_group_norm_silu,
}


def compile_report(ops=tuple(LAUNCHERS), caps=(80, 90), dtypes=("float32", "float16")) -> list[dict]:
    import torch

    os.environ["DDPM_FAST_KERNELS"] = "triton"
    rows = []
    for cap in caps:
        for dtype in dtypes:
            for op in ops:
                with capture(cap) as kernels:
                    LAUNCHERS[op](getattr(torch, dtype))
                rows += [dict(k, op=op, dtype=dtype) for k in kernels]
    return rows


def summary(rows: list[dict]) -> str:
    """A markdown table: per kernel, GPU and dtype, the configurations compiled and the most
    registers, spilled bytes and shared memory any of them uses."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["op"], r["name"], r["cap"], r["dtype"]), []).append(r)
    lines = ["| op | kernel | sm | dtype | configs | max regs | max spill B | max smem B |",
             "|---|---|---:|---|---:|---:|---:|---:|"]  # fmt: skip
    for (op, name, cap, dtype), rs in groups.items():
        spill = max(r.get("stack", 0) + r.get("local", 0) for r in rs)
        regs = max(r.get("regs", 0) for r in rs)
        smem = max(r["shared_meta"] for r in rs)
        lines.append(f"| {op} | `{name}` | {cap} | {dtype} | {len(rs)} | {regs} | {spill} | {smem:,} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddpm_fast.aot", description=__doc__.split("\n")[0])
    parser.add_argument("--ops", default=",".join(LAUNCHERS), help=f"comma-separated, from {list(LAUNCHERS)}")
    parser.add_argument("--cap", type=int, nargs="+", default=[80, 90], help="compute capabilities (80, 90)")
    parser.add_argument("--dtypes", default="float32,float16")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--summary", action="store_true", help="one line per kernel, sm and dtype: the worst config")
    args = parser.parse_args(argv)
    ops = [o for o in args.ops.split(",") if o]
    unknown = [o for o in ops if o not in LAUNCHERS]
    if unknown:
        parser.error(f"unknown op(s) {unknown}; choose from {list(LAUNCHERS)}")
    rows = compile_report(ops, args.cap, args.dtypes.split(","))
    found = problems(rows)
    if args.json:
        print(json.dumps({"kernels": rows, "problems": found}))
    elif args.summary:
        print(summary(rows))
        print("problems:", "; ".join(found) if found else "none")
    else:
        print(f"{'op':<16}{'dtype':<9}{'kernel':<44}{'sm':>4}{'warps':>6}{'regs':>6}{'spill B':>9}{'smem B':>9}")
        seen = set()
        for r in rows:
            spill = r.get("stack", 0) + r.get("local", 0)
            key = (r["op"], r["dtype"], r["name"], r["cap"], r["num_warps"], r.get("regs"), spill, r["shared_meta"])
            if key in seen:  # the same compiled kernel at another shape
                continue
            seen.add(key)
            print(f"{r['op']:<16}{r['dtype']:<9}{r['name']:<44}{r['cap']:>4}{r['num_warps']:>6}"
                  f"{r.get('regs', '?'):>6}{spill:>9}{r['shared_meta']:>9}")  # fmt: skip
        print("problems:", "; ".join(found) if found else "none")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
