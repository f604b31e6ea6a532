"""A training run's loss: kept on the device and read every `log_every` steps in one transfer
(the loop's only host sync), checked, and written to loss.csv (with each checkpoint), TensorBoard
and loss.png.

A non-finite loss stops the run without saving (NonFiniteLossError), so the last checkpoint is
the last good state; under fp16 such steps are skipped, as GradScaler does, unless they keep
coming. A finite loss far above its running mean is a diverged run and stops it the same way.
"""

import csv
import math
import os
import sys

import torch
from tqdm.auto import tqdm

LOG_HEADER = ["step", "epoch", "loss", "lr"]  # loss.csv
# A loss this many times its running mean is a diverged run (L_simple's healthy spikes are a few x)
DIVERGED_FACTOR = 1000.0
FP16_NON_FINITE_PATIENCE = 10  # non-finite losses in a row that fp16 training skips before it stops


class NonFiniteLossError(RuntimeError):
    """The loss became nan or inf; the run stopped without saving, so the last checkpoint is
    the last good state."""


class DivergedError(NonFiniteLossError):
    """The loss, finite, jumped far above its running mean (gradient clipping keeps a diverged
    run's loss finite: --lr 1e9 gave 4e22); stopped without saving, as for a non-finite loss."""


class LossLog:
    """The losses of one process's run. `add` queues a step's loss (a device tensor) and says
    when `log_every` are waiting; `read` brings them to the host. Only rank 0 keeps loss.csv rows
    (`flush` appends them) and writes to `writer()` (a SummaryWriter or None). `last_good()` is
    the sentence a stop quotes about the last checkpoint; `images_per_step` feeds the bar's
    images/s."""

    def __init__(self, path: str, log_every: int, rank: int = 0, fp16: bool = False, images_per_step: int = 1,
                 writer=lambda: None, last_good=lambda: "no checkpoint had been written yet"):  # fmt: skip
        self.path, self.log_every, self.rank, self.fp16 = path, log_every, rank, fp16
        self.images_per_step, self.writer, self.last_good = images_per_step, writer, last_good
        self.losses: list[tuple[int, float]] = []  # (step, loss) of this process's run so far
        self.pending: list[tuple[int, int, float, torch.Tensor]] = []  # (step, epoch, lr, loss on the device)
        self.rows: list[list] = []  # loss.csv rows not yet written
        self.skipped_steps = self._non_finite_run = 0
        self._mean: float | None = None  # running mean of the finite losses (divergence)

    def add(self, step: int, epoch: int, lr: float, loss: torch.Tensor) -> bool:
        """Queue a step's loss; True when `log_every` losses wait to be read."""
        self.pending.append((step, epoch, lr, loss))
        return len(self.pending) >= self.log_every

    def read(self, bar=None) -> None:
        """Bring the pending losses to the host in one transfer, keep their rows, show the latest
        on the bar, and stop at a non-finite or diverged loss."""
        if not self.pending:
            return
        values = torch.stack([loss for *_, loss in self.pending]).float().cpu().tolist()
        pending, self.pending = self.pending, []
        for (step, epoch, lr, _), value in zip(pending, values):
            self._check(step, lr, value)
            self.losses.append((step, value))
            if self.rank == 0:
                self.rows.append([step, epoch, f"{value:.6f}", f"{lr:.3e}"])
                if (writer := self.writer()) is not None:
                    writer.add_scalar("loss", value, step)
                    writer.add_scalar("lr", lr, step)
        if bar is not None:
            rate = bar.format_dict.get("rate") or 0.0
            bar.set_postfix(loss=f"{values[-1]:.4f}", img_s=f"{rate * self.images_per_step:.0f}")

    def _check(self, step: int, lr: float, value: float) -> None:
        if not math.isfinite(value):
            self._non_finite(step, lr, value)
            return
        self._non_finite_run = 0
        mean = self._mean
        if mean is not None and value > DIVERGED_FACTOR * mean:
            raise DivergedError(
                f"the loss jumped to {value:.3g} at step {step} (lr {lr:.3e}), {value / mean:.3g}x its running "
                f"mean {mean:.3g}: training diverged; stopped without saving: {self.last_good()}. Lower --lr"
            )
        self._mean = value if mean is None else 0.98 * mean + 0.02 * value

    def _non_finite(self, step: int, lr: float, value: float) -> None:
        last = self.last_good()
        if self.fp16:  # GradScaler skips the step (its gradients are not finite)
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

    def flush(self) -> None:
        """Append the rows read so far to loss.csv (the header first in a new file)."""
        new = not os.path.isfile(self.path)
        with open(self.path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(LOG_HEADER)
            writer.writerows(self.rows)
        self.rows.clear()

    def trim(self, step: int) -> None:
        """Drop loss.csv's rows past `step` (written after the checkpoint a run resumes from)."""
        if self.rank or not os.path.isfile(self.path):
            return
        with open(self.path, newline="") as f:
            rows = [r for r in csv.reader(f) if r]  # blank lines (an editor's) carry nothing
        body = rows[1:] if rows and rows[0] == LOG_HEADER else rows

        def logged_step(row):  # None for a torn line (a crash mid-write) or a stray header
            return int(row[0]) if len(row) == len(LOG_HEADER) and row[0].strip().isdigit() else None

        keep = [LOG_HEADER] + [r for r in body if (s := logged_step(r)) is not None and s <= step]
        with open(self.path, "w", newline="") as f:
            csv.writer(f).writerows(keep)

    def plot(self, path: str) -> str | None:
        """`path` (a PNG) from loss.csv: every step and a running mean."""
        if not os.path.isfile(self.path):
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        with open(self.path, newline="") as f:
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
        fig.savefig(path)
        plt.close(fig)
        return path
