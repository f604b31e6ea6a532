"""Training: one optimisation step (NVTX-named), and the Trainer that runs the paper's recipe.

Trainer: Adam (lr 2e-4, linear warmup; torch's fused Adam on CUDA), gradient clipping at 1.0,
an EMA of the weights (buffers included, `ema.EMA`), bf16/fp16 autocast (a GradScaler for
fp16), sample grids from the EMA weights every N epochs, a tqdm bar with the loss and images/s,
a CSV loss log and a loss-curve PNG (`losslog.LossLog`). No step waits for the GPU: the losses
stay on the device and are read every `log_every` steps in one transfer, the EMA keeps its count
on the host. Checkpoints (`checkpoint`) hold the model, EMA, optimizer, scheduler, scaler, the
position in the epoch and every RNG state, are written to a temporary file and renamed, and
resume a run so that it goes on exactly as if never stopped. SIGINT and SIGTERM stop it at the
next step boundary with a save (`runs.StopSignals`); a non-finite loss stops it without one.
Under torchrun it trains with DistributedDataParallel: each rank reads its own shard; only
rank 0 writes (a signal should reach every rank, as torchrun forwards it).
"""

import contextlib
import csv
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision.utils import make_grid, save_image
from tqdm.auto import tqdm

from ddpm_fast import checkpoint
from ddpm_fast.checkpoint import CheckpointError, load_checkpoint, load_weights, save_checkpoint
from ddpm_fast.diffusion import DDPM
from ddpm_fast.ema import EMA, ema_model_state
from ddpm_fast.losslog import DIVERGED_FACTOR, LOG_HEADER, DivergedError, LossLog, NonFiniteLossError
from ddpm_fast.profiling import nvtx_range
from ddpm_fast.runs import StopSampling, StopSignals, TrainingInterrupted

# The names of the modules the Trainer was split into stay importable from here.
__all__ = [
    "AMP_DTYPES", "CheckpointError", "DIVERGED_FACTOR", "DivergedError", "EMA", "LOG_HEADER", "NonFiniteLossError",
    "TrainConfig", "Trainer", "TrainingInterrupted", "ema_model_state", "load_checkpoint", "load_weights",
    "save_checkpoint", "train_step", "viewable",
]  # fmt: skip

AMP_DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def train_step(
    ddpm: torch.nn.Module,
    x0: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    grad_clip: float | None = 1.0,
    scaler: torch.amp.GradScaler | None = None,
    autocast_dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
    grad_accum: int = 1,
) -> torch.Tensor:
    """Loss (NVTX ranges forward, loss), backward, gradient clipping and the optimiser step.
    `ddpm` is a DDPM or a DistributedDataParallel around one (its forward is the loss).
    With grad_accum = N, x0 is cut into N micro-batches whose gradients add up before the one
    optimiser step: t and the noise are drawn for the whole of x0 first, so the step equals one
    on the whole batch (up to float rounding; dropout masks aside). Returns the loss, detached
    and left on the device (no host sync)."""
    optimizer.zero_grad(set_to_none=True)
    if grad_accum == 1:
        parts = [(x0, {"generator": generator})]
    else:
        if x0.shape[0] % grad_accum:
            raise ValueError(f"the batch of {x0.shape[0]} images does not split into grad_accum={grad_accum} parts")
        core = ddpm.module if isinstance(ddpm, torch.nn.parallel.DistributedDataParallel) else ddpm
        t = torch.randint(0, core.num_timesteps, (x0.shape[0],), device=x0.device, generator=generator)
        noise = torch.empty_like(x0).normal_(generator=generator)
        parts = [(x, {"t": tc, "noise": nc, "check_t": False})
                 for x, tc, nc in zip(x0.chunk(grad_accum), t.chunk(grad_accum), noise.chunk(grad_accum))]  # fmt: skip
    total = None
    for i, (x, kwargs) in enumerate(parts):
        last = i == len(parts) - 1
        sync = ddpm.no_sync() if not last and isinstance(ddpm, torch.nn.parallel.DistributedDataParallel) else None
        with sync or contextlib.nullcontext():
            with torch.autocast(x0.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss = ddpm(x, **kwargs) / len(parts)
            with nvtx_range("backward"):
                (scaler.scale(loss) if scaler is not None else loss).backward()
        total = loss.detach() if total is None else total + loss.detach()
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
    return total


@dataclass
class TrainConfig:
    out_dir: str = "runs/train"
    epochs: int = 10
    batch_size: int = 128  # per process; the global batch is batch_size x world size
    lr: float = 2e-4
    warmup: int = 5000  # steps of linear learning-rate warmup
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    ema_warmup: bool = False  # diffusers' use_ema_warmup: decay min(ema_decay, 1 - (1 + step) ^ -ema_power)
    ema_power: float = 2 / 3
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
    grad_accum: int = 1  # micro-batches of batch_size per optimiser step
    save_every: int = 0  # steps between checkpoints kept as checkpoints/step_NNNNNNN.pt (0: epoch ends only)
    keep: int = 0  # how many of those to keep, the newest (0: all)
    tensorboard: bool | None = None  # scalars and grids under OUT/tb; None: when tensorboard is installed
    fid_every: int = 0  # epochs between FIDs of the EMA weights (0: never)
    fid_samples: int = 10_000  # generated (and real) images per FID

    def __post_init__(self):
        if self.amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {tuple(AMP_DTYPES)}, got {self.amp!r}")
        for name in ("epochs", "batch_size", "num_samples", "sample_steps", "log_every", "grad_accum", "fid_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("warmup", "sample_every", "num_workers", "save_every", "keep", "fid_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be positive or None, got {self.grad_clip}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be positive or None, got {self.max_steps}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not (math.isfinite(self.ema_power) and self.ema_power > 0):
            raise ValueError(f"ema_power must be a positive number, got {self.ema_power}")


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


VIEW_SIZE = 32  # sample grids show smaller images enlarged to about this many pixels


def viewable(images: torch.Tensor) -> torch.Tensor:
    """Images (N, C, H, W) for a grid to look at: enlarged by a whole factor (nearest, each pixel
    a square) where smaller than VIEW_SIZE, as 8x8 digits are."""
    scale = max(1, VIEW_SIZE // max(images.shape[-2:]))
    return torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest") if scale > 1 else images


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Trainer:
    """Trains `ddpm` on `dataset` as `config` says; `model_config` (a dict) is stored in the
    checkpoints so that `ddpm-fast sample` can rebuild the model."""

    def __init__(self, ddpm: DDPM, dataset: Dataset, config: TrainConfig, device, model_config: dict | None = None,
                 fid_feature: torch.nn.Module | None = None, fid_weights: str | None = None):  # fmt: skip
        self.ddpm, self.dataset, self.config = ddpm, dataset, config
        self.device = torch.device(device)
        self.model_config = model_config or {}
        self.rank, self.world = _distributed()
        self.step_batch = config.batch_size * config.grad_accum  # images per optimiser step and process
        if len(dataset) < self.step_batch * self.world:
            raise ValueError(
                f"the data set has {len(dataset)} images, fewer than one global batch "
                f"({config.batch_size} x {config.grad_accum} accumulated x {self.world} processes)"
            )
        self.fid_feature, self.fid_weights, self._fid_metric = fid_feature, fid_weights, None
        if config.fid_every and fid_feature is None and self.rank == 0:  # before any work, not after an epoch
            from ddpm_fast import metrics

            self.fid_weights = metrics.inception_weights(fid_weights)
        self._writer = None
        ddpm.to(self.device)
        self.memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        if config.channels_last:
            ddpm.to(memory_format=torch.channels_last)
        self.net = ddpm
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(ddpm, device_ids=ids)
        self.ema = EMA(ddpm, config.ema_decay, warmup=config.ema_warmup, power=config.ema_power)
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
        self._saved_step: int | None = None
        self.checkpoint_path = os.path.join(config.out_dir, "checkpoint.pt")
        self.log_path = os.path.join(config.out_dir, "loss.csv")
        self.fid_path = os.path.join(config.out_dir, "fid.csv")
        self.log = LossLog(self.log_path, config.log_every, self.rank, fp16=self.scaler is not None,
                           images_per_step=config.batch_size * self.world, writer=self.writer,
                           last_good=self._last_good)  # fmt: skip
        self.stops = StopSignals(self.checkpoint_path, step=lambda: self.step, announce=self.rank == 0)

    @property
    def steps_per_epoch(self) -> int:
        """Optimiser steps in an epoch of this process's shard."""
        return len(self.sampler) // self.step_batch

    @property
    def losses(self) -> list[tuple[int, float]]:
        """The (step, loss) pairs this Trainer has read so far."""
        return self.log.losses

    @property
    def skipped_steps(self) -> int:
        """Steps fp16's GradScaler skipped for a non-finite loss."""
        return self.log.skipped_steps

    # -- checkpoints (the file format and its checks: ddpm_fast.checkpoint) -----------------

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
            **checkpoint.rng_state(self.generator),
            "config": {"train": asdict(self.config), "model": self.model_config},
        }

    def save(self, keep_copy: bool = False) -> None:
        """checkpoint.pt (and, with keep_copy, the same file as checkpoints/step_NNNNNNN.pt, of
        which the newest `keep` stay), with the loss rows read up to it."""
        self.log.read()
        if self.rank == 0:
            os.makedirs(self.config.out_dir, exist_ok=True)
            self.log.flush()
            save_checkpoint(self.state_dict(), self.checkpoint_path)
            if keep_copy:
                checkpoint.keep_copy(self.checkpoint_path, self.step, self.config.keep)
        self._saved_step = self.step

    def resume(self, path: str | None = None) -> None:
        path = path or self.checkpoint_path
        state = checkpoint.load_training_state(path, map_location=self.device)
        load_weights(self.ddpm, state["model"], path)
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        checkpoint.set_rng_state(state, self.generator)
        self._saved_step = self.step
        self.log.trim(self.step)  # rows written after the checkpoint, before the run stopped

    def _last_good(self) -> str:
        return (f"{self.checkpoint_path} (step {self._saved_step}) is the last good checkpoint"
                if self._saved_step is not None else "no checkpoint had been written yet")  # fmt: skip

    # -- the loop ---------------------------------------------------------------------------

    def train(self) -> list[tuple[int, float]]:
        """Run (or go on with) the training; returns the (step, loss) pairs read so far.

        SIGINT (Ctrl-C) and SIGTERM stop the run at the end of the current step: the state is
        saved and TrainingInterrupted is raised (see runs.StopSignals for a signal during a grid
        or a save, and for a second signal). A non-finite loss raises NonFiniteLossError without
        saving (under fp16 such steps are skipped, as GradScaler does, unless they keep coming)."""
        self.ddpm.train()
        self.ddpm.kernel_path(self.device)  # any fallback warning now, not inside the progress bar
        with self.stops:
            while not self._done() and self.stops.requested is None:
                self._epoch()
                if self.batch_in_epoch >= self.steps_per_epoch:
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                    self._end_of_epoch()
                with self.stops.during("saving"):
                    self.save(keep_copy=bool(self.config.save_every) and self.step % self.config.save_every == 0)
            if self.stops.requested is not None:
                raise TrainingInterrupted(self.stops.requested, self.step, self.checkpoint_path, saved=True)
        if self.rank == 0:
            self.log.plot(os.path.join(self.config.out_dir, "loss.png"))
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        return self.losses

    def _epoch(self) -> None:
        """The steps left in this epoch (to its end, max_steps or a signal)."""
        cfg, per_epoch, amp = self.config, self.steps_per_epoch, AMP_DTYPES[self.config.amp]
        bar = tqdm(self._loader(), desc=f"epoch {self.epoch + 1}/{cfg.epochs}", initial=self.batch_in_epoch,
                   total=per_epoch, disable=not cfg.progress or self.rank != 0)  # fmt: skip
        for x0, _ in bar:
            x0 = x0.to(self.device, non_blocking=True, memory_format=self.memory_format)
            loss = train_step(self.net, x0, self.optimizer, cfg.grad_clip, self.scaler, amp, self.generator,
                              cfg.grad_accum)  # fmt: skip
            lr = self.scheduler.get_last_lr()[0]
            self.scheduler.step()
            self.ema.update(self.ddpm)
            self.step, self.batch_in_epoch = self.step + 1, self.batch_in_epoch + 1
            if self.log.add(self.step, self.epoch, lr, loss):
                self.log.read(bar)
            if cfg.save_every and self.step % cfg.save_every == 0 and self.batch_in_epoch < per_epoch:
                with self.stops.during("saving"):
                    self.save(keep_copy=True)
            if self.stops.requested is not None or self._done():
                break
        self.log.read(bar)
        bar.close()

    def _end_of_epoch(self) -> None:
        """The sample grid and the FID this epoch asks for (a signal abandons them)."""
        cfg = self.config
        with self.stops.during("sampling"), contextlib.suppress(StopSampling):
            if cfg.sample_every and self.epoch % cfg.sample_every == 0 and self.stops.requested is None:
                self.sample_grid()
            if cfg.fid_every and self.epoch % cfg.fid_every == 0 and self.stops.requested is None:
                self.evaluate_fid()

    def _loader(self) -> DataLoader:
        self.sampler.set_epoch(self.epoch)
        sampler = _SkipSampler(self.sampler, self.batch_in_epoch * self.step_batch)
        # A generator of its own: creating the loader's iterator must not draw from the global
        # RNG (dropout's), or a resumed run would drift from an uninterrupted one.
        seeds = torch.Generator().manual_seed(self.config.seed * 100_003 + self.epoch * 101 + self.rank)
        return DataLoader(
            self.dataset, batch_size=self.step_batch, sampler=sampler, drop_last=True,
            num_workers=self.config.num_workers, pin_memory=self.device.type == "cuda", generator=seeds,
        )  # fmt: skip

    def _done(self) -> bool:
        return self.epoch >= self.config.epochs or (
            self.config.max_steps is not None and self.step >= self.config.max_steps
        )

    # -- TensorBoard ------------------------------------------------------------------------

    def writer(self):
        """A torch.utils.tensorboard SummaryWriter on OUT/tb (rank 0, when the tensorboard
        package is installed or config.tensorboard asks for it), else None. A resumed run
        drops the events logged after its checkpoint."""
        if self.rank or self.config.tensorboard is False:
            return None
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                if self.config.tensorboard:
                    raise ImportError(
                        '--tensorboard needs the tensorboard package: pip install "ddpm-fast[tensorboard]"'
                    ) from e
                self.config.tensorboard = False
                return None
            self._writer = SummaryWriter(os.path.join(self.config.out_dir, "tb"), purge_step=self.step + 1)
        return self._writer

    @torch.no_grad()
    def sample_grid(self) -> str | None:
        """A grid of samples from the EMA weights, as the paper's figures: samples/epoch_NNNN.png."""
        if self.rank:
            return None
        cfg = self.config
        generator = torch.Generator(self.device).manual_seed(cfg.seed)  # the same noise every epoch
        images = self._generate(cfg.num_samples, generator, batch=cfg.num_samples)
        path = os.path.join(cfg.out_dir, "samples", f"epoch_{self.epoch:04d}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        nrow = int(math.ceil(math.sqrt(cfg.num_samples)))
        view = viewable((images.float() + 1) / 2)
        save_image(view, path, nrow=nrow, padding=1)
        if (writer := self.writer()) is not None:
            writer.add_image("samples", make_grid(view, nrow=nrow, padding=1).clamp(0, 1), self.step)
        return path

    def _generate(self, n: int, generator: torch.Generator, batch: int = 256) -> torch.Tensor:
        ema: DDPM = self.ema.module
        ema.eval()
        out = []
        for start in range(0, n, batch):
            b = min(batch, n - start)
            if self.config.sample_steps >= ema.num_timesteps:
                out.append(ema.sample(b, generator=generator, progress=False, device=self.device))
            else:
                out.append(ema.ddim_sample(b, steps=self.config.sample_steps, generator=generator, progress=False,
                                           device=self.device))  # fmt: skip
        return torch.cat(out)

    @torch.no_grad()
    def evaluate_fid(self) -> float | None:
        """FID of fid_samples images from the EMA weights (DDIM with sample_steps) against as
        many training images (their features computed once), with torchmetrics (Inception, or
        the fid_feature module given to the Trainer). Appended to OUT/fid.csv and TensorBoard."""
        if self.rank:
            return None
        from ddpm_fast import metrics

        cfg = self.config
        if self._fid_metric is None:
            self._fid_metric = metrics.frechet_metric(self.fid_feature, self.fid_weights, self.device)
            for x in metrics.dataset_batches(self.dataset, 256, cfg.fid_samples):
                self._fid_metric.update(x.to(self.device), real=True)
        self._fid_metric.reset()  # the fake features only (reset_real_features=False)
        generator = torch.Generator(self.device).manual_seed(cfg.seed + 1)
        for images in self._generate(cfg.fid_samples, generator).split(256):
            self._fid_metric.update(metrics.to_uint8(images), real=False)
        value = float(self._fid_metric.compute())
        new = not os.path.isfile(self.fid_path)
        os.makedirs(cfg.out_dir, exist_ok=True)
        with open(self.fid_path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["step", "epoch", "fid", "samples"])
            writer.writerow([self.step, self.epoch, f"{value:.4f}", cfg.fid_samples])
        if (tb := self.writer()) is not None:
            tb.add_scalar("fid", value, self.step)
        tqdm.write(f"epoch {self.epoch}, step {self.step}: FID {value:.2f} ({cfg.fid_samples} samples)")
        return value
