"""Run by tests/test_train.py in two processes (torch.multiprocessing.spawn): a few DDP steps."""

import os

import torch
import torch.distributed as dist
from torch.utils.data import Subset

from ddpm_fast import DDPM, UNet, UNetConfig
from ddpm_fast.data import digits_dataset
from ddpm_fast.train import TrainConfig, Trainer


def run(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # the same initial weights on every rank
        cfg = UNetConfig(in_channels=1, image_size=8, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                         num_groups=4, dropout=0.0)  # fmt: skip
        ddpm = DDPM(UNet(cfg), image_size=8, channels=1, timesteps=20)
        config = TrainConfig(out_dir=out, epochs=1, batch_size=8, warmup=1, sample_every=0, max_steps=3,
                             progress=False, lr=1e-3)  # fmt: skip
        trainer = Trainer(ddpm, Subset(digits_dataset(8), range(64)), config, "cpu")
        seen = [int(i) for i in trainer.sampler]
        trainer.train()
        torch.save({"state": ddpm.state_dict(), "indices": seen, "losses": trainer.losses},
                   os.path.join(out, f"rank{rank}.pt"))  # fmt: skip
    finally:
        dist.destroy_process_group()


def fid(rank: int, world: int, port: int, a: str, b: str, out: str) -> None:
    """metrics.fid over `world` gloo processes with a small stand-in feature net (no Inception
    weights offline): each rank's value, saved for the test to compare with one process's."""
    from ddpm_fast import metrics

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    made, real = [], metrics.frechet_metric
    metrics.frechet_metric = lambda *args: made.append(real(*args)) or made[-1]
    try:
        value = metrics.fid(a, b, feature=stand_in_feature(), batch_size=3)
        local = int(made[0].real_features_num_samples)  # this rank's own images (compute() unsyncs after)
        torch.save({"fid": value, "real_images": local}, os.path.join(out, f"fid{rank}.pt"))
    finally:
        dist.destroy_process_group()


def stand_in_feature() -> torch.nn.Module:
    """A fixed random projection of uint8 images to 8 features (the FID metric's `feature`)."""

    class Feature(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(3 * 8 * 8, 8)
            torch.nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(0))
            torch.nn.init.zeros_(self.proj.bias)
            self.num_features = 8

        def forward(self, x):
            return self.proj(x.float().flatten(1) / 255)

    return Feature()
