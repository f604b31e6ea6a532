"""Every kernel that real code launches compiles ahead of time for real GPUs (sm_80, sm_90)
without spilling and within the GPU's shared memory: a FastDDPM training step (batch 128 and 4)
and sampling steps (batch 1, 16, 256) of the paper's U-Net in float32, float16 and bfloat16
autocast, NCHW and channels_last, plus each op's own cases and every configuration the attention
autotuner may pick. The interpreter and real compilation cannot share a process, so the report
runs in subprocesses with TRITON_INTERPRET unset, one per GPU generation, side by side."""

import json
import os
import subprocess
import sys

import pytest

CAPS = (80, 90)


@pytest.fixture(scope="module")
def reports() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {
        cap: subprocess.Popen(
            [sys.executable, "-m", "ddpm_fast.aot", "--cap", str(cap), "--json"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for cap in CAPS
    }
    out = {}
    for cap, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=1800)
        assert stdout, stderr[-3000:]
        out[cap] = json.loads(stdout.splitlines()[-1])
    return out


@pytest.mark.parametrize("cap", CAPS)
def test_no_kernel_spills_or_overflows_shared_memory(reports, cap):
    report = reports[cap]
    assert report["problems"] == []
    for k in report["kernels"]:
        assert k["cap"] == cap and k["stack"] == 0 and k["local"] == 0 and 0 < k["regs"] <= 255, k


EXPECTED = {
    "train": {"_q_sample_fwd_kernel", "_gn_silu_fwd_fused_kernel", "_gn_silu_bwd_kernel", "_gn_param_grad_kernel",
              "_gn_stats_kernel", "_gn_silu_apply_kernel", "_attn_fwd_kernel", "_attn_bwd_preprocess_kernel",
              "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"},
    "sample": {"_posterior_step_kernel", "_ddim_step_kernel", "_gn_silu_fwd_fused_kernel", "_gn_stats_kernel",
               "_gn_silu_apply_kernel", "_attn_fwd_kernel"},
    "q_sample": {"_q_sample_fwd_kernel", "_q_sample_bwd_kernel"},
    "posterior_step": {"_posterior_step_kernel", "_ddim_step_kernel"},
    "group_norm_silu": {"_gn_silu_fwd_fused_kernel", "_gn_stats_kernel", "_gn_silu_apply_kernel", "_gn_silu_bwd_kernel",
                        "_gn_param_grad_kernel"},
    "attention": {"_attn_fwd_kernel", "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"},
}  # fmt: skip


@pytest.mark.parametrize("cap", CAPS)
def test_every_scenario_and_precision_compiled_what_it_launches(reports, cap):
    """The real launches reached the compiler: each scenario's kernels, in each precision (the
    training step's split GroupNorm comes from batch 4, the sampling step's from batch 1)."""
    for scenario, names in EXPECTED.items():
        for precision in ("float32", "float16", "bfloat16"):
            compiled = {
                k["name"] for k in reports[cap]["kernels"] if k["scenario"] == scenario and k["dtype"] == precision
            }
            assert compiled == names, (scenario, precision, names ^ compiled)


def test_half_attention_runs_on_tensor_cores_and_hopper_uses_wgmma(reports):
    """float16/bfloat16 dots on the tensor cores: mma on sm_80; wgmma on sm_90 at the U-Net's
    token-major layout (the forward, whose tiles of 64-128 queries are what wgmma takes)."""
    for cap, unit in ((80, "mma"), (90, "wgmma")):
        fwd = [k for k in reports[cap]["kernels"] if k["name"] == "_attn_fwd_kernel" and k["scenario"] == "train"
               and k["dtype"] in ("float16", "bfloat16")]  # fmt: skip
        assert fwd and all(k["mma"] == unit for k in fwd), [(k["config"], k["mma"]) for k in fwd]
        assert all(k["num_stages"] >= 2 and k["config"]["BLOCK_M"] >= 64 for k in fwd), [k["config"] for k in fwd]
