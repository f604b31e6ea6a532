"""Every kernel compiles ahead of time for real GPUs (sm_80, sm_90) without spilling and within
the GPU's shared memory. The interpreter and real compilation cannot share a process, so the
report runs as a subprocess with TRITON_INTERPRET unset."""

import json
import os
import subprocess
import sys

import pytest


def compile_report(ops: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "ddpm_fast.aot", "--ops", ops, "--cap", "80", "90", "--json"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.stdout, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize(
    "ops, names",
    [
        ("q_sample", {"_q_sample_fwd_kernel", "_q_sample_bwd_kernel"}),
        ("posterior_step", {"_posterior_step_kernel", "_ddim_step_kernel"}),
        (
            "attention",
            {"_attn_fwd_kernel", "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"},
        ),
        (
            "group_norm_silu",
            {"_gn_silu_fwd_fused_kernel", "_gn_stats_kernel", "_gn_silu_apply_kernel", "_gn_silu_bwd_kernel"},
        ),
    ],
)
def test_kernels_compile_for_sm80_and_sm90_without_spills(ops, names):
    report = compile_report(ops)
    assert report["problems"] == []
    for cap in (80, 90):
        for dtype in ("float32", "float16"):
            compiled = {k["name"] for k in report["kernels"] if k["cap"] == cap and k["dtype"] == dtype}
            assert compiled == names, (cap, dtype, compiled)
    for k in report["kernels"]:
        assert k["stack"] == 0 and k["local"] == 0 and 0 < k["regs"] <= 255, k
