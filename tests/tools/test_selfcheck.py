"""`ddpm-fast check`: every fused op against its float64 eager twin, a failure exits non-zero."""

import io
import os
import subprocess
import sys

import pytest
import torch
from helpers import DEVICE

import ddpm_fast.kernels
from ddpm_fast.tools import selfcheck


def test_every_op_passes_and_is_reported():
    out = io.StringIO()
    assert selfcheck.run(DEVICE, [torch.float32], timing=False, out=out) == 0
    text = out.getvalue()
    for op in ("q_sample fwd+bwd", "posterior_step", "ddim_step", "group_norm_silu+add fwd+bwd", "attention fwd+bwd"):
        assert op in text, op
    assert "torch " in text and "triton " in text and "PASSED: 0 failed" in text
    assert text.count(" ok\n") == len(selfcheck._cases(DEVICE, [torch.float32], DEVICE.type == "cpu"))


def test_a_wrong_kernel_fails_the_check(monkeypatch):
    real = ddpm_fast.kernels.attention
    monkeypatch.setattr(ddpm_fast.kernels, "attention", lambda q, k, v: real(q, k, v) * 1.001)
    out = io.StringIO()
    assert selfcheck.run(DEVICE, [torch.float32], timing=False, out=out, ops=["attention", "q_sample"]) == 1
    assert "q_sample fwd+bwd" in out.getvalue() and "posterior_step" not in out.getvalue()
    failed = [line for line in out.getvalue().splitlines() if "FAIL" in line]
    # the three float32 attention cases (the U-Net's d = 256, one head of 512, several heads of 64) are 0.1% off
    assert len(failed) == 4 and all("attention" in f and "FAIL (worst: " in f for f in failed[:3])
    assert failed[3].startswith("FAILED: 3 failed")


def test_a_kernel_that_raises_is_a_reported_failure(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("out of resources: shared memory")

    monkeypatch.setattr(ddpm_fast.kernels, "posterior_step", broken)
    out = io.StringIO()
    assert selfcheck.run(DEVICE, [torch.float16], timing=False, out=out, ops=["posterior_step"]) == 1
    assert "posterior_step" in out.getvalue() and "FAIL: RuntimeError: out of resources" in out.getvalue()


def test_the_command_on_a_cpu_checks_in_the_interpreter_it_starts():
    """Run as users do, without TRITON_INTERPRET: the command starts the interpreter itself."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "ddpm_fast.cli", "check", "--device", "cpu", "--dtype", "float32",
                           "--op", "q_sample", "--op", "attention"],
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Triton interpreter on" in proc.stdout and "run only in Triton's interpreter" in proc.stdout
    assert "Timings: skipped" in proc.stdout and proc.stdout.rstrip().endswith("PASSED: 0 failed comparison(s)")


def test_bad_options_are_named():
    from ddpm_fast.cli import main

    with pytest.raises(SystemExit) as e:
        main(["check", "--device", "tpu"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["check", "--dtype", "float64"])
    assert e.value.code == 2


def test_the_timing_code_runs_each_op_and_step_on_both_paths(monkeypatch):
    """The GPU timings' plumbing at tiny shapes, every call made once on the eager path (the
    interpreter's speed means nothing; what is timed on a GPU is checked for a crash here)."""
    import contextlib

    calls = []
    monkeypatch.setattr(selfcheck, "_median_ms", lambda fn: calls.append(fn()) or 1.0)
    monkeypatch.setattr(ddpm_fast.kernels, "kernel_mode", lambda mode: contextlib.nullcontext())
    monkeypatch.setenv("DDPM_FAST_KERNELS", "eager")
    rows = selfcheck.timings(DEVICE, small=True)
    assert [what.split(" (")[0].split(",")[0] for what, _, _ in rows] == [
        "q_sample fwd", "posterior_step", "group_norm_silu+add fwd+bwd", "attention fwd+bwd",
        "group_norm_silu+add fwd+bwd", "attention fwd+bwd", "train step", "sampling step"]  # fmt: skip
    assert all(eager == fused == 1.0 for _, eager, fused in rows) and len(calls) == 2 * len(rows)


def test_bench_report_tables_and_the_tests_step(tmp_path, monkeypatch):
    """`ddpm-fast check --bench DIR`'s markdown: each group's alternatives side by side and the fused
    path's speed-up over eager and over the best other alternative (its CUDA graph when there is
    one); the kernel-tests step says why it did not run outside a checkout."""
    from ddpm_fast.tools import checkbench

    report = {
        "versions": [("torch", torch.__version__)],
        "device": "NVIDIA H200",
        "comparisons": [
            dict(
                op="attention fwd+bwd",
                shape="(16, 1, 256, 256)",
                dtype="bfloat16",
                fused_error=1e-3,
                eager_error=2e-3,
                result="ok",
            )
        ],  # fmt: skip
        "comparisons_failed": 0,
        "tests": {
            "status": "passed",
            "tests": 300,
            "failures": 0,
            "errors": 0,
            "skipped": 1,
            "seconds": 90.0,
            "failed": [],
            "subset": None,
        },  # fmt: skip
        "benchmarks": [
            dict(group="attn", alternative="eager", ms=4.0),
            dict(group="attn", alternative="fused", ms=1.0),
            dict(group="attn", alternative="sdpa", ms=2.0),
            dict(group="step", alternative="eager", ms=10.0),
            dict(group="step", alternative="fused", ms=8.0),
            dict(group="step", alternative="fused+cuda-graph", ms=2.0),
            dict(group="step", alternative="eager+cuda-graph", ms=5.0),
        ],  # fmt: skip
    }
    text = checkbench.markdown(report)
    assert "| attn | 4.000 | 1.000 |  | 2.000 |  |  | 4.00x | 2.00x |" in text
    assert "| step | 10.000 | 8.000 |  |  | 5.000 | 2.000 | 5.00x | 2.50x |" in text
    assert "passed: 300 tests, 0 failures, 0 errors, 1 skipped, 90.0 s" in text
    from pathlib import Path

    assert checkbench._checkout_tests() == Path(__file__).resolve().parents[1]  # this checkout's tests/
    monkeypatch.setattr(checkbench, "_checkout_tests", lambda: None)
    assert checkbench.run_tests(torch.device("cpu"), tmp_path)["status"] == "not run"
