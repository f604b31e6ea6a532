"""Where the tests run: one switch, DDPM_FAST_TEST_DEVICE.

  auto (default)  cuda when torch sees a CUDA device, else cpu
  cuda            the kernel tests build their tensors on the GPU and launch the compiled
                  Triton kernels (TRITON_INTERPRET must be unset), compared with the float64
                  eager twin under the same tolerance tables and cases as on a CPU
  cpu             Triton's interpreter runs the kernels on CPU tensors (TRITON_INTERPRET=1 is
                  set here, before triton is imported, as the interpreter requires)

Test modules that check kernels carry `pytestmark = pytest.mark.on_device`: each of their tests
runs inside `torch.device(DEVICE)`, so tensors they create land there. The rest (data, runs,
the trainer's bookkeeping) runs on the CPU, where its subject lives.
"""

import os

import torch  # importing torch does not import triton

_CHOICES = ("auto", "cpu", "cuda")
_choice = os.environ.get("DDPM_FAST_TEST_DEVICE", "auto").strip().lower() or "auto"
if _choice not in _CHOICES:
    raise SystemExit(f"DDPM_FAST_TEST_DEVICE must be one of {_CHOICES}, got {_choice!r}")
if _choice == "cuda" and not torch.cuda.is_available():
    raise SystemExit("DDPM_FAST_TEST_DEVICE=cuda but torch sees no CUDA device")
_device = "cuda" if _choice == "cuda" or (_choice == "auto" and torch.cuda.is_available()) else "cpu"
if _device == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
elif os.environ.get("TRITON_INTERPRET", "0") == "1":
    raise SystemExit("TRITON_INTERPRET=1 with DDPM_FAST_TEST_DEVICE=cuda: the GPU tests run compiled kernels; "
                     "unset it, or pick DDPM_FAST_TEST_DEVICE=cpu")  # fmt: skip
os.environ["DDPM_FAST_TEST_DEVICE"] = _device  # what tests/helpers.py reads (xdist workers inherit it)
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    # One CPU thread per xdist worker (and per process a test starts: OMP_NUM_THREADS), not torch's
    # default of one per core in every worker: oversubscribed OpenMP threads made the eager
    # training tests several times slower than alone.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
if _device == "cuda":
    # The tests hold kernels to float32 tolerances; TF32 convs and matmuls would blur both sides.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

import pytest  # noqa: E402

if _device == "cpu":
    from ddpm_fast.kernels._common import fix_old_interpreter, speed_up_interpreter  # noqa: E402  (imports triton)

    fix_old_interpreter()  # Triton 3.6's interpreter under NumPy >= 2.4
    speed_up_interpreter()  # no re-patching of triton.language at each helper call


def pytest_configure(config):
    config.addinivalue_line("markers", "on_device: every test of the module runs inside torch.device(DEVICE)")
    config.addinivalue_line("markers", "on_cpu: this test runs on the CPU even in an on_device module")
    config.addinivalue_line("markers", "gpu_plans: the kernels plan launches as for a GPU, not for the interpreter")
    config.addinivalue_line("markers", "slow: 15 s or more on a 2-core CPU; `pytest -m 'not slow'` leaves them out")


def pytest_report_header(config):
    interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
    where = torch.cuda.get_device_name() if _device == "cuda" else "CPU"
    return f"ddpm-fast kernel tests on {_device} ({where}), " + (
        "Triton interpreter" if interp else "compiled Triton kernels"
    )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _plans(request):
    """Under the interpreter the kernels plan for its one core (fewest programs); a test marked
    gpu_plans gets the grids and tiles a GPU runs (ddpm_fast.kernels._common.gpu_plans)."""
    if request.node.get_closest_marker("gpu_plans") is None or _device != "cpu":
        yield
        return
    from ddpm_fast.kernels._common import gpu_plans

    with gpu_plans():
        yield


@pytest.fixture(autouse=True)
def _on_device(request):
    if request.node.get_closest_marker("on_device") is None or request.node.get_closest_marker("on_cpu"):
        yield
        return
    with torch.device(_device):  # entered on a CPU too, so the CPU run exercises the same mode
        yield
