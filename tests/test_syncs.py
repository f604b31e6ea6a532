"""No host syncs on the hot path. A sync is the CPU waiting for a device value: counted here as
PyTorch's dispatcher sees it (aten._local_scalar_dense: .item(), int(t), bool(t); and copies of
device tensors to the CPU), on the CPU, where the same code runs as on a GPU."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ddpm_fast import DDPM, FastDDPM, UNet, UNetConfig, kernels
from ddpm_fast.ema import EMA
from ddpm_fast.schedule import POSTERIOR_STEP_BUFFERS, make_betas, schedule_buffers
from ddpm_fast.train import train_step

pytestmark = pytest.mark.on_device  # tensors on the tests' device (conftest.py)

TINY = UNetConfig(in_channels=3, image_size=8, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                  num_groups=4, dropout=0.1)  # fmt: skip


class Syncs(TorchDispatchMode):
    """Counts host reads of tensor values; `host` holds tensors that live on the CPU even beside
    GPU parameters (Adam's step counts), whose reads are no sync."""

    def __init__(self, host=()):
        super().__init__()
        self.count = 0
        self.host = {id(t) for t in host}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        if name in ("_local_scalar_dense", "item"):
            self.count += id(args[0]) not in self.host
        elif name in ("_to_copy", "copy_") and args and isinstance(args[0], torch.Tensor):
            src = args[1] if name == "copy_" else args[0]
            dst_cpu = (
                (args[0].device.type == "cpu") if name == "copy_" else kwargs.get("device", src.device).type == "cpu"
            )
            if src.device.type != "cpu" and dst_cpu:
                self.count += 1
        return func(*args, **kwargs)


def count(fn, host=()) -> int:
    with Syncs(host) as mode:
        fn()
    return mode.count


@pytest.fixture(params=["eager", "fused"])
def ddpm(request, monkeypatch):
    monkeypatch.setenv("DDPM_FAST_KERNELS", "triton" if request.param == "fused" else "eager")
    cls = FastDDPM if request.param == "fused" else DDPM
    return cls(UNet(TINY), image_size=8, channels=3, timesteps=3)


def test_the_counter_counts():
    t = torch.tensor([1, 2])
    assert count(lambda: t.max().item()) == 1 and count(lambda: bool((t > 0).all())) == 1 and count(lambda: t + 1) == 0


@pytest.mark.slow
def test_sampling_loops_never_sync(ddpm):
    ddpm.eval()
    assert count(lambda: ddpm.sample(2, progress=False)) == 0  # 3 steps
    assert count(lambda: ddpm.ddim_sample(2, steps=2, progress=False)) == 0
    assert count(lambda: ddpm.ddim_sample(2, steps=2, eta=1.0, progress=False)) == 0
    assert count(lambda: ddpm.sample(2, progress=False, noise_source="philox")) == 0
    assert count(lambda: ddpm.dpm_solver_sample(2, steps=2, progress=False)) == 0


def test_the_loss_syncs_only_to_check_a_given_t(ddpm):
    x0 = torch.randn(2, 3, 8, 8)
    assert count(lambda: ddpm.loss(x0)) == 0  # t drawn inside: nothing to check
    assert count(lambda: ddpm.loss(x0, t=torch.tensor([1, 2]))) == 1  # one aminmax check of the user's t
    assert count(lambda: ddpm.p_sample(x0, torch.tensor([1, 2]))) == 1


@pytest.mark.slow
def test_a_training_step_never_syncs(ddpm):
    """Forward, loss, backward, gradient clipping, Adam and the EMA update."""
    ema = EMA(ddpm, 0.99)
    opt = torch.optim.Adam(ddpm.parameters(), lr=1e-3)
    x0 = torch.randn(4, 3, 8, 8)

    def step():
        train_step(ddpm, x0, opt, grad_clip=1.0)
        ema.update(ddpm)

    step()  # the first Adam step and EMA copy set up their state
    steps = [state["step"] for state in opt.state.values()]
    assert all(s.device.type == "cpu" for s in steps)  # where torch keeps them for GPU parameters too
    assert count(step, host=steps) == 0


def test_public_ops_check_t_with_one_sync_and_none_when_asked_not_to(monkeypatch):
    monkeypatch.setenv("DDPM_FAST_KERNELS", "triton")
    b = schedule_buffers(make_betas("linear", 10))
    x, t = torch.randn(2, 3, 4, 4), torch.tensor([1, 5])
    coefs = (b["sqrt_alphas_cumprod"], b["sqrt_one_minus_alphas_cumprod"])
    step = [b[n] for n in POSTERIOR_STEP_BUFFERS]
    assert count(lambda: kernels.q_sample(x, t, x, *coefs)) == 1
    assert count(lambda: kernels.q_sample(x, t, x, *coefs, check_t=False)) == 0
    assert count(lambda: kernels.posterior_step(x, x, t, x, *step)) == 1
    assert count(lambda: kernels.ddim_step(x, x, t, t - 1, None, b["alphas_cumprod"])) == 1
    assert count(lambda: kernels.ddim_step(x, x, t, t - 1, None, b["alphas_cumprod"], check_t=False)) == 0


@pytest.mark.on_cpu  # the trainer's bookkeeping: its data loader lives on the CPU
def test_the_trainer_reads_the_loss_every_n_steps(tmp_path, monkeypatch):
    from torch.utils.data import TensorDataset

    from ddpm_fast.train import TrainConfig, Trainer

    monkeypatch.setenv("DDPM_FAST_KERNELS", "eager")
    data = TensorDataset(torch.randn(32, 3, 8, 8), torch.zeros(32))
    cfg = TrainConfig(out_dir=str(tmp_path), epochs=1, batch_size=4, sample_every=0, progress=False, log_every=4,
                      warmup=2)  # fmt: skip
    trainer = Trainer(DDPM(UNet(TINY), image_size=8, timesteps=3), data, cfg, "cpu")
    reads = []
    real = trainer.log.read
    monkeypatch.setattr(trainer.log, "read", lambda bar=None: reads.append(len(trainer.log.pending)) or real(bar))
    losses = trainer.train()
    assert [s for s, _ in losses] == list(range(1, 9))
    assert [n for n in reads if n] == [4, 4]  # two reads of four losses each over the epoch's 8 steps
