"""`ddpm-fast check --bench DIR`: what a new GPU user runs first, in a few minutes, with nothing
beyond torch, triton and this package's own dependencies (no diffusers, no network):

1. the check itself: versions, every fused op against its float64 eager twin at the U-Net's
   shapes in float32, float16 and bfloat16 (ddpm_fast.tools.selfcheck);
2. the checkout's on-device kernel tests (`pytest -m on_device tests/`, compiled kernels on the
   GPU), where pytest and the tests/ folder are there, counted from pytest's JUnit XML;
3. the key benchmark groups, each alternative timed on the same inputs (torch.utils.benchmark,
   median, synchronised): each op eager / fused / torch.compile (and SDPA for attention), one
   training step of the 35.7M U-Net in float32 and under bfloat16 autocast, and one DDIM sampling
   step at batch 1 and 64, with and without a CUDA graph;

and writes DIR/check.json (everything, with the versions and the GPU) and DIR/check.md (the same
as tables). On a CPU it runs the same code at tiny shapes, the kernels in Triton's interpreter:
a smoke test of this command, whose timings say nothing about a GPU (the fused rows are not timed).
"""

import functools
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from ddpm_fast.tools import selfcheck

TESTS_TIMEOUT_S = 240


def _checkout_tests() -> Path | None:
    tests = Path(__file__).resolve().parents[2] / "tests"  # ddpm_fast/tools/checkbench.py -> the checkout
    return tests if (tests / "conftest.py").is_file() else None


def run_tests(device: torch.device, out_dir: Path) -> dict:
    """The on-device kernel tests of this checkout on `device`: pytest's counts, or why they did not run."""
    tests = _checkout_tests()
    if tests is None:
        return {"status": "not run", "why": "no tests/ folder beside the package (an installed wheel)"}
    try:
        import pytest  # noqa: F401
    except ImportError:
        return {"status": "not run", "why": "pytest is not installed"}
    junit = out_dir / "tests.xml"
    cmd = [sys.executable, "-m", "pytest", str(tests), "-m", "on_device", "-q", "-p", "no:cacheprovider",
           "-o", "addopts=", "--junitxml", str(junit)]  # fmt: skip
    env = dict(os.environ, DDPM_FAST_TEST_DEVICE=device.type)
    if device.type == "cuda":
        env.pop("TRITON_INTERPRET", None)
        try:
            import xdist  # noqa: F401

            cmd += ["-n", str(min(8, os.cpu_count() or 1))]  # Triton compiles in parallel; one GPU serves all
        except ImportError:
            pass
    else:  # the interpreter takes many minutes for the whole suite: a smoke run of this step
        cmd += ["-k", "kernel_mode"]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TESTS_TIMEOUT_S, cwd=tests.parent)
    except subprocess.TimeoutExpired:
        return {"status": "timed out", "why": f"after {TESTS_TIMEOUT_S} s", "command": " ".join(cmd)}
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if junit.is_file():
        for suite in ET.parse(junit).getroot().iter("testsuite"):
            for key in counts:
                counts[key] += int(suite.get(key, 0))
    failed = [line for line in done.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return {"status": "passed" if done.returncode == 0 else "failed", "returncode": done.returncode,
            "seconds": round(time.perf_counter() - start, 1), **counts, "failed": failed[:50],
            "subset": None if device.type == "cuda" else "-k kernel_mode (CPU smoke run)",
            "tail": done.stdout[-2000:] if done.returncode else ""}  # fmt: skip


# -- benchmark groups -----------------------------------------------------------------------------


def _compiled(fn):
    import torch._dynamo

    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def _grad_of(fn, grad):
    return lambda *a, **k: fn(*a, **k).backward(grad)


def _attention(module):
    """The attention a case times: the module's (kernels, reference), or SDPA (module None)."""
    return torch.nn.functional.scaled_dot_product_attention if module is None else module.attention


def _op_groups(device: torch.device, small: bool, fused: bool) -> list[dict]:
    from ddpm_fast import kernels, reference
    from ddpm_fast.schedule import POSTERIOR_STEP_BUFFERS, make_betas, schedule_buffers

    bufs = {k: v.to(device) for k, v in schedule_buffers(make_betas("linear", selfcheck.T)).items()}
    step = [bufs[n] for n in POSTERIOR_STEP_BUFFERS]
    coefs = (bufs["sqrt_alphas_cumprod"], bufs["sqrt_one_minus_alphas_cumprod"])
    image = (2, 3, 8, 8) if small else (128, 3, 32, 32)
    sampling = (2, 3, 8, 8) if small else (256, 3, 32, 32)
    gn = (2, 32, 4, 4) if small else (128, 128, 32, 32)
    B, L, d = (1, 16, 32) if small else (128, 256, 256)
    rows = []

    def group(name, make, alternatives):
        """make(module) -> a no-argument callable; alternatives: (name, module, compile?)."""
        for alt, module, compile_it in alternatives:
            if alt.startswith("fused") and not fused:
                rows.append(dict(group=name, alternative=alt, ms=None, note="interpreter: not timed"))
                continue
            fn = make(module)
            if compile_it:
                fn = _compiled(fn)
            with kernels.kernel_mode("triton" if module is kernels else "eager"):
                rows.append(dict(group=name, alternative=alt, ms=round(selfcheck._median_ms(fn), 4)))

    alts = [("eager", reference, False), ("fused", kernels, False), ("compile", reference, True)]
    x = torch.randn(image, device=device)
    t = torch.randint(0, selfcheck.T, (image[0],), device=device)
    group(f"q_sample fwd {image} fp32", lambda m: functools.partial(m.q_sample, x, t, x, *coefs, check_t=False), alts)
    xs = torch.randn(sampling, device=device)
    ts = torch.randint(0, selfcheck.T, (sampling[0],), device=device)
    group(f"posterior_step {sampling} fp32",
          lambda m: functools.partial(m.posterior_step, xs, xs, ts, xs, *step, check_t=False), alts)  # fmt: skip
    for dtype in (torch.float32, torch.bfloat16):
        name = selfcheck.DTYPE_SHORT[dtype]
        h = torch.randn(gn, device=device, dtype=dtype, requires_grad=True)
        w = torch.ones(gn[1], device=device, dtype=dtype, requires_grad=True)
        b = torch.zeros(gn[1], device=device, dtype=dtype, requires_grad=True)
        a = torch.randn(gn[:2], device=device, dtype=dtype)
        dy = torch.randn_like(h)
        group(f"group_norm_silu+add fwd+bwd {gn} {name}",
              lambda m, h=h, w=w, b=b, a=a, dy=dy: functools.partial(_grad_of(m.group_norm_silu, dy), h, 32, w, b,
                                                                      1e-6, add=a), alts)  # fmt: skip
        qkv = torch.randn(B, L, 3 * d, device=device, dtype=dtype)
        q, k, v = (u.unsqueeze(1).detach().requires_grad_() for u in qkv.chunk(3, -1))  # the U-Net's layout
        do = torch.randn(B, 1, L, d, device=device, dtype=dtype)
        group(f"attention fwd+bwd ({B}, 1, {L}, {d}) U-Net layout {name}",
              lambda m, q=q, k=k, v=v, do=do: functools.partial(_grad_of(_attention(m), do), q, k, v),
              alts + [("sdpa", None, False)])  # fmt: skip
    return rows


def _step_groups(device: torch.device, small: bool, fused: bool) -> list[dict]:
    from ddpm_fast import DDPM, FastDDPM
    from ddpm_fast.train import train_step

    train_batch, _, _, _, config = selfcheck.TIMED[small]
    unet = "tiny U-Net" if small else "35.7M U-Net"
    rows = []
    for dtype in (None, torch.bfloat16):
        name = f"train step (fwd, loss, bwd, Adam), {unet}, batch {train_batch}, " + (
            "fp32" if dtype is None else "bf16 autocast"
        )
        for alt, cls in (("eager", DDPM), ("fused", FastDDPM)):
            if alt == "fused" and not fused:
                rows.append(dict(group=name, alternative=alt, ms=None, note="interpreter: not timed"))
                continue
            ddpm = selfcheck._model(cls, device, config)
            opt = torch.optim.Adam(ddpm.parameters(), lr=2e-4)
            x0 = torch.rand(train_batch, 3, ddpm.image_size, ddpm.image_size, device=device) * 2 - 1
            ms = selfcheck._median_ms(functools.partial(train_step, ddpm, x0, opt, autocast_dtype=dtype))
            rows.append(dict(group=name, alternative=alt, ms=round(ms, 4)))
    steps = 2 if small else 20
    for batch in (1, 2) if small else (1, 64):
        name = f"DDIM sampling step, {unet}, batch {batch}, fp32 (a {steps}-step run / {steps})"
        for alt, cls, graph in (("eager", DDPM, False), ("eager+cuda-graph", DDPM, True), ("fused", FastDDPM, False),
                                ("fused+cuda-graph", FastDDPM, True)):  # fmt: skip
            if (graph and device.type != "cuda") or (cls is FastDDPM and not fused):
                why = "needs a CUDA device" if graph and device.type != "cuda" else "interpreter: not timed"
                rows.append(dict(group=name, alternative=alt, ms=None, note=why))
                continue
            ddpm = selfcheck._model(cls, device, config).eval()
            run = functools.partial(ddpm.ddim_sample, batch, steps=steps, progress=False, cuda_graph=graph)
            rows.append(dict(group=name, alternative=alt, ms=round(selfcheck._median_ms(run) / steps, 4)))
    return rows


def benchmarks(device: torch.device) -> list[dict]:
    small = device.type != "cuda"
    return _op_groups(device, small, fused=not small) + _step_groups(device, small, fused=not small)


# -- the report files -----------------------------------------------------------------------------


def markdown(report: dict) -> str:
    lines = ["# ddpm-fast check", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report["versions"]]
    lines += ["", f"## Fused against float64: {report['comparisons_failed']} failed", "",
              "| op | shape | dtype | fused max error | eager max error | result |",
              "|---|---|---|---:|---:|---|"]  # fmt: skip
    for c in report["comparisons"]:
        lines.append(f"| {c['op']} | {c['shape']} | {c['dtype']} | {c['fused_error']:.2e} | {c['eager_error']:.2e} "
                     f"| {c['result']} |")  # fmt: skip
    tests = report["tests"]
    lines += ["", "## Kernel tests (pytest -m on_device)", ""]
    if "tests" in tests:
        lines.append(f"{tests['status']}: {tests['tests']} tests, {tests['failures']} failures, {tests['errors']} "
                     f"errors, {tests['skipped']} skipped, {tests['seconds']} s"
                     + (f" ({tests['subset']})" if tests.get("subset") else ""))  # fmt: skip
        lines += [f"- {f}" for f in tests["failed"]]
    else:
        lines.append(f"{tests['status']}: {tests.get('why', '')}")
    groups: dict = {}
    for r in report["benchmarks"]:
        groups.setdefault(r["group"], {})[r["alternative"]] = r["ms"]
    alts = ["eager", "fused", "compile", "sdpa", "eager+cuda-graph", "fused+cuda-graph"]
    lines += ["", f"## Timings on {report['device']} (median ms; lower is better)", "",
              "| case | " + " | ".join(alts) + " | fused vs eager | fused vs best other |",
              "|---|" + "---:|" * (len(alts) + 2)]  # fmt: skip
    for name, by_alt in groups.items():
        cells = [f"{by_alt[a]:.3f}" if by_alt.get(a) is not None else "" for a in alts]
        fused = by_alt.get("fused+cuda-graph") or by_alt.get("fused")
        others = [v for a, v in by_alt.items() if not a.startswith("fused") and v is not None]
        vs_eager = f"{by_alt['eager'] / fused:.2f}x" if fused and by_alt.get("eager") else ""
        vs_best = f"{min(others) / fused:.2f}x" if fused and others else ""
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {vs_eager} | {vs_best} |")
    if report["device"] == "cpu":
        lines += ["", "CPU timings of a smoke run at tiny shapes: they say nothing about a GPU."]
    return "\n".join(lines) + "\n"


def run(device: torch.device, dtypes, out_dir: Path, tests: bool = True, ops=None) -> int:
    """The check, the kernel tests and the benchmark groups on `device`; DIR/check.json and
    DIR/check.md; returns the exit status (1 when a comparison or a test failed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results: list = []
    status = selfcheck.run(device, dtypes, timing=False, results=results, ops=ops)
    print("\nKernel tests (pytest -m on_device) ...", flush=True)
    test_report = run_tests(device, out_dir) if tests else {"status": "not run", "why": "--no-tests"}
    if "why" in test_report:
        print(f"  {test_report['status']}: {test_report['why']}", flush=True)
    else:
        print(f"  {test_report['status']}, {test_report['tests']} tests, {test_report['failures']} failures, "
              f"{test_report['seconds']} s", flush=True)  # fmt: skip
    print("Benchmarks ...", flush=True)
    bench = benchmarks(device)
    report = {
        "versions": selfcheck.versions(device),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "comparisons": results,
        "comparisons_failed": sum(r["result"] != "ok" for r in results),
        "tests": test_report,
        "benchmarks": bench,
        "seconds": round(time.perf_counter() - start, 1),
    }
    (out_dir / "check.json").write_text(json.dumps(report, indent=1, default=str))
    (out_dir / "check.md").write_text(markdown(report))
    print(f"\nWrote {out_dir / 'check.json'} and {out_dir / 'check.md'} ({report['seconds']} s)")
    failed = status or test_report["status"] in ("failed", "timed out")
    return 1 if failed else 0
