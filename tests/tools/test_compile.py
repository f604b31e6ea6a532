"""Every kernel that real code launches compiles ahead of time for real GPUs (sm_80, sm_90)
within the GPU's shared memory, and none that can run spills: a FastDDPM training step (batch 128 and 4)
and sampling steps (batch 1, 16, 256) of the paper's U-Net in float32, float16 and bfloat16
autocast, NCHW and channels_last, plus each op's own cases and every configuration the attention
autotuner may pick (attention at 256 tokens and at 49, whose last tiles are masked); and what a
small test folder launches (the "tests" scenario). The interpreter and real compilation cannot
share a process, so the report runs in subprocesses with TRITON_INTERPRET unset, one per GPU
generation, side by side. Spilling is judged per launch: a kernel that is not autotuned may keep
at most aot.MINOR_SPILL_B bytes (one or two registers, which some ptxas releases spill in a few
GroupNorm tiles; listed as minor spills); an autotuned attention launch must have a spill-free
configuration, and those of its
configurations that spill under the installed Triton (a list clean under 3.9 is not under 3.8)
are the ones kernels.attention_plan.spill_free drops on the GPU before timing: they never run."""

import json
import os
import subprocess
import sys

import pytest
import torch

from ddpm_fast.tools import aot

CAPS = (80, 90)
pytestmark = pytest.mark.slow  # compiles every launch for two GPUs: minutes


@pytest.fixture(scope="module")
def reports() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {
        cap: subprocess.Popen(
            [sys.executable, "-m", "ddpm_fast.tools.aot", "--cap", str(cap), "--json"],
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
def test_no_kernel_that_runs_spills_or_overflows_shared_memory(reports, cap):
    report = reports[cap]
    assert report["problems"] == []
    for k in report["kernels"]:
        assert k["cap"] == cap and 0 < k["regs"] <= 255, k
        # not autotuned, so nothing prunes it: at most a register or two (aot.MINOR_SPILL_B, listed in the report)
        assert k["tuned"] or k["stack"] + k["local"] <= aot.MINOR_SPILL_B, k
    launches = {k["tuned"] for k in report["kernels"] if k["tuned"]}
    clean = {k["tuned"] for k in report["kernels"] if k["tuned"] and not aot.spills(k)}
    assert launches and launches == clean  # each autotuned launch keeps a configuration that does not spill
    assert report["pruned"] == len(aot.pruned(report["kernels"]))


@pytest.mark.parametrize("cap", CAPS)
def test_channels_last_scenarios_reach_the_nhwc_kernels(reports, cap):
    """The channels_last train and sample scenarios launch the GroupNorm kernels on NHWC tensors, as
    `--channels-last` does: several groups per program (GB > 1) exist only for NHWC inputs."""
    for scenario in ("train", "sample"):
        for precision in ("float32", "float16", "bfloat16"):
            gb = {k["config"].get("GB", 1) for k in reports[cap]["kernels"] if k["scenario"] == scenario
                  and k["dtype"] == precision and k["name"].startswith("_gn_")}  # fmt: skip
            assert max(gb) > 1, (scenario, precision, gb)


def test_shape_only_convolutions_return_what_cudnn_returns():
    """The shape-only mode computes convolutions on the meta device, whose kernels return NCHW for
    channels_last inputs; it hands on channels_last outputs and gradients, as cuDNN does."""
    channels_last = torch.channels_last
    conv = torch.nn.Conv2d(32, 32, 3, padding=1).to(memory_format=channels_last)
    x = torch.randn(4, 32, 16, 16).contiguous(memory_format=channels_last).requires_grad_()
    with aot._shape_only_mode():
        y = conv(x)
        y.backward(torch.ones_like(y))
    assert y.is_contiguous(memory_format=channels_last) and not y.is_contiguous()
    assert x.grad.is_contiguous(memory_format=channels_last) and not x.grad.is_contiguous()
    assert conv.weight.grad.is_contiguous(memory_format=channels_last)


EXPECTED = {  # the U-Net's GroupNorms all run one kernel (no split path) at every batch
    "train": {"_q_sample_fwd_kernel", "_gn_silu_fwd_fused_kernel", "_gn_silu_bwd_kernel", "_gn_param_grad_kernel",
              "_attn_fwd_kernel", "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"},
    "sample": {"_posterior_step_kernel", "_ddim_step_kernel", "_dpm_solver_step_kernel", "_gn_silu_fwd_fused_kernel",
               "_attn_fwd_kernel"},
    "q_sample": {"_q_sample_fwd_kernel", "_q_sample_bwd_kernel"},
    "posterior_step": {"_posterior_step_kernel", "_ddim_step_kernel", "_dpm_solver_step_kernel"},
    "group_norm_silu": {"_gn_silu_fwd_fused_kernel", "_gn_stats_kernel", "_gn_silu_apply_kernel", "_gn_silu_bwd_kernel",
                        "_gn_param_grad_kernel"},
    "attention": {"_attn_fwd_kernel", "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"},
}  # fmt: skip


@pytest.mark.parametrize("cap", CAPS)
def test_every_scenario_and_precision_compiled_what_it_launches(reports, cap):
    """The real launches reached the compiler: each scenario's kernels, in each precision (the
    split GroupNorm path from the op scenario's big groups)."""
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


def test_float32_attention_runs_on_tensor_cores_at_every_head_dim(reports):
    """float32 attention multiplies on the tensor cores (3xTF32 with TF32 off, TF32 with it on):
    every configuration compiled, forward and backward, head dims 32 to 256 (the U-Net's 256 in
    the chunked kernels), has mma or wgmma in its PTX; none is left on the FMA units."""
    for cap in CAPS:
        rows = [k for k in reports[cap]["kernels"] if k.get("dtype") == "float32" and "error" not in k
                and k["name"] in ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")]  # fmt: skip
        assert {k["config"]["BLOCK_D"] for k in rows} >= {32, 64, 128, 256}, cap
        assert any(k["config"].get("R_CHUNK") for k in rows), cap  # the chunked kernels were compiled
        fma = [(k["name"], k["config"]) for k in rows if k["mma"] not in ("mma", "wgmma")]
        assert not fma, (cap, fma[:5])


def test_a_test_folders_own_launches_are_recorded_and_compiled(tmp_path):
    """`python -m ddpm_fast.tools.aot --scenarios tests` runs the on_device tests of a folder with each
    fused op recorded on its Triton path, as a CUDA run launches it, then computed by its eager
    twin: the tests go on with correct values (forward and backward), and what they would launch
    on a GPU is compiled. Unmarked tests are not run."""
    (tmp_path / "conftest.py").write_text(
        "def pytest_configure(config):\n    config.addinivalue_line('markers', 'on_device: kernel tests')\n"
    )
    (tmp_path / "test_kernels.py").write_text(
        "import pytest, torch\nfrom ddpm_fast import kernels, reference\npytestmark = pytest.mark.on_device\n\n"
        "def test_attention():\n"
        "    q = torch.randn(1, 1, 49, 32, requires_grad=True)\n"
        "    out = kernels.attention(q, q, q)\n"
        "    torch.testing.assert_close(out, reference.attention(q, q, q))\n"
        "    out.sum().backward()\n"
        "    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0\n"
    )
    (tmp_path / "test_other.py").write_text("def test_not_a_kernel_test():\n    raise AssertionError\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DDPM_FAST_KERNELS")}
    argv = [sys.executable, "-m", "ddpm_fast.tools.aot", "--scenarios", "tests", "--test-dir", str(tmp_path)]
    proc = subprocess.run([*argv, "--cap", "90", "--json"], env=env, capture_output=True, text=True, timeout=900)
    assert proc.stdout, proc.stderr[-3000:]
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report["test_outcomes"] == {"passed": 1}, proc.stderr[-3000:]
    assert report["problems"] == []
    names = {k["name"] for k in report["kernels"] if k["scenario"] == "tests" and k["dtype"] == "float32"}
    assert names == {"_attn_fwd_kernel", "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"}
