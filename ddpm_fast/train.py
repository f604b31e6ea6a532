"""Training: one optimisation step (NVTX-named), and the Trainer that runs the paper's recipe.

Trainer: Adam (lr 2e-4, linear warmup; torch's fused Adam on CUDA), gradient clipping at 1.0,
an EMA of the weights (buffers included), bf16/fp16 autocast (a GradScaler for fp16), sample
grids from the EMA weights every N epochs, a tqdm bar with the loss and images/s, a CSV loss log
and a loss-curve PNG. No step waits for the GPU: the losses stay on the device and are read
every `log_every` steps in one transfer, the EMA keeps its count on the host. Checkpoints hold
the model, EMA, optimizer, scheduler, scaler, the position in the epoch and every RNG state, are written to a
temporary file and renamed, and resume a run so that it goes on exactly as if never
stopped. Under torchrun it trains with DistributedDataParallel: each rank reads its own
shard; only rank 0 writes.
"""

import csv
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision.utils import save_image
from tqdm.auto import tqdm

from ddpm_fast.diffusion import DDPM
from ddpm_fast.profiling import nvtx_range

AMP_DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def train_step(
    ddpm: torch.nn.Module,
    x0: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    grad_clip: float | None = 1.0,
    scaler: torch.amp.GradScaler | None = None,
    autocast_dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Loss (NVTX ranges forward, loss), backward, gradient clipping and the optimiser step.
    `ddpm` is a DDPM or a DistributedDataParallel around one (its forward is the loss).
    Returns the loss, detached and left on the device (no host sync)."""
    with torch.autocast(x0.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss = ddpm(x0, generator=generator)
    with nvtx_range("backward"):
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
        else:
            loss.backward()
    with nvtx_range("optimizer"):
        if scaler is not None:
            scaler.unscale_(optimizer)
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(ddpm.parameters(), grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
    return loss.detach()


@dataclass
class TrainConfig:
    out_dir: str = "runs/train"
    epochs: int = 10
    batch_size: int = 128  # per process; the global batch is batch_size x world size
    lr: float = 2e-4
    warmup: int = 5000  # steps of linear learning-rate warmup
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    amp: str = "no"  # "no", "bf16" or "fp16"
    sample_every: int = 1  # epochs between sample grids (0: never)
    num_samples: int = 64
    sample_steps: int = 100  # DDIM steps for the grids; >= T: all T ancestral steps
    seed: int = 0
    max_steps: int | None = None  # stop after this many optimiser steps in total
    num_workers: int = 0
    progress: bool = True
    log_every: int = 10  # steps between reads of the loss (the only host sync of the loop)
    channels_last: bool = False  # the U-Net and the batches in NHWC (the kernels read it natively)

    def __post_init__(self):
        if self.amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {tuple(AMP_DTYPES)}, got {self.amp!r}")
        for name in ("epochs", "batch_size", "num_samples", "sample_steps", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated or not one of ours."""


def save_checkpoint(state: dict, path: str) -> None:
    """Write to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str, map_location="cpu") -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path!r}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, foreign objects
        raise CheckpointError(f"checkpoint {path!r} is truncated or corrupt: {type(e).__name__}: {e}") from e
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path!r} is not a ddpm-fast checkpoint (no model or config in it)")
    return state


class _SkipSampler(Sampler):
    """The indices of `sampler` after the first `skip`: resuming in the middle of an epoch."""

    def __init__(self, sampler: Sampler, skip: int):
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        for i, index in enumerate(self.sampler):
            if i >= self.skip:
                yield index

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


def ema_model_state(ema_state: dict) -> dict:
    """The EMA weights of a checkpoint as a DDPM state_dict (the EMA's keys carry `module.`)."""
    return {k[len("module.") :]: v for k, v in ema_state.items() if k.startswith("module.")}


class EMA:
    """An exponential moving average of a module's parameters and floating buffers:
    ema = decay * ema + (1 - decay) * current, the first update a copy. One foreach lerp per
    update and the count on the host: no host sync (torch's AveragedModel keeps its count on the
    device and tests it each update). Its state_dict has AveragedModel's layout (`module.` keys
    and `n_averaged`), so checkpoints of either load into the other."""

    def __init__(self, module: torch.nn.Module, decay: float):
        import copy

        self.module = copy.deepcopy(module).requires_grad_(False)
        self.decay = decay
        self.num_updates = 0

    def _tensors(self, module):
        params = list(module.parameters())
        buffers = [b for b in module.buffers() if b.is_floating_point()]
        return params + buffers

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        ema, current = self._tensors(self.module), [t.detach() for t in self._tensors(module)]
        if self.num_updates == 0:
            torch._foreach_copy_(ema, current)
        else:
            torch._foreach_lerp_(ema, current, 1.0 - self.decay)
        self.num_updates += 1

    def state_dict(self) -> dict:
        state = {f"module.{k}": v for k, v in self.module.state_dict().items()}
        state["n_averaged"] = torch.tensor(self.num_updates, dtype=torch.long)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(ema_model_state(state))
        self.num_updates = int(state["n_averaged"])


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Trainer:
    """Trains `ddpm` on `dataset` as `config` says; `model_config` (a dict) is stored in the
    checkpoints so that `ddpm-fast sample` can rebuild the model."""

    def __init__(self, ddpm: DDPM, dataset: Dataset, config: TrainConfig, device, model_config: dict | None = None):
        self.ddpm, self.dataset, self.config = ddpm, dataset, config
        self.device = torch.device(device)
        self.model_config = model_config or {}
        self.rank, self.world = _distributed()
        if len(dataset) < config.batch_size * self.world:
            raise ValueError(
                f"the data set has {len(dataset)} images, fewer than one global batch "
                f"({config.batch_size} x {self.world} processes)"
            )
        ddpm.to(self.device)
        self.memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        if config.channels_last:
            ddpm.to(memory_format=torch.channels_last)
        self.net = ddpm
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(ddpm, device_ids=ids)
        self.ema = EMA(ddpm, config.ema_decay)
        # torch's fused Adam on CUDA: one kernel for all parameters, no host sync (its step count
        # stays on the device, and a GradScaler hands it found_inf without reading it).
        self.optimizer = torch.optim.Adam(ddpm.parameters(), lr=config.lr, fused=self.device.type == "cuda")
        warmup = max(1, config.warmup)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warmup))
        self.scaler = torch.amp.GradScaler(self.device.type) if config.amp == "fp16" else None
        # t and the noise of the loss come from a generator of their own, on the device.
        self.generator = torch.Generator(self.device).manual_seed(config.seed * 1000 + self.rank)
        self.sampler = DistributedSampler(
            dataset, num_replicas=self.world, rank=self.rank, shuffle=True, seed=config.seed, drop_last=True
        )
        self.step = self.epoch = self.batch_in_epoch = 0
        self.losses: list[tuple[int, float]] = []
        self._log_rows: list[list] = []  # loss.csv rows not yet written
        self._pending: list[tuple[int, int, float, torch.Tensor]] = []  # (step, epoch, lr, loss on the device)
        self.checkpoint_path = os.path.join(config.out_dir, "checkpoint.pt")
        self.log_path = os.path.join(config.out_dir, "loss.csv")

    # -- checkpoints ------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "model": self.ddpm.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "rng_train": self.generator.get_state(),
            "config": {"train": asdict(self.config), "model": self.model_config},
        }

    def save(self) -> None:
        self._read_losses()
        if self.rank == 0:
            os.makedirs(self.config.out_dir, exist_ok=True)
            self._flush_log()
            save_checkpoint(self.state_dict(), self.checkpoint_path)

    def resume(self, path: str | None = None) -> None:
        state = load_checkpoint(path or self.checkpoint_path, map_location=self.device)
        self.ddpm.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        torch.set_rng_state(state["rng_cpu"].cpu())
        if torch.cuda.is_available() and state["rng_cuda"]:
            torch.cuda.set_rng_state_all([s.cpu() for s in state["rng_cuda"]])
        self.generator.set_state(state["rng_train"].cpu())
        self._trim_log()

    def _trim_log(self) -> None:
        """Drop log rows past the checkpoint (written after it, before the run stopped)."""
        if self.rank or not os.path.isfile(self.log_path):
            return
        with open(self.log_path, newline="") as f:
            rows = [r for r in csv.reader(f)]
        keep = [rows[0]] + [r for r in rows[1:] if int(r[0]) <= self.step]
        with open(self.log_path, "w", newline="") as f:
            csv.writer(f).writerows(keep)

    # -- the loop ---------------------------------------------------------------------------

    def _loader(self) -> DataLoader:
        self.sampler.set_epoch(self.epoch)
        sampler = _SkipSampler(self.sampler, self.batch_in_epoch * self.config.batch_size)
        # A generator of its own: creating the loader's iterator must not draw from the global
        # RNG (dropout's), or a resumed run would drift from an uninterrupted one.
        seeds = torch.Generator().manual_seed(self.config.seed * 100_003 + self.epoch * 101 + self.rank)
        return DataLoader(
            self.dataset, batch_size=self.config.batch_size, sampler=sampler, drop_last=True,
            num_workers=self.config.num_workers, pin_memory=self.device.type == "cuda", generator=seeds,
        )  # fmt: skip

    def _done(self) -> bool:
        return self.epoch >= self.config.epochs or (
            self.config.max_steps is not None and self.step >= self.config.max_steps
        )

    def train(self) -> list[tuple[int, float]]:
        """Run (or go on with) the training; returns the (step, loss) pairs of this call."""
        cfg = self.config
        self.ddpm.train()
        amp = AMP_DTYPES[cfg.amp]
        try:
            while not self._done():
                per_epoch = len(self.sampler) // cfg.batch_size
                bar = tqdm(self._loader(), desc=f"epoch {self.epoch + 1}/{cfg.epochs}", initial=self.batch_in_epoch,
                           total=per_epoch, disable=not cfg.progress or self.rank != 0)  # fmt: skip
                for x0, _ in bar:
                    x0 = x0.to(self.device, non_blocking=True, memory_format=self.memory_format)
                    loss = train_step(self.net, x0, self.optimizer, cfg.grad_clip, self.scaler, amp, self.generator)
                    lr = self.scheduler.get_last_lr()[0]
                    self.scheduler.step()
                    self.ema.update(self.ddpm)
                    self.step += 1
                    self.batch_in_epoch += 1
                    self._pending.append((self.step, self.epoch, lr, loss))
                    if len(self._pending) >= cfg.log_every:
                        self._read_losses(bar)
                    if cfg.max_steps is not None and self.step >= cfg.max_steps:
                        break
                self._read_losses(bar)
                bar.close()
                if self.batch_in_epoch >= per_epoch:
                    self.epoch += 1
                    self.batch_in_epoch = 0
                    if cfg.sample_every and self.epoch % cfg.sample_every == 0:
                        self.sample_grid()
                self.save()
        except KeyboardInterrupt:
            self.save()
            if self.rank == 0:
                print(f"\ninterrupted: saved {self.checkpoint_path}; --resume goes on from step {self.step}")
            raise
        if self.rank == 0:
            self.plot_losses()
        return self.losses

    def _read_losses(self, bar=None) -> None:
        """Bring the pending losses to the host in one transfer (the loop's one sync every
        log_every steps), keep their rows for loss.csv (written with the checkpoint) and show
        the latest on the bar."""
        if not self._pending:
            return
        values = torch.stack([loss for *_, loss in self._pending]).float().cpu().tolist()
        for (step, epoch, lr, _), value in zip(self._pending, values):
            self.losses.append((step, value))
            if self.rank == 0:
                self._log_rows.append([step, epoch, f"{value:.6f}", f"{lr:.3e}"])
        self._pending.clear()
        if bar is not None:
            rate = bar.format_dict.get("rate") or 0.0
            bar.set_postfix(loss=f"{values[-1]:.4f}", img_s=f"{rate * self.config.batch_size * self.world:.0f}")

    def _flush_log(self) -> None:
        new = not os.path.isfile(self.log_path)
        with open(self.log_path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["step", "epoch", "loss", "lr"])
            writer.writerows(self._log_rows)
        self._log_rows.clear()

    @torch.no_grad()
    def sample_grid(self) -> str | None:
        """A grid of samples from the EMA weights, as the paper's figures: samples/epoch_NNNN.png."""
        if self.rank:
            return None
        cfg = self.config
        ema: DDPM = self.ema.module
        ema.eval()
        generator = torch.Generator(self.device).manual_seed(cfg.seed)  # the same noise every epoch
        if cfg.sample_steps >= ema.num_timesteps:
            images = ema.sample(cfg.num_samples, generator=generator, progress=False, device=self.device)
        else:
            images = ema.ddim_sample(cfg.num_samples, steps=cfg.sample_steps, generator=generator, progress=False,
                                     device=self.device)  # fmt: skip
        path = os.path.join(cfg.out_dir, "samples", f"epoch_{self.epoch:04d}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_image((images.float() + 1) / 2, path, nrow=int(math.ceil(math.sqrt(cfg.num_samples))), padding=1)
        return path

    def plot_losses(self) -> str | None:
        """loss.png from loss.csv: every step and a running mean."""
        if not os.path.isfile(self.log_path):
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        with open(self.log_path, newline="") as f:
            rows = list(csv.DictReader(f))
        steps = [int(r["step"]) for r in rows]
        losses = [float(r["loss"]) for r in rows]
        window = max(1, len(losses) // 50)
        smooth = [sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
                  for i in range(len(losses))]  # fmt: skip
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        ax.plot(steps, losses, lw=0.5, alpha=0.4, label="loss")
        ax.plot(steps, smooth, lw=1.5, label=f"mean of {window}")
        ax.set_xlabel("step")
        ax.set_ylabel("L_simple")
        ax.set_yscale("log")
        ax.legend()
        fig.tight_layout()
        path = os.path.join(self.config.out_dir, "loss.png")
        fig.savefig(path)
        plt.close(fig)
        return path
