"""Compile every Triton kernel that real code launches for a real GPU, on a machine without
one, and report registers, spills, shared memory and the matrix instructions per kernel.

    python -m ddpm_fast.tools.aot --summary            # every scenario, sm_80 and sm_90
    python -m ddpm_fast.tools.aot --scenarios train --cap 90 --json
    python -m ddpm_fast.tools.aot --scenarios tests --summary   # what `pytest` launches on a GPU

What is compiled is what code launches: the scenarios run real code and catch each launch.
- "train": one FastDDPM training step (forward, loss, backward, Adam) of the paper's 35.7M U-Net
  at batch 128 and 4; "sample": one DDPM, one DDIM and one DPM-Solver++ sampling step at batch 1, 16 and 256. Each
  in float32, float16 (training under fp16 autocast, sampling with a .half() model) and bfloat16
  autocast, NCHW and channels_last. The U-Net's own layouts, strides and dtypes reach the kernels
  (the attention block's token-major q, k, v; GroupNorm's strided time-embedding add ...).
- "q_sample", "posterior_step", "group_norm_silu", "attention": each op at the configurations a
  user may call it with beyond the model (every option, transposed q/k/v, head dims 32 to 256).
- "tests" (from a checkout, not in the default set): the kernel tests themselves, the
  on_device modules of tests/, run with pytest in this process; each fused op is recorded on its
  Triton path and then computed by its eager twin, so each test goes on with correct values and
  reaches all of its launches (backward too). What a CUDA run of the suite compiles, at the
  tests' odd sizes, strides and layouts. Tests that torch.compile, or that ask which path runs,
  fail here; pytest's outcome counts are printed to stderr and not judged.
Every autotuned kernel is compiled at each configuration its autotuner may pick.

How: while a scenario runs, every Triton launch is recorded instead of run (Autotuner runs are
expanded into one launch per candidate configuration), with tiny stand-in tensors of the same
dtype and alignment; the U-Net's convolutions and matrix products are computed on the meta
device only (their outputs' shapes and strides are what matters), so the 35.7M model at batch
128 takes seconds on a CPU. Each distinct launch is then compiled for sm_XX with a stand-in CUDA
driver, and cuobjdump (shipped in the triton wheel) reads the cubin; the PTX tells whether the
dots became wgmma (sm_90), mma (sm_80+) or FMA. It needs TRITON_INTERPRET unset and the ops on
their Triton path for CPU tensors (DDPM_FAST_KERNELS=triton, which `main` sets), so it runs in a
process of its own: the tests start it as a subprocess.
"""

import argparse
import contextlib
import itertools
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


def _matrix_unit(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma"
    return "-"


# -- recording launches ---------------------------------------------------------------------------


def _stand_in(value):
    """What a launch argument contributes to the compiled kernel, and a tiny stand-in for it:
    a tensor's dtype and 16-byte alignment, an int's specialisations (== 1, % 16 == 0)."""
    import torch

    if isinstance(value, torch.Tensor):
        aligned = (value.storage_offset() * value.element_size()) % 16 == 0
        dummy = torch.empty(16, dtype=value.dtype)
        return ("tensor", value.dtype, aligned), dummy if aligned else dummy[1:]
    if isinstance(value, bool) or value is None:
        return ("const", value), value
    if isinstance(value, int):
        return ("int", value == 1, value % 16 == 0, value >= 2**31), value
    if isinstance(value, float):
        return ("float",), value
    return ("const", value), value


def _constexprs_by_name(fn, args, kwargs) -> tuple[tuple, dict]:
    """(args, kwargs) with the constexprs passed by position moved to kwargs by name: a launch is
    told apart, and its report row shows its config, by its constexprs' values (an int passed by
    position keys only on its specialisations). Our kernels list their constexprs last."""
    params = fn.params[: len(args)]
    kept = tuple(a for p, a in zip(params, args) if not p.is_constexpr)
    if any(p.is_constexpr for p in params[: len(kept)]):
        raise ValueError(f"{fn.fn.__name__}: a constexpr before a runtime argument: list the constexprs last")
    named = {p.name: a for p, a in zip(params, args) if p.is_constexpr}
    return kept, {**named, **kwargs}


class Recorder:
    """Catches Triton launches (JITFunction and Autotuner runs) and keeps one of each kind."""

    def __init__(self):
        self.launches: dict = {}  # key -> (fn, stand-in args, kwargs, autotuned launch or None)
        self.tuning = None  # while an autotuned launch is expanded: its key (what it was called with)

    @staticmethod
    def key(name: str, args, kwargs) -> tuple:
        kw = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        return name, tuple(_stand_in(a)[0] for a in args), tuple(sorted((k, repr(v)) for k, v in kw.items()))

    def add(self, fn, args, kwargs) -> None:
        stand_ins = tuple(_stand_in(a)[1] for a in args)
        kw = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        self.launches.setdefault(self.key(fn.fn.__qualname__, args, kwargs), (fn, stand_ins, kw, self.tuning))

    @contextlib.contextmanager
    def recording(self):
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction

        real_jit, real_tune = JITFunction.run, Autotuner.run
        recorder = self

        def record(self, *args, grid, warmup, **kwargs):
            recorder.add(self, *_constexprs_by_name(self, args, kwargs))

        def every_config(self, *args, **kwargs):
            self.nargs = dict(zip(self.arg_names, args))
            recorder.tuning = repr(Recorder.key(self.base_fn.__qualname__, args, kwargs))
            try:
                for config in self.prune_configs(kwargs):
                    self.fn.run(*args, **kwargs, **config.all_kwargs())
            finally:
                recorder.tuning = None

        JITFunction.run, Autotuner.run = record, every_config
        try:
            yield self
        finally:
            JITFunction.run, Autotuner.run = real_jit, real_tune


@contextlib.contextmanager
def _target(cap: int):
    """A stand-in CUDA driver that reports an sm_<cap> GPU, so that Triton compiles for it."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaDriver
    from triton.runtime import driver

    saved = driver._active
    fake = object.__new__(CudaDriver)  # no __init__: it would look for a GPU
    fake.get_current_target = lambda: GPUTarget("cuda", cap, 32)
    # Triton caches its binder and target per device index: one index per target, or a second
    # target in this process would reuse the first one's (sm_90 compiled as sm_80).
    fake.get_current_device = lambda: cap
    fake.get_current_stream = lambda device=None: 0
    fake.get_device_capability = lambda device=None: (cap // 10, cap % 10)
    fake.get_active_torch_device = lambda: torch.device("cpu")
    driver.set_active(fake)
    try:
        yield
    finally:
        driver._active = saved


CONFIG_KEYS = ("BLOCK", "GB", "SPLIT", "R_CHUNK")  # the constexprs a report row shows as its config


def compile_launches(launches: dict, cap: int) -> list[dict]:
    """Compile each recorded launch for sm_<cap>; one row per distinct compiled kernel."""
    rows, seen = [], set()
    with _target(cap):
        for fn, args, kwargs, tuned in launches.values():
            try:
                kernel = fn.run(*args, grid=(1,), warmup=True, **kwargs)
            except Exception as e:  # a launch that does not build for this GPU: a problem to report
                config = {k: v for k, v in kwargs.items() if not k.startswith("num_")}
                last_line = (str(e).strip().splitlines() or [""])[-1][:300]
                rows.append(dict(name=fn.fn.__name__, cap=cap, config=config, error=f"{type(e).__name__}: {last_line}"))
                continue
            info = _resource_usage(kernel.asm["cubin"])
            info.update(name=kernel.name, cap=cap, num_warps=kernel.metadata.num_warps,
                        num_stages=kernel.metadata.num_stages, shared_meta=kernel.metadata.shared,
                        mma=_matrix_unit(kernel.asm["ptx"]), tuned=tuned,
                        config={k: v for k, v in kwargs.items() if k.startswith(CONFIG_KEYS)})  # fmt: skip
            key = json.dumps(info, sort_keys=True, default=str)
            if key not in seen:
                seen.add(key)
                rows.append(info)
    return rows


# A kernel that is not autotuned may keep this many bytes of stack: the ptxas of some supported
# Triton releases spills one or two registers (4-8 B) in a few GroupNorm tiles that another
# compiles clean (3.6 on sm_80: the split-statistics kernel at 80 registers; 3.8 on sm_90: one
# float16 forward). Such a kernel is listed as a minor spill, not a problem; anything larger is.
MINOR_SPILL_B = 8


def spills(k: dict) -> bool:
    return bool(k.get("stack") or k.get("local"))


def _compiled_and_spills(k: dict) -> bool:
    return "error" not in k and "raw" not in k and spills(k)


def minor_spills(kernels: list[dict]) -> list[dict]:
    """Kernels that are not autotuned and spill at most MINOR_SPILL_B bytes (reported, tolerated)."""
    return [k for k in kernels if not k.get("tuned") and _compiled_and_spills(k)
            and k["stack"] + k["local"] <= MINOR_SPILL_B]  # fmt: skip


def pruned(kernels: list[dict]) -> list[dict]:
    """The autotuner's configurations that spill: kernels.attention_plan.spill_free drops them on the
    GPU before timing (as long as one of the launch's configurations is clean), so they never run."""
    return [k for k in kernels if k.get("tuned") and _compiled_and_spills(k)]


def problems(kernels: list[dict]) -> list[str]:
    """What would fail or run slowly on the GPU: a kernel that runs with spilled registers (one
    that is not autotuned, or an autotuned launch none of whose configurations is spill-free), too
    much shared memory, a launch that does not compile."""
    out = []
    clean_launches = {(k["tuned"], k["cap"]) for k in kernels if k.get("tuned") and "error" not in k and not spills(k)}
    minor = {id(k) for k in minor_spills(kernels)}
    for k in kernels:
        if "error" in k:
            out.append(f"{k['name']} sm_{k['cap']} {k['config']}: does not compile ({k['error']})")
            continue
        if "raw" in k:
            out.append(f"{k['name']}: cuobjdump gave no resource line")
            continue
        if spills(k) and id(k) not in minor and (not k.get("tuned") or (k["tuned"], k["cap"]) not in clean_launches):
            why = "every configuration of this autotuned launch spills" if k.get("tuned") else "spills"
            out.append(
                f"{k['name']} sm_{k['cap']} {k.get('config')}: {why} (stack {k['stack']} B, local {k['local']} B)"
            )
        limit = MAX_SHARED.get(k["cap"])
        if limit and k["shared_meta"] > limit:
            out.append(f"{k['name']} sm_{k['cap']}: {k['shared_meta']} B shared memory > {limit} B available")
    return out


# -- the model scenarios: real code, heavy products on the meta device -----------------------------


def _shape_only_mode():
    """A dispatch mode in which every aten op is computed on the meta device only: its outputs
    are uninitialised CPU tensors of the right shapes, strides and dtypes (views and in-place
    results alias their real inputs as the op says). Only the fused ops run: their launches are
    what is recorded. A step of the 35.7M U-Net at batch 256 costs allocations, not arithmetic
    (untouched pages are never faulted in)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_map

    def to_meta(t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
        return t

    def inputs_by_alias(func, args, kwargs):
        found = {}
        for i, arg in enumerate(func._schema.arguments):
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            if arg.alias_info is not None and isinstance(value, torch.Tensor):
                for name in arg.alias_info.before_set:
                    found[name] = value
        return found

    class ShapeOnly(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func.namespace == "ddpm_fast":
                return func(*args, **kwargs)  # the fused ops themselves: launches to record
            try:
                out = func(*tree_map(to_meta, args), **tree_map(to_meta, kwargs))
            except Exception:  # no meta kernel, or data-dependent: run it for real
                return func(*args, **kwargs)
            tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
            if all(t.numel() <= SMALL for t in tensors):  # step counts, timesteps, scalars: real values
                return func(*args, **kwargs)
            aliased = inputs_by_alias(func, args, kwargs)
            returns = func._schema.returns
            nhwc = func._schema.name in CONVOLUTIONS and _channels_last(args[:2])

            def real(meta, ret):
                if not isinstance(meta, torch.Tensor):
                    return meta
                source = None
                if ret is not None and ret.alias_info is not None:
                    source = next((aliased[n] for n in ret.alias_info.before_set if n in aliased), None)
                if source is None and nhwc and meta.ndim == 4:  # what cuDNN returns; meta says NCHW
                    return torch.empty(meta.shape, dtype=meta.dtype, memory_format=torch.channels_last)
                if source is None:
                    return torch.empty_strided(meta.shape, meta.stride(), dtype=meta.dtype)
                if ret.alias_info.is_write:
                    return source
                return source.as_strided(meta.shape, meta.stride(), meta.storage_offset())

            if isinstance(out, (tuple, list)) and len(returns) == len(out):
                return type(out)(tree_map(lambda m, r=r: real(m, r), o) for o, r in zip(out, returns))
            ret = returns[0] if len(returns) == 1 else None
            return tree_map(lambda m: real(m, ret), out)

    return ShapeOnly()


SMALL = 4096  # ops on tensors no larger than this run for real in the shape-only mode
# Convolutions whose meta kernels return NCHW for channels_last inputs, where cuDNN (and the CPU)
# keep channels_last: the shape-only mode gives their outputs the real layout, so that the
# channels_last scenarios reach the kernels with NHWC tensors, as `--channels-last` training does.
CONVOLUTIONS = ("aten::convolution", "aten::convolution_backward")


def _channels_last(tensors) -> bool:
    """cuDNN's rule: a convolution runs channels_last when its input or weight is channels_last."""
    import torch

    return any(isinstance(t, torch.Tensor) and t.ndim == 4 and not t.is_contiguous()
               and t.is_contiguous(memory_format=torch.channels_last) for t in tensors)  # fmt: skip


PRECISIONS = ("float32", "float16", "bfloat16")


def _model(precision: str, channels_last: bool, sampling: bool):
    import torch

    from ddpm_fast import FastDDPM, UNet

    torch.manual_seed(0)
    ddpm = FastDDPM(UNet(), image_size=32, channels=3)
    if precision == "float16" and sampling:
        ddpm.model.half()
    if channels_last:
        ddpm.to(memory_format=torch.channels_last)
    return ddpm


def _autocast(precision: str, sampling: bool):
    import torch

    if precision == "float32" or (precision == "float16" and sampling):
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=getattr(torch, precision))


def _launch_train(precision: str, channels_last: bool, batches=(128, 4)):
    """One training step, as ddpm_fast.train.train_step runs it (grad clipping and Adam included)."""
    import torch

    from ddpm_fast.train import train_step

    ddpm = _model(precision, channels_last, sampling=False)
    opt = torch.optim.Adam(ddpm.parameters(), lr=2e-4)
    autocast = None if precision == "float32" else getattr(torch, precision)
    for batch in batches:
        x0 = torch.zeros(batch, 3, 32, 32)
        if channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        with _shape_only_mode():
            train_step(ddpm, x0, opt, autocast_dtype=autocast)


def _launch_sample(precision: str, channels_last: bool, batches=(1, 16, 256)):
    """One ancestral (DDPM), one DDIM and one DPM-Solver++ step, as the samplers run them."""
    import torch

    from ddpm_fast.dpm_solver import dpm_solver_coefficients, dpm_solver_timesteps

    ddpm = _model(precision, channels_last, sampling=True).eval()
    dtype = torch.float16 if precision == "float16" else torch.float32
    for batch in batches:
        x = torch.zeros(batch, 3, 32, 32, dtype=dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        t = torch.full((batch,), 500)
        with _shape_only_mode(), torch.no_grad(), _autocast(precision, sampling=True):
            ddpm._p_sample(x, t, None, True, None)
            ddpm._ops(x.device).ddim_step(x, ddpm._model(x, t), t, t - 20, None, ddpm.alphas_cumprod, eta=0.0,
                                          check_t=False)  # fmt: skip
            coefficients = dpm_solver_coefficients(ddpm.alphas_cumprod, dpm_solver_timesteps(1000, 20), "epsilon")
            x0_prev = torch.zeros_like(x, dtype=torch.float32)
            ddpm._ops(x.device).dpm_solver_step(x, ddpm._model(x, t), x0_prev, torch.full((batch,), 1), coefficients,
                                                check_step=False)  # fmt: skip


# -- the op scenarios: what a user may call beyond the model ----------------------------------------


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
    from ddpm_fast.dpm_solver import dpm_solver_coefficients, dpm_solver_timesteps
    from ddpm_fast.schedule import POSTERIOR_STEP_BUFFERS, make_betas, schedule_buffers

    b = schedule_buffers(make_betas("linear", 1000))
    x = torch.randn(4, 3, 32, 32).to(dtype)
    t = torch.randint(1, 1000, (4,))
    step = [b[n] for n in POSTERIOR_STEP_BUFFERS]
    for prediction_type in ("epsilon", "sample", "v_prediction"):
        for noise, source in ((x, "torch"), (None, "philox")):
            kernels.posterior_step(x, x, t, noise, *step, prediction_type=prediction_type, noise_source=source)
            for clipped in (False, True):
                kernels.ddim_step(x, x, t, t - 1, noise, b["alphas_cumprod"], 1.0, prediction_type,
                                  use_clipped_model_output=clipped, noise_source=source)  # fmt: skip
        kernels.ddim_step(x, x, t, t - 1, None, b["alphas_cumprod"], 0.0, prediction_type)
        two = torch.cat([x, x], dim=1)  # a learned-range model's output: the prediction, then the variance
        kernels.posterior_step(x, two[:, :3], t, x, *step, prediction_type=prediction_type,
                               model_variance=two[:, 3:], max_log_variance=b["log_betas"])  # fmt: skip
        coefficients = dpm_solver_coefficients(b["alphas_cumprod"], dpm_solver_timesteps(1000, 20), prediction_type)
        for x0_prev, clip in ((None, False), (x.float(), False), (x.float(), True)):
            kernels.dpm_solver_step(x, x, x0_prev, t % 20, coefficients, clip_denoised=clip)


# (channels, height/width) of every GroupNorm in the paper's CIFAR-10 U-Net (32 groups).
UNET_GROUP_NORMS = [(128, 32), (128, 16), (256, 32), (256, 16), (256, 8), (256, 4), (384, 32), (384, 16),
                    (512, 16), (512, 8), (512, 4)]  # fmt: skip


def _launch_group_norm_silu(dtype):
    """What the model scenarios do not launch: a strided (column-slice) add, the largest and the
    smallest U-Net groups at batch 128 and 1 (one kernel per group block), and the split path
    (statistics, then the apply) that the U-Net never takes: groups too big for one tile (128
    channels of 128x128) and batch-1 groups too big for one SM (256x256); NCHW and channels_last,
    with and without the add and the activation."""
    import torch

    from ddpm_fast import kernels

    cases = ((384, 32, (128, 1)), (256, 32, (128, 1)), (512, 4, (128, 1)), (128, 128, (2,)), (128, 256, (1,)))
    for channels, size, batches in cases:
        for batch in batches:
            for memory_format in (torch.contiguous_format, torch.channels_last):
                x = torch.empty(batch, channels, size, size, dtype=dtype, memory_format=memory_format)
                x.requires_grad_()
                w = torch.empty(channels, requires_grad=True)
                add = torch.empty(batch, 2 * channels, dtype=dtype)[:, :channels].requires_grad_()
                for a in (add, None):
                    y = kernels.group_norm_silu(x, 32, w, w, 1e-5, add=a)
                    y.backward(torch.empty_like(y))
                kernels.group_norm(x, 32, w, w, 1e-5)


def _launch_attention(dtype):
    """Forward and backward at head dims 32 to 512 (the paper's U-Net: 256 tokens of 256
    channels, one head; the 256-pixel google/ddpm-* checkpoints: one head of 512), token-major
    (head dim contiguous, the U-Net's) and transposed (tokens contiguous: float32 at every head
    dim, half at 256); float32 both in IEEE and, as torch's matmul precision (fp32_precision, or
    the legacy allow_tf32) allows, in TF32. At 256 tokens, and at 49 (a 7x7 map), whose last
    tiles are masked."""
    import torch

    from ddpm_fast import kernels

    tf32 = (False, True) if dtype == torch.float32 else (False,)
    matmul = torch.backends.cuda.matmul
    new_api = hasattr(matmul, "fp32_precision")  # torch's API; the legacy allow_tf32 where it is missing
    saved = matmul.fp32_precision if new_api else matmul.allow_tf32
    try:
        for allow in tf32:
            if new_api:
                matmul.fp32_precision = "tf32" if allow else "ieee"
            else:
                matmul.allow_tf32 = allow
            for d, tokens in itertools.product((32, 64, 128, 256, 512), (256, 49)):
                token_major = torch.empty(2, tokens, 3 * d, dtype=dtype)[..., :d].unsqueeze(1)
                transposed = torch.empty(2, 1, d, tokens, dtype=dtype).transpose(-1, -2)
                # the transposed layout where a user may bring it: float32 at every size, half at the U-Net's d
                layouts = (token_major, transposed) if dtype == torch.float32 or d == 256 else (token_major,)
                for q in layouts:
                    q = q.detach().requires_grad_()
                    out = kernels.attention(q, q, q)
                    out.backward(torch.empty_like(out))
    finally:
        setattr(matmul, "fp32_precision" if new_api else "allow_tf32", saved)


# -- the test suite's launches: what `pytest` launches on a CUDA device ------------------------------

# The test modules whose tests run on the tests' device (pytestmark on_device, tests/conftest.py).
DEVICE_TESTS = "on_device"


def _record_test_suite(recorder: "Recorder", test_dir: str) -> dict:
    """Run the kernel tests of `test_dir` (the on_device modules) with every fused op recorded
    on its Triton path (every launch the op makes, as on a CUDA device) and then computed by its
    eager twin, whose result the test goes on with: so a test reaches all of its launches, the
    backward's too, in seconds. The tests' own verdicts mean nothing here (fused is eager) and are
    only counted. Returns pytest's outcome counts."""
    import pytest
    from torch.utils._python_dispatch import TorchDispatchMode

    from ddpm_fast.kernels import get_kernel_mode, kernel_mode

    class RecordThenEager(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func.namespace == "ddpm_fast" and get_kernel_mode() != "eager":
                try:
                    with kernel_mode("triton"), recorder.recording():
                        func(*args, **kwargs)
                except Exception as fused_error:
                    with kernel_mode("eager"):  # a bad input both paths refuse: the eager error, as the test expects
                        func(*args, **kwargs)
                    raise fused_error  # the Triton path failed where its eager twin did not
                with kernel_mode("eager"):
                    return func(*args, **kwargs)
            return func(*args, **kwargs)

    counts: dict = {}

    class Plugin:
        @pytest.hookimpl(wrapper=True)
        def pytest_runtest_call(self, item):
            with RecordThenEager():
                return (yield)

        def pytest_runtest_logreport(self, report):
            if report.when == "call" or report.outcome == "skipped":
                counts[report.outcome] = counts.get(report.outcome, 0) + 1

    # The tests' conftest picks the CPU here; TRITON_INTERPRET=0 keeps it from turning the
    # interpreter on (kernels would then not compile), and the launches are recorded, not run.
    os.environ["TRITON_INTERPRET"] = "0"
    args = [test_dir, "-m", DEVICE_TESTS, "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-o", "addopts=",
            "--no-header", "--tb=no", "-W", "ignore"]  # fmt: skip
    with contextlib.redirect_stdout(sys.stderr):
        pytest.main(args, plugins=[Plugin()])
    return counts


OP_LAUNCHERS = {
    "q_sample": _launch_q_sample,
    "posterior_step": _launch_posterior_step,
    "group_norm_silu": _launch_group_norm_silu,
    "attention": _launch_attention,
}
MODEL_LAUNCHERS = {"train": _launch_train, "sample": _launch_sample}
SCENARIOS = (*MODEL_LAUNCHERS, *OP_LAUNCHERS)
TESTS = "tests"  # not in the default set: it needs the repository's tests/ folder
TEST_OUTCOMES: dict = {}  # pytest's outcome counts of the last "tests" recording


def _by_dtype(rec: Recorder) -> dict:
    """A recorder's launches split by the dtype of each launch's first tensor."""
    out: dict = {}
    for key, launch in rec.launches.items():
        dtype = next(str(k[1]).removeprefix("torch.") for k in key[1] if k[0] == "tensor")
        out.setdefault(dtype, Recorder()).launches[key] = launch
    return out


def record(scenarios=SCENARIOS, precisions=PRECISIONS, layouts=("nchw", "channels_last"), test_dir="tests") -> dict:
    """{scenario: {precision: Recorder}}: the launches each scenario makes."""
    import torch

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("ahead-of-time compilation needs TRITON_INTERPRET unset")
    out = {}
    if TESTS in scenarios:
        os.environ.pop("DDPM_FAST_KERNELS", None)  # the tests' own default, "auto": Triton on CUDA
        rec = Recorder()
        TEST_OUTCOMES.update(_record_test_suite(rec, test_dir))
        out[TESTS] = _by_dtype(rec)
    os.environ["DDPM_FAST_KERNELS"] = "triton"
    for scenario in (s for s in scenarios if s != TESTS):
        for precision in precisions:
            rec = Recorder()
            with rec.recording():
                if scenario in MODEL_LAUNCHERS:
                    for layout in layouts:
                        MODEL_LAUNCHERS[scenario](precision, layout == "channels_last")
                else:
                    OP_LAUNCHERS[scenario](getattr(torch, precision))
            out.setdefault(scenario, {})[precision] = rec
    return out


def compile_report(scenarios=SCENARIOS, caps=(80, 90), precisions=PRECISIONS, layouts=("nchw", "channels_last"),
                   test_dir="tests"):  # fmt: skip
    rows = []
    for cap in caps:
        with _target(cap):  # recorded per target: the attention autotuner's lists differ by GPU generation
            recorded = record(scenarios, precisions, layouts, test_dir)
        for scenario, by_precision in recorded.items():
            for precision, rec in by_precision.items():
                rows += [dict(k, scenario=scenario, dtype=precision) for k in compile_launches(rec.launches, cap)]
    return rows


def summary(rows: list[dict]) -> str:
    """A markdown table: per kernel, GPU and precision, the configurations compiled and the most
    registers, spilled bytes and shared memory any of them uses, the stages and matrix unit."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if "error" not in r:  # those are listed by problems()
            groups.setdefault((r["name"], r["cap"], r["dtype"]), []).append(r)
    dropped = {id(r) for r in pruned(rows)}
    lines = ["| kernel | sm | precision | configs | pruned | max regs | max spill B | max smem B | stages | dots on |",
             "|---|---:|---|---:|---:|---:|---:|---:|---|---|"]  # fmt: skip
    for (name, cap, dtype), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        run = [r for r in rs if id(r) not in dropped] or rs  # what can run: spilling tuned configs are pruned
        spill = max(r.get("stack", 0) + r.get("local", 0) for r in run)
        regs = max(r.get("regs", 0) for r in run)
        smem = max(r["shared_meta"] for r in rs)
        stages = "-".join(map(str, sorted({r["num_stages"] for r in rs})))
        units = ", ".join(sorted({r["mma"] for r in rs}))
        lines.append(f"| `{name}` | {cap} | {dtype} | {len(rs)} | {len(rs) - len(run)} | {regs} | {spill} | {smem:,} "
                     f"| {stages} | {units} |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddpm_fast.tools.aot", description=__doc__.split("\n")[0])
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help=f"comma-separated, from {list(SCENARIOS)}, and {TESTS!r}: the kernel tests' own launches "
                             "(run from a checkout)")  # fmt: skip
    parser.add_argument("--test-dir", default="tests", help="where the 'tests' scenario finds the test suite")
    parser.add_argument("--cap", type=int, nargs="+", default=[80, 90], help="compute capabilities (80, 90)")
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--layouts", default="nchw,channels_last", help="the model scenarios' layouts")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--summary", action="store_true", help="one line per kernel, sm and precision")
    args = parser.parse_args(argv)
    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = [s for s in scenarios if s not in (*SCENARIOS, TESTS)]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; choose from {[*SCENARIOS, TESTS]}")
    if TESTS in scenarios and not os.path.isdir(args.test_dir):
        parser.error(f"--test-dir {args.test_dir!r} is not a folder: the 'tests' scenario runs a checkout's tests")
    rows = compile_report(scenarios, args.cap, args.precisions.split(","), args.layouts.split(","), args.test_dir)
    found = problems(rows)
    if TESTS in scenarios:
        print(f"tests scenario: pytest outcomes {TEST_OUTCOMES} (launches recorded; verdicts meaningless here)",
              file=sys.stderr)  # fmt: skip
    import torch
    import triton

    versions = {"torch": torch.__version__, "triton": triton.__version__}
    if args.json:
        minor = [f"{k['name']} sm_{k['cap']} {k['config']} ({k['stack'] + k['local']} B)" for k in minor_spills(rows)]
        print(json.dumps({"kernels": rows, "problems": found, "pruned": len(pruned(rows)), "minor_spills": minor,
                          "versions": versions, "test_outcomes": TEST_OUTCOMES}, default=str))  # fmt: skip
    elif args.summary:
        print(f"torch {versions['torch']}, triton {versions['triton']}")
        print(summary(rows))
        print(f"pruned at run time (spilling autotune configurations): {len(pruned(rows))}")
        minor = sorted({f"{k['name']} sm_{k['cap']} {k['config']}" for k in minor_spills(rows)})
        print(f"minor spills (<= {MINOR_SPILL_B} B, not autotuned): " + ("; ".join(minor) or "none"))
        print("problems:", "; ".join(found) if found else "none")
    else:
        print(f"{'scenario':<16}{'dtype':<9}{'kernel':<32}{'sm':>4}{'warps':>6}{'stg':>4}{'regs':>6}{'spill B':>9}"
              f"{'smem B':>9}{'dots':>7}  config")  # fmt: skip
        for r in (r for r in rows if "error" not in r):
            spill = r.get("stack", 0) + r.get("local", 0)
            print(f"{r['scenario']:<16}{r['dtype']:<9}{r['name']:<32}{r['cap']:>4}{r['num_warps']:>6}"
                  f"{r['num_stages']:>4}{r.get('regs', '?'):>6}{spill:>9}{r['shared_meta']:>9}{r['mma']:>7}"
                  f"  {r['config']}")  # fmt: skip
        print("problems:", "; ".join(found) if found else "none")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
