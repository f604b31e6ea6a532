"""Training: one optimisation step (NVTX-named), and the Trainer that runs the paper's recipe.

Trainer: Adam (lr 2e-4, linear warmup; torch's fused Adam on CUDA), gradient clipping at 1.0,
an EMA of the weights (buffers included), bf16/fp16 autocast (a GradScaler for fp16), sample
grids from the EMA weights every N epochs, a tqdm bar with the loss and images/s, a CSV loss log
and a loss-curve PNG. No step waits for the GPU: the losses stay on the device and are read
every `log_every` steps in one transfer, the EMA keeps its count on the host. Checkpoints hold
the model, EMA, optimizer, scheduler, scaler, the position in the epoch and every RNG state, are written to a
temporary file and renamed, and resume a run so that it goes on exactly as if never
stopped. SIGINT and SIGTERM stop it at the next step boundary with a save; a non-finite loss
stops it without one. Under torchrun it trains with DistributedDataParallel: each rank reads
its own shard; only rank 0 writes (a signal should reach every rank, as torchrun forwards it).
"""

import contextlib
import csv
import math
import os
import shutil
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision.utils import make_grid, save_image
from tqdm.auto import tqdm

from ddpm_fast import runs
from ddpm_fast.diffusion import DDPM
from ddpm_fast.profiling import nvtx_range

AMP_DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
LOG_HEADER = ["step", "epoch", "loss", "lr"]  # loss.csv
# A loss this many times its running mean is a diverged run (L_simple's healthy spikes are a few x)
DIVERGED_FACTOR = 1000.0
FP16_NON_FINITE_PATIENCE = 10  # non-finite losses in a row that fp16 training skips before it stops


class _StopSampling(BaseException):
    """Raised by the signal handler to abandon a sample grid."""


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


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated or not one of ours."""


class NonFiniteLossError(RuntimeError):
    """The loss became nan or inf; the run stopped without saving, so the last checkpoint is
    the last good state."""


class DivergedError(NonFiniteLossError):
    """The loss, finite, jumped far above its running mean (gradient clipping keeps a diverged
    run's loss finite: --lr 1e9 gave 4e22); stopped without saving, as for a non-finite loss."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGINT or SIGTERM. `saved`: whether the state at the step boundary
    was written to `path` (a second signal before the save began stops without saving).
    `exit_code` is the shell's convention, 128 + the signal number."""

    def __init__(self, signum: int, step: int, path: str, saved: bool):
        self.signum, self.step, self.path, self.saved = signum, step, path, saved
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        what = f"saved {path} at step {step}" if saved else f"stopped without saving; {path} is the last checkpoint"
        super().__init__(f"{name}: {what}")


def save_checkpoint(state: dict, path: str) -> None:
    """Write to a temporary file in the same folder, then rename: a crash never leaves half a
    file, and a save that fails or is interrupted removes its temporary file (one killed outright
    leaves it to the next run's `runs.remove_stale_tmp`). A save that fails (a full disk, a folder
    gone read-only) raises CheckpointError saying that the checkpoint already there is intact."""
    try:
        runs.write_atomically(path, lambda tmp: torch.save(state, tmp))
    except Exception as e:  # torch.save reports a full disk as a RuntimeError ("file write failed")
        kept = f"the checkpoint already at {path!r} is intact" if os.path.isfile(path) else "none was there before"
        raise CheckpointError(f"could not write the checkpoint {path!r} ({type(e).__name__}: {e}); {kept}. "
                              "Free disk space (or fix the folder) and go on with --resume") from e  # fmt: skip


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


VIEW_SIZE = 32  # sample grids show smaller images enlarged to about this many pixels


def viewable(images: torch.Tensor) -> torch.Tensor:
    """Images (N, C, H, W) for a grid to look at: enlarged by a whole factor (nearest, each pixel
    a square) where smaller than VIEW_SIZE, as 8x8 digits are."""
    scale = max(1, VIEW_SIZE // max(images.shape[-2:]))
    return torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest") if scale > 1 else images


def load_weights(module: torch.nn.Module, weights: dict, path: str) -> None:
    """module.load_state_dict(weights), or a CheckpointError naming `path` where the weights are
    another model's (a size mismatch, missing or unexpected keys) instead of torch's traceback."""
    try:
        module.load_state_dict(weights)
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        raise CheckpointError(f"{path!r} holds the weights of another model than this one: {detail[:400]}") from None


def ema_model_state(ema_state: dict) -> dict:
    """The EMA weights of a checkpoint as a DDPM state_dict (the EMA's keys carry `module.`)."""
    return {k[len("module.") :]: v for k, v in ema_state.items() if k.startswith("module.")}


class EMA:
    """An exponential moving average of a module's parameters and floating buffers:
    ema = decay * ema + (1 - decay) * current, the first update a copy. One foreach lerp per
    update and the count on the host: no host sync (torch's AveragedModel keeps its count on the
    device and tests it each update). Its state_dict has AveragedModel's layout (`module.` keys
    and `n_averaged`), so checkpoints of either load into the other.

    warmup=True: the decay of update k (k = 0, 1, ...) is min(decay, 1 - (1 + k / inv_gamma) ^
    -power), as diffusers' EMAModel(use_ema_warmup=True) gives it (inv_gamma 1, power 2/3 by
    default; 3/4 suits shorter runs): the average follows the weights closely early, so a short
    run's EMA samples are not those of its first, random weights."""

    def __init__(self, module: torch.nn.Module, decay: float, warmup: bool = False, inv_gamma: float = 1.0,
                 power: float = 2 / 3):  # fmt: skip
        import copy

        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay!r}")
        if not (inv_gamma > 0 and power > 0):
            raise ValueError(f"inv_gamma and power must be positive, got {inv_gamma!r} and {power!r}")
        self.module = copy.deepcopy(module).requires_grad_(False)
        self.decay, self.warmup, self.inv_gamma, self.power = decay, bool(warmup), float(inv_gamma), float(power)
        self.num_updates = 0

    def current_decay(self) -> float:
        """The decay the next update uses (0 for the first: a copy)."""
        k = self.num_updates
        if k == 0:
            return 0.0
        if not self.warmup:
            return self.decay
        return min(self.decay, 1.0 - (1.0 + k / self.inv_gamma) ** -self.power)

    def _tensors(self, module):
        params = list(module.parameters())
        buffers = [b for b in module.buffers() if b.is_floating_point()]
        return params + buffers

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        ema, current = self._tensors(self.module), [t.detach() for t in self._tensors(module)]
        decay = self.current_decay()
        if decay == 0.0:
            torch._foreach_copy_(ema, current)
        else:
            torch._foreach_lerp_(ema, current, 1.0 - decay)
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
        self.losses: list[tuple[int, float]] = []
        self._log_rows: list[list] = []  # loss.csv rows not yet written
        self._pending: list[tuple[int, int, float, torch.Tensor]] = []  # (step, epoch, lr, loss on the device)
        self._stop: int | None = None  # the signal that asked the loop to stop
        self._phase = "training"
        self._saved_step: int | None = None
        self.skipped_steps = self._non_finite_run = 0
        self._loss_mean: float | None = None  # running mean of the finite losses (divergence)
        self.checkpoint_path = os.path.join(config.out_dir, "checkpoint.pt")
        self.log_path = os.path.join(config.out_dir, "loss.csv")
        self.fid_path = os.path.join(config.out_dir, "fid.csv")

    @property
    def steps_per_epoch(self) -> int:
        """Optimiser steps in an epoch of this process's shard."""
        return len(self.sampler) // self.step_batch

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

    def save(self, keep_copy: bool = False) -> None:
        """checkpoint.pt (and, with keep_copy, the same file as checkpoints/step_NNNNNNN.pt, of
        which the newest `keep` stay)."""
        self._read_losses()
        if self.rank == 0:
            os.makedirs(self.config.out_dir, exist_ok=True)
            self._flush_log()
            save_checkpoint(self.state_dict(), self.checkpoint_path)
            if keep_copy:
                self._keep_copy()
        self._saved_step = self.step

    def _keep_copy(self) -> None:
        folder = os.path.join(self.config.out_dir, "checkpoints")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"step_{self.step:07d}.pt")

        def link_or_copy(tmp):
            try:  # the same bytes, no second write (checkpoint.pt is replaced, not changed)
                os.link(self.checkpoint_path, tmp)
            except OSError:
                shutil.copyfile(self.checkpoint_path, tmp)

        runs.write_atomically(path, link_or_copy)
        if self.config.keep:
            kept = sorted(f for f in os.listdir(folder) if f.startswith("step_") and f.endswith(".pt"))
            for old in kept[: -self.config.keep]:
                os.remove(os.path.join(folder, old))

    def resume(self, path: str | None = None) -> None:
        path = path or self.checkpoint_path
        state = load_checkpoint(path, map_location=self.device)
        if "ema" not in state or "optimizer" not in state:
            raise CheckpointError(f"{path!r} holds weights only (no EMA or optimizer state): it cannot be resumed")
        load_weights(self.ddpm, state["model"], path)
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
        self._saved_step = self.step
        self._trim_log()

    def _trim_log(self) -> None:
        """Drop log rows past the checkpoint (written after it, before the run stopped)."""
        if self.rank or not os.path.isfile(self.log_path):
            return
        with open(self.log_path, newline="") as f:
            rows = [r for r in csv.reader(f) if r]  # blank lines (an editor's) carry nothing
        body = rows[1:] if rows and rows[0] == LOG_HEADER else rows

        def logged_step(row):  # None for a torn line (a crash mid-write) or a stray header
            return int(row[0]) if len(row) == len(LOG_HEADER) and row[0].strip().isdigit() else None

        keep = [LOG_HEADER] + [r for r in body if (step := logged_step(r)) is not None and step <= self.step]
        with open(self.log_path, "w", newline="") as f:
            csv.writer(f).writerows(keep)

    # -- the loop ---------------------------------------------------------------------------

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

    def train(self) -> list[tuple[int, float]]:
        """Run (or go on with) the training; returns the (step, loss) pairs of this call.

        SIGINT (Ctrl-C) and SIGTERM stop the run at the end of the current step: the state is
        saved and TrainingInterrupted is raised (a signal during a sample grid abandons the
        grid; a second signal before the save begins stops at once without saving, one during
        the save lets it finish). A non-finite loss raises NonFiniteLossError without saving
        (under fp16 such steps are skipped, as GradScaler does, unless they keep coming)."""
        cfg = self.config
        self.ddpm.train()
        amp = AMP_DTYPES[cfg.amp]
        self.ddpm.kernel_path(self.device)  # any fallback warning now, not inside the progress bar
        with self._signals():
            while not self._done() and self._stop is None:
                per_epoch = self.steps_per_epoch
                bar = tqdm(self._loader(), desc=f"epoch {self.epoch + 1}/{cfg.epochs}", initial=self.batch_in_epoch,
                           total=per_epoch, disable=not cfg.progress or self.rank != 0)  # fmt: skip
                for x0, _ in bar:
                    x0 = x0.to(self.device, non_blocking=True, memory_format=self.memory_format)
                    loss = train_step(self.net, x0, self.optimizer, cfg.grad_clip, self.scaler, amp, self.generator,
                                      cfg.grad_accum)  # fmt: skip
                    lr = self.scheduler.get_last_lr()[0]
                    self.scheduler.step()
                    self.ema.update(self.ddpm)
                    self.step += 1
                    self.batch_in_epoch += 1
                    self._pending.append((self.step, self.epoch, lr, loss))
                    if len(self._pending) >= cfg.log_every:
                        self._read_losses(bar)
                    if cfg.save_every and self.step % cfg.save_every == 0 and self.batch_in_epoch < per_epoch:
                        self._phase = "saving"
                        self.save(keep_copy=True)
                        self._phase = "training"
                    if self._stop is not None or (cfg.max_steps is not None and self.step >= cfg.max_steps):
                        break
                self._read_losses(bar)
                bar.close()
                if self.batch_in_epoch >= per_epoch:
                    self.epoch += 1
                    self.batch_in_epoch = 0
                    self._phase = "sampling"
                    try:
                        if cfg.sample_every and self.epoch % cfg.sample_every == 0 and self._stop is None:
                            self.sample_grid()
                        if cfg.fid_every and self.epoch % cfg.fid_every == 0 and self._stop is None:
                            self.evaluate_fid()
                    except _StopSampling:
                        pass
                self._phase = "saving"
                self.save(keep_copy=bool(cfg.save_every) and self.step % cfg.save_every == 0)
                self._phase = "training"
            if self._stop is not None:
                raise TrainingInterrupted(self._stop, self.step, self.checkpoint_path, saved=True)
        if self.rank == 0:
            self.plot_losses()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        return self.losses

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

    # -- stops ------------------------------------------------------------------------------

    @contextmanager
    def _signals(self):
        """SIGINT and SIGTERM set a flag that the loop reads at each step boundary (handlers can
        only be installed from the main thread: elsewhere the defaults stay)."""
        self._stop, self._phase = None, "training"
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in previous:
            signal.signal(s, self._on_signal)
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)

    def _on_signal(self, signum, frame) -> None:
        if self._stop is None:
            self._stop = signum
            if self.rank == 0:
                tqdm.write(f"\n{signal.Signals(signum).name}: stopping at the end of this step and saving "
                           "(a second signal stops at once without saving)", file=sys.stderr)  # fmt: skip
            if self._phase == "sampling":  # a grid is not worth waiting for: drop it, then save
                raise _StopSampling
        elif self._phase != "saving":
            raise TrainingInterrupted(signum, self.step, self.checkpoint_path, saved=False)
        # a signal during the save: the save (atomic) finishes, then the run stops

    def _read_losses(self, bar=None) -> None:
        """Bring the pending losses to the host in one transfer (the loop's one sync every
        log_every steps), keep their rows for loss.csv (written with the checkpoint), show the
        latest on the bar, and stop at a non-finite loss."""
        if not self._pending:
            return
        values = torch.stack([loss for *_, loss in self._pending]).float().cpu().tolist()
        pending, self._pending = self._pending, []
        for (step, epoch, lr, _), value in zip(pending, values):
            if not math.isfinite(value):
                self._non_finite(step, lr, value)
            else:
                self._non_finite_run = 0
                mean = self._loss_mean
                if mean is not None and value > DIVERGED_FACTOR * mean:
                    raise DivergedError(
                        f"the loss jumped to {value:.3g} at step {step} (lr {lr:.3e}), {value / mean:.3g}x its running "
                        f"mean {mean:.3g}: training diverged; stopped without saving: {self._last_good()}. Lower --lr"
                    )
                self._loss_mean = value if mean is None else 0.98 * mean + 0.02 * value
            self.losses.append((step, value))
            if self.rank == 0:
                self._log_rows.append([step, epoch, f"{value:.6f}", f"{lr:.3e}"])
                if (writer := self.writer()) is not None:
                    writer.add_scalar("loss", value, step)
                    writer.add_scalar("lr", lr, step)
        if bar is not None:
            rate = bar.format_dict.get("rate") or 0.0
            bar.set_postfix(loss=f"{values[-1]:.4f}", img_s=f"{rate * self.config.batch_size * self.world:.0f}")

    def _last_good(self) -> str:
        return (f"{self.checkpoint_path} (step {self._saved_step}) is the last good checkpoint"
                if self._saved_step is not None else "no checkpoint had been written yet")  # fmt: skip

    def _non_finite(self, step: int, lr: float, value: float) -> None:
        last = self._last_good()
        if self.scaler is not None:  # fp16: GradScaler skips the step (its gradients are not finite)
            self.skipped_steps += 1
            self._non_finite_run += 1
            if self.skipped_steps == 1 and self.rank == 0:
                tqdm.write(f"step {step}: loss {value}; fp16: GradScaler skipped the step (the weights did not change)",
                           file=sys.stderr)  # fmt: skip
            if self._non_finite_run < FP16_NON_FINITE_PATIENCE:
                return
            raise NonFiniteLossError(
                f"the loss was not finite for {self._non_finite_run} steps in a row up to step {step} under fp16 "
                f"(GradScaler skipped them); stopped without saving: {last}. Try --amp bf16 or a lower --lr"
            )
        raise NonFiniteLossError(
            f"the loss is {value} at step {step} (lr {lr:.3e}); stopped without saving: {last}. "
            "Lower --lr, check the data for nan/inf values, or use --amp bf16 instead of fp16"
        )

    def _flush_log(self) -> None:
        new = not os.path.isfile(self.log_path)
        with open(self.log_path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(LOG_HEADER)
            writer.writerows(self._log_rows)
        self._log_rows.clear()

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
