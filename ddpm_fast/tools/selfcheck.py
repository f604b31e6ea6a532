"""`ddpm-fast check`: are the fused kernels right on this machine, and how fast are they?

1. Versions: Python, torch, triton, CUDA, the GPU (name, compute capability, memory), the
   kernel path.
2. Every fused op against its eager twin computed in float64, at the paper U-Net's shapes
   (every GroupNorm of the U-Net, 32x32 down to 4x4; attention at 16x16 in the layout the
   U-Net passes, and one head of 512 as in the 256-pixel google/ddpm-* checkpoints), in float32,
   float16 and bfloat16, output and every gradient. A row passes
   when the fused result is within the tolerance table of the float64 one, or no further from
   it than four times the eager twin in the same dtype is (near t = 0 the reverse steps are
   ill-conditioned and float32 itself strays). The report shows both errors.
3. On CUDA, a timing of each op and of one training step and one sampling step of the paper's
   35.7M-parameter U-Net, fused against eager (torch.utils.benchmark, median).

On a CPU the Triton kernels run only in Triton's interpreter: the comparisons run there on small
shapes, in a child process with TRITON_INTERPRET=1 (it must be set before triton is imported),
and nothing is timed (the interpreter is not a GPU). The exit status is 1 when any comparison
fails.
"""

import argparse
import dataclasses
import functools
import os
import platform
import subprocess
import sys
from collections.abc import Callable

import torch

# Output dtype -> tolerance against float64 (torch.testing.assert_close's rtol/atol). The kernels
# compute in float32 and round once: half a unit in the last place of the output dtype plus
# float32's own rounding. Sums over many values (a GroupNorm's dweight, dbias, dadd) get 4x.
TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}
DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
T = 1000


@dataclasses.dataclass
class Case:
    """One comparison: run(path) gives the op's outputs (output, then gradients) on the
    "fused", "eager" or "float64" path from the same inputs."""

    op: str
    shape: str
    dtype: torch.dtype
    run: Callable[[str], list[torch.Tensor]]
    summed: tuple[str, ...] = ()  # outputs that sum over many values (looser tolerance)
    names: tuple[str, ...] = ("out",)


@dataclasses.dataclass
class Result:
    case: Case
    fused_error: float
    eager_error: float
    passed: bool
    worst: str  # the output with the largest fused error


def _leaves(tensors, path, grad):
    """Fresh leaves for one path, requiring grad if `grad`: the inputs themselves (detached,
    strides kept: the U-Net's views stay views), float64 copies on the float64 path."""
    out = []
    for t in tensors:
        if t is None or not t.is_floating_point():
            out.append(t)
            continue
        t = t.detach()
        out.append((t.double() if path == "float64" else t).requires_grad_(grad))
    return out


def _run(path, fn_fused, fn_eager, inputs, grad_out=None, grad_of=()):
    """Outputs of one path: the op's output, then the gradients of the inputs at `grad_of`
    under the upstream gradient grad_out."""
    from ddpm_fast import checks, kernels

    leaves = _leaves(inputs, path, grad_out is not None)
    if path == "fused":
        with kernels.kernel_mode("triton"):
            out = fn_fused(*leaves)
    else:
        with checks.allow_float64():
            out = fn_eager(*leaves)
    results = [out.detach()]
    if grad_out is not None:
        out.backward(grad_out.to(out.dtype))
        results += [leaves[i].grad for i in grad_of]
    return results


def _case(op, shape, dtype, fused, eager, inputs, grad_out=None, grad_of=(), **kwargs) -> Case:
    run = functools.partial(_run, fn_fused=fused, fn_eager=eager, inputs=inputs, grad_out=grad_out, grad_of=grad_of)
    return Case(op, str(shape), dtype, run, **kwargs)


def _cases(device: torch.device, dtypes, small: bool) -> list[Case]:
    from ddpm_fast import kernels, reference
    from ddpm_fast.dpm_solver import dpm_solver_coefficients, dpm_solver_timesteps
    from ddpm_fast.schedule import POSTERIOR_STEP_BUFFERS, make_betas, schedule_buffers
    from ddpm_fast.tools.aot import UNET_GROUP_NORMS

    bufs = {k: v.to(device) for k, v in schedule_buffers(make_betas("linear", T)).items()}
    step = [bufs[n] for n in POSTERIOR_STEP_BUFFERS]
    coefs = (bufs["sqrt_alphas_cumprod"], bufs["sqrt_one_minus_alphas_cumprod"])
    ac = bufs["alphas_cumprod"]
    gen = torch.Generator(device).manual_seed(0)

    def randn(*shape, dtype=torch.float32, scale=1.0):
        return (torch.randn(shape, generator=gen, device=device) * scale).to(dtype)

    def steps(batch):
        return torch.randint(0, T, (batch,), generator=gen, device=device)

    image = (2, 3, 8, 8) if small else (128, 3, 32, 32)
    sampling = (3, 3, 8, 8) if small else (256, 3, 32, 32)
    if small:  # (channels, size, groups): the U-Net's GroupNorms scaled down, and an odd one
        norms = [(64, 8, 32), (96, 4, 32), (6, 5, 3)]
    else:
        norms = [(c, s, 32) for c, s in UNET_GROUP_NORMS]
    gn_batch = 2 if small else 8
    B, L, d = (1, 16, 32) if small else (16, 256, 256)  # attention: the 16x16 map, 256 channels
    dpm = dpm_solver_coefficients(ac, dpm_solver_timesteps(T, 20), "epsilon").to(device)
    cases = []
    for dtype in dtypes:
        cases.append(_case(
            "q_sample fwd+bwd", image, dtype,
            lambda x, t, n: kernels.q_sample(x, t, n, *coefs), lambda x, t, n: reference.q_sample(x, t, n, *coefs),
            (randn(*image, dtype=dtype), steps(image[0]), randn(*image, dtype=dtype)), randn(*image), (0, 2),
            names=("out", "dx0", "dnoise"),
        ))  # fmt: skip
        x_t, out, z, t = (randn(*sampling, dtype=dtype, scale=1.5), randn(*sampling, dtype=dtype),
                          randn(*sampling, dtype=dtype), steps(sampling[0]))  # fmt: skip
        cases.append(_case(
            "posterior_step", sampling, dtype, lambda *a: kernels.posterior_step(*a, *step),
            lambda *a: reference.posterior_step(*a, *step), (x_t, out, t, z),
        ))  # fmt: skip
        two = randn(sampling[0], 2 * sampling[1], *sampling[2:], dtype=dtype)  # prediction, then variance values
        cases.append(_case(
            "posterior_step learned_range", sampling, dtype,
            lambda x, o, t, z: kernels.posterior_step(x, o[:, :3], t, z, *step, model_variance=o[:, 3:].tanh(),
                                                      max_log_variance=bufs["log_betas"]),
            lambda x, o, t, z: reference.posterior_step(x, o[:, :3], t, z, *step, model_variance=o[:, 3:].tanh(),
                                                        max_log_variance=bufs["log_betas"]),
            (x_t, two, t, z),
        ))  # fmt: skip
        cases.append(_case(
            "ddim_step eta=0.5", sampling, dtype, lambda *a: kernels.ddim_step(*a, ac, 0.5),
            lambda *a: reference.ddim_step(*a, ac, 0.5), (x_t, out, t, (t - 10).clamp(min=-1), z),
        ))  # fmt: skip
        i = torch.arange(sampling[0], device=device) % 20  # first-order, second-order and last rows
        cases.append(_case(
            "dpm_solver_step", sampling, dtype, lambda *a: kernels.dpm_solver_step(*a, dpm)[0],
            lambda *a: reference.dpm_solver_step(*a, dpm)[0], (x_t, out, randn(*sampling), i),
        ))  # fmt: skip
        for channels, size, groups in norms:
            shape = (gn_batch, channels, size, size)
            cases.append(_case(
                "group_norm_silu+add fwd+bwd", shape, dtype,
                functools.partial(_gn, kernels.group_norm_silu, groups),
                functools.partial(_gn, reference.group_norm_silu, groups),
                (randn(*shape, dtype=dtype), (1 + 0.5 * randn(channels)).to(dtype), (0.5 * randn(channels)).to(dtype),
                 randn(gn_batch, channels, dtype=dtype)), randn(*shape), (0, 1, 2, 3),
                summed=("dweight", "dbias", "dadd"), names=("out", "dx", "dweight", "dbias", "dadd"),
            ))  # fmt: skip
        qkv = randn(B, L, 3 * d, dtype=dtype)  # one projection's output, as the U-Net's AttnBlock has it
        cases.append(_case(
            "attention fwd+bwd", f"({B}, 1, {L}, {d}) U-Net layout", dtype, kernels.attention, reference.attention,
            tuple(u.unsqueeze(1) for u in qkv.chunk(3, dim=-1)), randn(B, 1, L, d), (0, 1, 2),
            names=("out", "dq", "dk", "dv"),
        ))  # fmt: skip
        # one head of 512 (the google/ddpm-*-256 checkpoints' 16x16 attention): chunked in every precision
        B3, L3, d3 = (1, 16, 512) if small else (4, 256, 512)
        qkv3 = randn(B3, L3, 3 * d3, dtype=dtype)
        cases.append(_case(
            "attention fwd+bwd, head dim 512", f"({B3}, 1, {L3}, {d3}) token-major", dtype, kernels.attention,
            reference.attention, tuple(u.unsqueeze(1) for u in qkv3.chunk(3, dim=-1)), randn(B3, 1, L3, d3),
            (0, 1, 2), names=("out", "dq", "dk", "dv"),
        ))  # fmt: skip
        # float32 with TF32 off runs as 3xTF32 on tensor cores: the case above with its head dim split over
        # programs (chunks of 128 forward, 64 backward), this one at a head dim held whole
        if dtype == torch.float32:
            B2, H2, L2, d2 = (1, 2, 16, 32) if small else (16, 4, 256, 64)
            qkv2 = randn(B2, L2, 3 * H2 * d2, dtype=dtype).view(B2, L2, 3 * H2, d2).transpose(1, 2)
            cases.append(_case(
                "attention fwd+bwd, several heads", f"({B2}, {H2}, {L2}, {d2}) token-major", dtype, kernels.attention,
                reference.attention, tuple(qkv2.chunk(3, dim=1)), randn(B2, H2, L2, d2), (0, 1, 2),
                names=("out", "dq", "dk", "dv"),
            ))  # fmt: skip
    return cases


def _gn(op, groups, x, weight, bias, add):
    return op(x, groups, weight, bias, 1e-6, add=add)


def compare(case: Case) -> Result:
    """The fused and the eager path against float64, output by output."""
    fused, eager, ref = case.run("fused"), case.run("eager"), case.run("float64")
    passed, worst, fused_max, eager_max = True, case.names[0], 0.0, 0.0
    for name, f, e, r in zip(case.names, fused, eager, ref):
        tol = {k: v * (4 if name in case.summed else 1) for k, v in TOLERANCES[case.dtype].items()}
        f_err = (f.double() - r).abs().max().item() if r.numel() else 0.0
        e_err = (e.double() - r).abs().max().item() if r.numel() else 0.0
        ok = bool(torch.isclose(f.double(), r, **tol).all()) or f_err <= 4 * e_err
        passed &= ok and f.dtype == case.dtype and f.shape == r.shape
        if f_err >= fused_max:
            worst, fused_max = name, f_err
        eager_max = max(eager_max, e_err)
    return Result(case, fused_max, eager_max, passed, worst)


def versions(device: torch.device) -> list[tuple[str, str]]:
    import triton

    from ddpm_fast import __version__, kernels
    from ddpm_fast.kernels._common import interpreter_on

    rows = [("ddpm-fast", __version__), ("python", platform.python_version()), ("torch", torch.__version__),
            ("triton", triton.__version__), ("CUDA (torch built with)", str(torch.version.cuda))]  # fmt: skip
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        rows += [("GPU", f"{props.name}, sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB, "
                         f"{props.multi_processor_count} SMs"), ("driver (CUDA)", _driver())]  # fmt: skip
    else:
        rows.append(("GPU", "none visible" if not torch.cuda.is_available() else f"not used (--device {device})"))
    rows.append(("kernel path", f"DDPM_FAST_KERNELS={kernels.get_kernel_mode()}, Triton interpreter "
                                f"{'on' if interpreter_on() else 'off'}"))  # fmt: skip
    return rows


def _driver() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10).stdout.strip() or "unknown"  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no nvidia-smi)"


def _median_ms(fn) -> float:
    from torch.utils import benchmark

    fn()  # compile / warm up outside the timed runs
    return benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.3).median * 1e3


# (training batch, sampling batches, GroupNorm shape, attention (B, L, d), U-Net config): the
# paper's on a GPU; a tiny stand-in for smoke-testing this code where only the interpreter runs.
TIMED = {
    False: (128, (16, 256), (128, 128, 32, 32), (128, 256, 256), None),
    True: (2, (2,), (2, 32, 4, 4), (1, 16, 32), dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                                                      num_groups=8, image_size=8)),
}  # fmt: skip


def _model(cls, device, config):
    from ddpm_fast import UNet, UNetConfig

    torch.manual_seed(0)
    unet = UNet() if config is None else UNet(UNetConfig(**config))
    return cls(unet, image_size=unet.config.image_size).to(device)


def _train_step_ms(cls, device, batch, config):
    from ddpm_fast.train import train_step

    ddpm = _model(cls, device, config)
    opt = torch.optim.Adam(ddpm.parameters(), lr=2e-4)
    size = ddpm.image_size
    x0 = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    return _median_ms(functools.partial(train_step, ddpm, x0, opt))


@torch.no_grad()
def _sampling_step_ms(cls, device, batch, config):
    ddpm = _model(cls, device, config).eval()
    x = torch.randn(batch, 3, ddpm.image_size, ddpm.image_size, device=device)
    return _median_ms(functools.partial(ddpm.p_sample, x, torch.full((batch,), 500, device=device)))


def _backward(fn, grad, *args, **kwargs):
    fn(*args, **kwargs).backward(grad)


def timings(device: torch.device, small: bool = False) -> list[tuple[str, float, float]]:
    """(what, eager ms, fused ms) for each op at the U-Net's shapes and one whole step of the
    paper's U-Net (small: tiny shapes and model, to exercise this code without a GPU)."""
    from ddpm_fast import DDPM, FastDDPM, kernels, reference
    from ddpm_fast.schedule import POSTERIOR_STEP_BUFFERS, make_betas, schedule_buffers

    bufs = {k: v.to(device) for k, v in schedule_buffers(make_betas("linear", T)).items()}
    step = [bufs[n] for n in POSTERIOR_STEP_BUFFERS]
    train_batch, sample_batches, gn, (B, L, d), config = TIMED[small]
    rows = []

    def pair(what, name, *args, grad=None, **kwargs):
        ms = []
        for module, mode in ((reference, "eager"), (kernels, "triton")):
            fn = getattr(module, name)
            with kernels.kernel_mode(mode):
                call = functools.partial(_backward, fn, grad) if grad is not None else fn
                ms.append(_median_ms(functools.partial(call, *args, **kwargs)))
        rows.append((what, *ms))

    x = torch.randn(train_batch, 3, 32, 32, device=device)
    t = torch.randint(0, T, (train_batch,), device=device)
    pair(f"q_sample fwd {tuple(x.shape)} fp32", "q_sample", x, t, x, bufs["sqrt_alphas_cumprod"],
         bufs["sqrt_one_minus_alphas_cumprod"], check_t=False)  # fmt: skip
    x = torch.randn(max(sample_batches), 3, 32, 32, device=device)
    t = torch.randint(0, T, (x.shape[0],), device=device)
    pair(f"posterior_step {tuple(x.shape)} fp32", "posterior_step", x, x, t, x, *step, check_t=False)
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        h = torch.randn(gn, device=device, dtype=dtype, requires_grad=True)
        w, b = torch.ones(gn[1], device=device, dtype=dtype), torch.zeros(gn[1], device=device, dtype=dtype)
        a = torch.randn(gn[:2], device=device, dtype=dtype)
        pair(f"group_norm_silu+add fwd+bwd {gn} {name}", "group_norm_silu", h, 32, w, b, 1e-6, add=a,
             grad=torch.randn_like(h))  # fmt: skip
        qkv = torch.randn(B, L, 3 * d, device=device, dtype=dtype)
        q, k, v = (u.unsqueeze(1).requires_grad_() for u in qkv.chunk(3, -1))
        pair(f"attention fwd+bwd ({B}, 1, {L}, {d}) {name}", "attention", q, k, v,
             grad=torch.randn(B, 1, L, d, device=device, dtype=dtype))  # fmt: skip
    unet = "tiny U-Net" if small else "35.7M U-Net"
    rows.append((f"train step (fwd, loss, bwd, Adam), {unet}, batch {train_batch}, fp32",
                 *(_train_step_ms(cls, device, train_batch, config) for cls in (DDPM, FastDDPM))))  # fmt: skip
    for batch in sample_batches:
        rows.append((f"sampling step, {unet}, batch {batch}, fp32",
                     *(_sampling_step_ms(cls, device, batch, config) for cls in (DDPM, FastDDPM))))  # fmt: skip
    return rows


OPS = ("q_sample", "posterior_step", "ddim_step", "dpm_solver_step", "group_norm_silu", "attention")


def run(device: torch.device, dtypes, timing: bool = True, out=sys.stdout, ops=None, results=None) -> int:
    """The whole check on `device` (the comparisons of `ops` only, if given), printed to `out`;
    returns the exit status (1 on a failure). Each comparison is appended to `results` (a list)
    as a dict, if given."""
    from ddpm_fast.kernels._common import fix_old_interpreter, interpreter_on

    def say(line=""):
        print(line, file=out, flush=True)

    say("ddpm-fast check")
    for key, value in versions(device):
        say(f"  {key:<24} {value}")
    small = device.type == "cpu"
    if small:
        say("\nNo GPU in use: the Triton kernels run only in Triton's interpreter here, on small shapes.\n"
            "That checks their arithmetic, not their speed; run this on the GPU you will train on.")  # fmt: skip
        if not interpreter_on():
            raise RuntimeError("the CPU check needs TRITON_INTERPRET=1 before triton is imported")
        fix_old_interpreter()
    say(f"\nFused against the eager twin in float64 ({'small shapes' if small else 'the U-Net shapes'}): max |error|")
    say(f"  {'op':<28} {'shape':<30} {'dtype':<9} {'fused':>10} {'eager':>10}  result")
    failures = 0
    for case in _cases(device, dtypes, small):
        if ops and not case.op.startswith(tuple(ops)):
            continue
        row = dict(op=case.op, shape=case.shape, dtype=str(case.dtype)[6:], fused_error=float("nan"),
                   eager_error=float("nan"))  # fmt: skip
        try:
            r = compare(case)
        except Exception as e:  # a kernel that fails to build or launch is a failed check, reported
            failures += 1
            say(f"  {case.op:<28} {case.shape:<30} {str(case.dtype)[6:]:<9} FAIL: {type(e).__name__}: {e}")
            if results is not None:
                results.append(dict(row, result=f"FAIL: {type(e).__name__}: {e}"[:300]))
            continue
        failures += not r.passed
        verdict = "ok" if r.passed else f"FAIL (worst: {r.worst})"
        if results is not None:
            results.append(dict(row, fused_error=r.fused_error, eager_error=r.eager_error, result=verdict))
        say(f"  {case.op:<28} {case.shape:<30} {str(case.dtype)[6:]:<9} {r.fused_error:>10.2e} "
            f"{r.eager_error:>10.2e}  {verdict}")  # fmt: skip
    if timing and device.type == "cuda":
        say("\nTimings on this GPU (median of torch.utils.benchmark runs; ms, lower is better)")
        say(f"  {'what':<58} {'eager':>9} {'fused':>9} {'speed-up':>9}")
        for what, eager_ms, fused_ms in timings(device):
            say(f"  {what:<58} {eager_ms:>9.3f} {fused_ms:>9.3f} {eager_ms / fused_ms:>8.2f}x")
    elif timing:
        say("\nTimings: skipped (only a GPU's timings mean anything; the interpreter is not one).")
    say(f"\n{'FAILED' if failures else 'PASSED'}: {failures} failed comparison(s)")
    return 1 if failures else 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="the device to check (a CPU checks the kernels in Triton's interpreter)")  # fmt: skip
    p.add_argument("--dtype", action="append", choices=list(DTYPE_NAMES), dest="dtypes",
                   help="a dtype to compare in (repeatable; default: all three)")  # fmt: skip
    p.add_argument("--op", action="append", choices=OPS, dest="ops",
                   help="compare only this op (repeatable; default: all)")  # fmt: skip
    p.add_argument("--no-timing", action="store_true", help="compare only; skip the timings")
    p.add_argument("--bench", metavar="DIR", default=None,
                   help="also run the kernel tests (pytest -m on_device, from a checkout) and the key benchmark "
                        "groups (each op eager/fused/torch.compile/SDPA, train step fp32 and bf16, DDIM step at batch "
                        "1 and 64 with and without a CUDA graph); write DIR/check.json and DIR/check.md")  # fmt: skip
    p.add_argument("--no-tests", action="store_true", help="with --bench: skip the kernel tests")


def main(args) -> int:
    """`ddpm-fast check`: runs the check here, or in a child process where the kernels need the
    Triton interpreter switched the other way than this process imported triton with."""
    from ddpm_fast import runs
    from ddpm_fast.kernels._common import interpreter_on

    device = runs.parse_device(args.device)
    want_interpreter = device.type == "cpu"
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {args.device}: the Triton kernels run on CUDA (or a CPU, interpreted)")
    if want_interpreter != interpreter_on():
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        if want_interpreter:
            env["TRITON_INTERPRET"] = "1"
        argv = [sys.executable, "-m", "ddpm_fast.tools.selfcheck", "--device", args.device]
        argv += [a for d in args.dtypes or () for a in ("--dtype", d)]
        argv += [a for o in args.ops or () for a in ("--op", o)] + (["--no-timing"] if args.no_timing else [])
        argv += (["--bench", args.bench] if args.bench else []) + (["--no-tests"] if args.no_tests else [])
        return subprocess.run(argv, env=env).returncode
    dtypes = [DTYPE_NAMES[d] for d in args.dtypes] if args.dtypes else list(TOLERANCES)
    if args.bench:
        from pathlib import Path

        from ddpm_fast.tools import checkbench

        return checkbench.run(device, dtypes, Path(args.bench), tests=not args.no_tests, ops=args.ops)
    return run(device, dtypes, timing=not args.no_timing, ops=args.ops)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="ddpm-fast check", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
